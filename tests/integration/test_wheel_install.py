"""The package a hospital installs: the wheel built from this checkout installs into a fresh venv outside the repo
and its `medfdd` runs prepare -> site distill -> coordinator run from a folder outside the repo.

No network: the wheel goes in with `--no-deps`, and the dependencies already installed for the tests are made visible
through a `.pth` file naming their site-packages folder as a plain path (Python adds the folder to sys.path but does
not run that folder's own .pth files, so the checkout's editable install stays invisible). The test asserts that
`medfdd` and `privacy` are imported from the fresh venv and that the wheel's Requires-Dist names the distribution of
every top-level import in the installed files (an undeclared import would only arrive by accident).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "medfdd", "privacy")

# Runs inside the fresh venv: top-level imports of the installed medfdd files (AST) -> distributions, against the
# wheel's Requires-Dist. Prints JSON.
SCAN = r"""
import ast, json, re, sys, importlib.metadata as md
import medfdd, privacy
dist = md.distribution("medfdd")
name = lambda r: re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower().replace("_", "-")
declared = {name(r) for r in dist.requires or [] if "extra ==" not in r}
extras = {name(r) for r in dist.requires or [] if "extra ==" in r}
tops = set()
for f in dist.files:
    if f.suffix == ".py":
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Import):
                tops |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0:
                tops.add(n.module.split(".")[0])
third = sorted(t for t in tops if t not in sys.stdlib_module_names and t not in ("medfdd", "privacy", "__future__"))
owners = md.packages_distributions()
print(json.dumps({"medfdd": medfdd.__file__, "privacy": privacy.__file__, "dist": str(dist.locate_file("")),
                  "declared": sorted(declared), "extras": sorted(extras), "imports": {t: owners.get(t, []) for t in third},
                  "files": [str(f) for f in dist.files]}))
"""


def _run(argv, **kw):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{argv[:3]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _shrink(path: Path, **sections) -> None:
    cfg = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_wheel_installs_in_a_fresh_venv_and_runs_a_consortium(tmp_path):
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", str(wheels)])
    (wheel,) = wheels.glob("medfdd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "medfdd/federation/flower/app/pyproject.toml" in names  # the Flower app `flwr run` builds
    assert "privacy/accounting/ledger.py" in names and "medfdd/cli.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_medfdd_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "work"  # outside the repo: nothing of the checkout is on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    found = json.loads(_run([str(py), "-c", SCAN], cwd=work, env=env).stdout)
    for module in ("medfdd", "privacy", "dist"):
        assert Path(found[module]).resolve().is_relative_to(venv.resolve()), (module, found[module])
        assert not Path(found[module]).resolve().is_relative_to(ROOT), (module, found[module])
    assert "medfdd/federation/flower/app/pyproject.toml" in found["files"]
    assert {"torch", "monai", "flwr", "scipy"} <= set(found["imports"])  # the scan sees the package's imports
    undeclared = {t: d for t, d in found["imports"].items()
                  if not {x.lower().replace("_", "-") for x in d} & set(found["declared"])}
    # an optional engine's package is declared by its extra (`medfdd[nvflare]`); tests/test_import_rules.py keeps its
    # imports inside medfdd/federation/nvflare/
    assert undeclared.keys() <= {"nvflare"} and "nvflare" in found["extras"], \
        f"imported but not in Requires-Dist: {undeclared}"

    medfdd = str(venv / "bin" / "medfdd")
    _run([medfdd, "prepare", "-q", "--source", "digits", "--sites", "2", "--alpha", "1", "--format", "nifti",
          "--out", "c", "--ipc", "1", "--iterations", "2", "--rounds", "1", "--max-per-class", "8"], cwd=work, env=env)
    configs = work / "c" / "site_configs"
    for site in ("hospital-a", "hospital-b"):
        _shrink(configs / f"{site}.yaml", distill={"width": 8}, evaluate={"epochs": 1}, device="cpu")
    _shrink(configs / "coordinator.yaml", rounds=1, train={"epochs": 1, "width": 8},
            redistill={"iterations": 1, "ipc": 1})
    _run([medfdd, "site", "distill", str(configs / "hospital-a.yaml")], cwd=work, env=env)
    assert (work / "c" / "runs" / "hospital-a" / "synthetic.npz").is_file()
    out = _run([medfdd, "coordinator", "run", "--json", str(configs / "coordinator.yaml")], cwd=work, env=env)
    run = json.loads(out.stdout)
    assert run["status"] == "completed"
    run_dir = work / "c" / "runs" / "coordinator"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert (run_dir / "global_model.safetensors").is_file() and (run_dir / "merged.npz").is_file()
