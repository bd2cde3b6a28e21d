"""The example systemd units (docs/deploy/) are valid units, start real `medfdd` commands that parse, and keep the
deployment secure: TLS and SuperNode authentication on, the SuperLink's state (registered keys) on disk."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medfdd.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "docs" / "deploy"
UNITS = {"medfdd-superlink.service": "medfdd-superlink.service",
         "medfdd-supernode@.service": "medfdd-supernode@hospital-a.service"}  # a template, verified as an instance
MEDFDD = "/opt/medfdd/bin/medfdd"


def _exec_start(name: str) -> list[str]:
    unit = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    unit.optionxform = str
    unit.read_string((DEPLOY / name).read_text())
    return shlex.split(unit["Service"]["ExecStart"].replace("%i", "hospital-a"))


def test_the_units_exist_and_run_medfdd_from_its_venv():
    assert sorted(p.name for p in DEPLOY.glob("*.service")) == sorted(UNITS)
    for name in UNITS:
        assert _exec_start(name)[0] == MEDFDD


@pytest.mark.parametrize("name", sorted(UNITS))
def test_exec_start_is_a_medfdd_command_line_that_parses(name):
    argv = _exec_start(name)
    args = _parser().parse_args(argv[1:])
    assert not args.insecure  # TLS, and on the SuperLink SuperNode authentication, stay on
    if "superlink" in name:
        assert args.coordinator_command == "superlink" and args.certs and args.database  # keys survive a restart
    else:
        assert args.site_command == "join" and args.root_certificates and args.key
        assert str(args.config).endswith("hospital-a.yaml") and str(args.key).endswith("hospital-a")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verifies_the_units(tmp_path):
    medfdd = Path(sys.executable).parent / "medfdd"  # verify checks that ExecStart's program exists
    assert medfdd.is_file()
    for name, installed in UNITS.items():
        (tmp_path / installed).write_text((DEPLOY / name).read_text().replace(MEDFDD, str(medfdd)))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(tmp_path / u) for u in UNITS.values())],
                          capture_output=True, text=True, timeout=120)
    # an unknown key or a bad value is only a warning (exit 0): any output fails the test
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
