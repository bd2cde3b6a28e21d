"""JSON Schemas of the configs for editors (issue 39 item 6): generated from the pydantic models, committed under
docs/schemas/ and kept fresh, accepting the repository's example configs and every YAML config example in the docs,
and rejecting what medfdd rejects (wrong types, unknown keys, out-of-range values)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from medfdd.cli import main
from medfdd.config import SCHEMA_MODELS, SiteConfig, json_schema, parse_config, schema_text
from medfdd.config_reference import schema_path
from medfdd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "site_configs").glob("*.yaml"))


def _validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json_schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("kind", sorted(SCHEMA_MODELS))
def test_the_committed_schemas_are_the_models_schemas(kind):
    path = schema_path(kind)
    assert path.is_file() and path.read_text(encoding="utf-8") == schema_text(kind), (
        f"{path.relative_to(ROOT)} is stale: run `make docs` (python -m medfdd.config_reference)")


def test_config_schema_command_prints_and_writes_the_schema(tmp_path, capsys):
    assert main(["config", "schema", "coordinator"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema("coordinator")
    out = tmp_path / "s.json"
    assert main(["config", "schema", "site", "--out", str(out)]) == 0
    assert out.read_text() == schema_text("site")


def test_the_schemas_leave_out_the_keys_the_loader_sets():
    for kind in SCHEMA_MODELS:
        assert not {"base_dir", "source"} & set(json_schema(kind)["properties"])


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_example_configs_validate_and_name_their_schema(path):
    kind = "coordinator" if path.stem == "coordinator" else "site"
    _validator(kind).validate(yaml.safe_load(path.read_text()))
    first = path.read_text().splitlines()[0]
    assert first == f"# yaml-language-server: $schema=../docs/schemas/medfdd-{kind}.schema.json"
    assert (path.parent / first.split("=", 1)[1]).resolve() == schema_path(kind)


def _doc_configs() -> list[tuple[str, str, dict]]:
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            data = yaml.safe_load(block)
            if "site_id" in data:
                found.append((doc.name, "site", data))
            elif "output" in data:
                found.append((doc.name, "coordinator", data))
    return found


def test_every_full_config_example_in_the_docs_validates():
    examples = _doc_configs()
    assert {kind for _, kind, _ in examples} == {"site", "coordinator"}
    for doc, kind, data in examples:
        errors = [e.message for e in _validator(kind).iter_errors(data)]
        assert errors == [], f"{doc}: {errors}"


BAD_SITE = [
    ("data.spatial_size is a string", ("data", "spatial_size"), "64"),
    ("privacy.epsilon is no number", ("privacy", "epsilon"), "one"),
    ("privacy.epsilon below its range", ("privacy", "epsilon"), 0),
    ("data.channels outside its choices", ("data", "channels"), 2),
    ("an unknown intensity mode", ("data", "intensity"), {"mode": "zscore"}),
    ("an unknown key", ("data", "colour"), "rgb"),
    ("device outside its choices", ("device",), "tpu"),
]


@pytest.mark.parametrize("what,key,value", BAD_SITE, ids=[b[0] for b in BAD_SITE])
def test_the_site_schema_rejects_what_medfdd_rejects(what, key, value):
    data = yaml.safe_load((ROOT / "site_configs" / "hospital-a.yaml").read_text())
    target = data
    for part in key[:-1]:
        target = target[part]
    target[key[-1]] = value
    assert list(_validator("site").iter_errors(data)), what
    with pytest.raises(ConfigError):
        parse_config(data, SiteConfig, "example", ROOT / "site_configs")


def test_a_required_key_missing_is_rejected():
    data = yaml.safe_load((ROOT / "site_configs" / "hospital-a.yaml").read_text())
    del data["output"]
    assert any("'output' is a required property" in e.message for e in _validator("site").iter_errors(data))
