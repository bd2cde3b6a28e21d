"""README.md stays true: its config tables are generated from the models, and every command line in it parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from medfdd.cli import _parser
from medfdd.config import CoordinatorConfig, SiteConfig, parse_config
from medfdd.config_reference import render

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _command_lines() -> list[list[str]]:
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("#") or not line:
                continue
            lines.append(shlex.split(line))
    return lines


def test_config_reference_tables_are_generated_from_the_models():
    assert render(README) == README, "README.md's config tables are stale: run `make docs`"


MEDFDD = [argv for argv in _command_lines() if argv and argv[0].endswith("medfdd")]


def test_readme_has_commands_for_every_user():
    subcommands = {" ".join(a[1:3]) if a[1] in {"site", "coordinator", "federation"} else a[1] for a in MEDFDD}
    for expected in ["prepare", "site check", "site distill", "site budget",
                     "site join", "coordinator run", "coordinator superlink", "coordinator register",
                     "coordinator flower-run", "federation certs", "federation keys", "audit"]:
        assert expected in subcommands, expected


@pytest.mark.parametrize("argv", MEDFDD, ids=[" ".join(a[1:3]) for a in MEDFDD])
def test_every_medfdd_command_line_in_the_readme_parses(argv):
    try:
        _parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse exits on an unknown command or flag
        pytest.fail(f"README command does not parse: {' '.join(argv)} ({e})")


def test_every_make_target_in_the_readme_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    used = {a[1] for a in _command_lines() if a[:1] == ["make"]} | set(re.findall(r"`make ([a-z-]+)`", README))
    assert used and used <= targets, used - targets


def test_yaml_examples_are_valid_configs():
    checked = 0
    for block in _blocks("yaml"):
        data = yaml.safe_load(block)
        if not isinstance(data, dict):
            continue
        if "site_id" in data:
            parse_config(data, SiteConfig, "README site example", ROOT)
        elif "output" in data:
            parse_config(data, CoordinatorConfig, "README coordinator example", ROOT)
        else:  # a fragment: its top-level keys must be site or coordinator keys
            assert set(data) <= set(SiteConfig.model_fields) | set(CoordinatorConfig.model_fields), data
        checked += 1
    assert checked >= 2
