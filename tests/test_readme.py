"""README.md and docs/*.md stay true: the config tables are generated from the models, every `medfdd` command line
parses with the real parser, every YAML block is a valid config, every `make` target and benchmark flag exists,
every link between the documents resolves, and the README stays a short first screen without dated lab numbers."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from medfdd.cli import _parser
from medfdd.config import Agreement, CoordinatorConfig, SiteConfig, parse_config
from medfdd.config_reference import DOC as CONFIG_DOC
from medfdd.config_reference import render
from privacy.audit.spec import AuditSpec

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
GUIDES = ["docs/site-operator.md", "docs/coordinator.md", "docs/privacy-officer.md"]


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def _blocks(doc: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _text(doc), re.S)


def _command_lines(doc: Path) -> list[list[str]]:
    lines = []
    for block in _blocks(doc, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("#") or not line:
                continue
            lines.append(shlex.split(line))
    return lines


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


COMMANDS = [(doc, argv) for doc in DOCS for argv in _command_lines(doc)]
MEDFDD = [(doc, argv) for doc, argv in COMMANDS if argv[0].endswith("medfdd")]
BENCH = [(doc, argv) for doc, argv in COMMANDS if len(argv) > 1 and argv[1].startswith("benchmarks/")]
YAML = [(doc, block) for doc in DOCS for block in _blocks(doc, "yaml")]


def test_the_documents_exist_and_the_config_reference_is_among_them():
    names = {_name(d) for d in DOCS}
    assert set(GUIDES) | {"docs/configuration.md", "docs/how-it-works.md", "docs/benchmarks.md", "docs/design.md",
                          "docs/troubleshooting.md"} <= names
    assert CONFIG_DOC in DOCS


def test_config_reference_tables_are_generated_from_the_models():
    text = _text(CONFIG_DOC)
    assert "<!-- config-reference:site -->" in text and "<!-- config-reference:coordinator -->" in text
    assert "| `data.root` |" in text and "| `consortium.ipc` |" in text  # the tables are filled in, not empty
    for doc in DOCS:
        assert render(_text(doc)) == _text(doc), f"{_name(doc)}'s config tables are stale: run `make docs`"


def test_the_docs_have_commands_for_every_user():
    subcommands = {" ".join(a[1:3]) if a[1] in {"site", "coordinator", "federation", "config"} else a[1]
                   for _, a in MEDFDD}
    for expected in ["prepare", "site init", "site check", "site distill", "site budget", "site evaluate",
                     "site join", "coordinator agreement", "config schema", "coordinator run", "coordinator superlink", "coordinator register",
                     "coordinator flower-run", "federation certs", "federation keys", "audit"]:
        assert expected in subcommands, expected


def _all_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of the parser and its subparsers (argparse would also accept abbreviations)."""
    found = set()
    for action in parser._actions:
        found |= set(action.option_strings)
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            found |= _all_options(sub)
    return found


@pytest.mark.parametrize("doc,argv", MEDFDD, ids=[f"{_name(d)}: {' '.join(a[1:3])}" for d, a in MEDFDD])
def test_every_medfdd_command_line_in_the_docs_parses(doc, argv):
    parser = _parser()
    try:
        parser.parse_args(argv[1:])
    except SystemExit as e:  # argparse exits on an unknown command or flag
        pytest.fail(f"{_name(doc)}: command does not parse: {' '.join(argv)} ({e})")
    flags = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
    assert flags <= _all_options(parser), f"{_name(doc)}: abbreviated or unknown flags {flags - _all_options(parser)}"


def test_every_make_target_in_the_docs_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    used = {a[1] for _, a in COMMANDS if a[:1] == ["make"]}
    for doc in DOCS:
        used |= set(re.findall(r"`make ([a-z-]+)`", _text(doc)))
    assert {"demo", "test", "docs"} <= used and used <= targets, used - targets


def _options(script: Path) -> set[str]:
    """The option strings a benchmark script's argparse parser declares (read from its source, not run)."""
    found = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return found


@pytest.mark.parametrize("doc,argv", BENCH, ids=[f"{_name(d)}: {a[1]}" for d, a in BENCH])
def test_every_benchmark_command_names_a_script_and_its_flags(doc, argv):
    script = ROOT / argv[1]
    assert script.is_file(), f"{_name(doc)}: no script {argv[1]}"
    flags = {a for a in argv[2:] if a.startswith("--")}
    assert flags <= _options(script), f"{_name(doc)}: {argv[1]} has no flags {flags - _options(script)}"


@pytest.mark.parametrize("doc,block", YAML, ids=[f"{_name(d)}#{i}" for i, (d, _) in enumerate(YAML)])
def test_yaml_examples_are_valid_configs(doc, block):
    data = yaml.safe_load(block)
    assert isinstance(data, dict), f"{_name(doc)}: a YAML block that is no mapping: {block!r}"
    if "medfdd_agreement" in data:
        parse_config(data, Agreement, f"{_name(doc)} agreement example", ROOT)
    elif "site_id" in data:
        parse_config(data, SiteConfig, f"{_name(doc)} site example", ROOT)
    elif "output" in data:
        parse_config(data, CoordinatorConfig, f"{_name(doc)} coordinator example", ROOT)
    elif set(data) <= set(AuditSpec.model_fields):
        parse_config(data, AuditSpec, f"{_name(doc)} audit spec example", ROOT)
    else:  # a fragment: its top-level keys must be site or coordinator keys, and its sections valid as such
        assert set(data) <= set(SiteConfig.model_fields) | set(CoordinatorConfig.model_fields), data
        for key, value in data.items():
            model = SiteConfig if key in SiteConfig.model_fields else CoordinatorConfig
            annotation = model.model_fields[key].annotation
            sub = next(a for a in (annotation, *getattr(annotation, "__args__", ())) if hasattr(a, "model_validate"))
            sub.model_validate(value)


def test_there_are_yaml_examples_of_every_kind():
    kinds = {"agreement" if "medfdd_agreement" in d else "site" if "site_id" in d else "coordinator" if "output" in d
             else "other" for d in (yaml.safe_load(b) for _, b in YAML)}
    assert kinds == {"agreement", "site", "coordinator", "other"}


def test_csv_examples_are_manifests():
    blocks = [b for doc in DOCS for b in _blocks(doc, "csv")]
    assert blocks
    for block in blocks:
        header = block.splitlines()[0].split(",")
        assert header[:2] == ["path", "label"] and set(header) <= {"path", "label", "patient_id"}, header


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", _text(doc), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", [*DOCS, *(ROOT / n for n in ("SECURITY.md", "CHANGELOG.md"))], ids=_name)
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(doc)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{_name(doc)}: broken link {target}"
        if anchor:
            assert dest.suffix == ".md" and anchor in _anchors(dest), f"{_name(doc)}: no anchor {target}"


def test_readme_is_short_and_every_role_finds_its_guide_on_the_first_screen():
    assert README.stat().st_size <= 12_000, README.stat().st_size
    first_screen = "\n".join(_text(README).splitlines()[:20])
    for guide in GUIDES:
        assert f"]({guide})" in first_screen, guide


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "reliability.md"], ids=_name)
def test_user_documents_carry_no_dated_measurements(doc):
    # dated lab numbers belong in benchmarks/results/ (HISTORY.md, the JSON files); reliability.md is generated
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", _text(doc))
