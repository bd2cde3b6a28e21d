"""Import rules: the packages form layers along the data flow (docs/design.md draws them), so no import runs back up
and no two folders import each other; and only `medfdd/federation/flower/` imports `flwr`: the core stays
engine-neutral; likewise only `medfdd/federation/nvflare/` imports `nvflare`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from import_layers import FIRST_PARTY, LAYERS, edges, module_of, unit

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = ROOT / "medfdd" / "federation" / "flower"
NVFLARE = ROOT / "medfdd" / "federation" / "nvflare"
SCANNED = ("medfdd", "privacy", "benchmarks")


def _imports(path: Path, top: str) -> list[int]:
    """Lines of `path` that import the package `top` (import, from-import, importlib)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == top or a.name.startswith(f"{top}.") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == top or node.module.startswith(f"{top}.")):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) and \
                str(node.args[0].value).split(".")[0] == top:
            lines.append(node.lineno)
    return lines


def _imports_flwr(path: Path) -> list[int]:
    return _imports(path, "flwr")


def test_no_nvflare_import_outside_the_nvflare_package():
    offenders = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else []:
            if NVFLARE not in path.parents:
                offenders += [f"{path.relative_to(ROOT)}:{n}" for n in _imports(path, "nvflare")]
    assert offenders == [], f"only medfdd/federation/nvflare/ may import nvflare: {offenders}"
    assert _imports(NVFLARE / "codec.py", "nvflare")  # the rule would pass vacuously if the scan were broken


def test_the_nvflare_package_imports_no_flwr_and_loads_without_nvflare():
    assert [p.name for p in sorted(NVFLARE.rglob("*.py")) if _imports_flwr(p)] == []
    code = ("import sys, medfdd.federation.nvflare; assert 'nvflare' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


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


def test_every_module_belongs_to_a_layer():
    for top in FIRST_PARTY:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = module_of(path)
            assert unit(module) in LAYERS, f"{path.relative_to(ROOT)}: add its package to LAYERS"


def test_imports_only_go_down_the_layers():
    rank = {u: i for i, u in enumerate(LAYERS)}
    upward = [f"{where}: {a} imports {b}" for a, b, where in edges() if rank[b] > rank[a]]
    assert upward == [], "imports that run back up the data flow:\n" + "\n".join(upward)


def test_accounting_imports_only_errors_and_io():
    used = {b for a, b, _ in edges() if a == "privacy.accounting"}
    assert used <= {"medfdd.errors", "medfdd.io"}, used


def test_no_core_package_imports_the_audit():
    core = {"medfdd.data", "medfdd.distill", "medfdd.coordinator", "medfdd.finetune", "medfdd.training"}
    offenders = [f"{w}: {a} imports {b}" for a, b, w in edges() if a in core and b.startswith("privacy.audit")]
    assert offenders == []


def test_the_layer_scan_sees_imports():  # the rules would pass vacuously if the scan were broken
    seen = {(a, b) for a, b, _ in edges()}
    assert ("medfdd.site", "privacy.audit") in seen and ("medfdd.cli", "medfdd.site") in seen
    assert ("medfdd.federation", "medfdd.coordinator") in seen
