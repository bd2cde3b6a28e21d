"""Only `medfdd/federation/flower/` imports `flwr` (DESIGN.md): the core stays engine-neutral."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ROOT / "medfdd" / "federation" / "flower"
SCANNED = ("medfdd", "privacy", "benchmarks")


def _imports_flwr(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "flwr" or a.name.startswith("flwr.") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "flwr" or node.module.startswith("flwr.")):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) and \
                str(node.args[0].value).split(".")[0] == "flwr":
            lines.append(node.lineno)
    return lines


def test_no_flwr_import_outside_the_flower_package():
    offenders = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else []:
            if ALLOWED in path.parents:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{n}" for n in _imports_flwr(path)]
    assert offenders == [], f"only medfdd/federation/flower/ may import flwr: {offenders}"


def test_the_scan_sees_the_flower_package_imports():  # the rule would pass vacuously if the scan were broken
    assert _imports_flwr(ALLOWED / "codec.py")


def test_cli_and_deployment_helpers_load_without_flwr():
    code = ("import sys, medfdd.cli, medfdd.federation.flower, medfdd.federation.flower.deploy, "
            "medfdd.federation.flower.pki, medfdd.federation.flower.cli; "
            "medfdd.cli._parser(); assert 'flwr' not in sys.modules, sorted(m for m in sys.modules if 'flwr' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
