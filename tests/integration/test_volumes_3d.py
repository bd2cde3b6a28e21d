"""A 3D consortium end to end: NIfTI volumes (stored RAS or LPS, 2 mm) -> `site distill` under DP with the 3D
ConvNet -> synthetic NIfTI with the site's affine -> `coordinator run` trains and evaluates on volumes -> `audit`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medfdd.artifacts import load_model, load_synthetic
from medfdd.cli import main
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.data.load import load_scan

pytestmark = pytest.mark.slow

SIZE = [12, 12, 12]
SPACING = [2.0, 2.0, 2.0]
CLASSES = ["left", "right"]


def write_volumes(folder: Path, n: int, seed: int) -> None:
    """n volumes of 10 x 12 x 11 voxels at 2 mm with a bright block in the left or the right hemisphere (a class that
    only orientation-aware loading sees: every other volume is stored LPS, x reversed), plus labels.csv."""
    rng = np.random.default_rng(seed)
    rows = ["path,label,patient_id"]
    for i in range(n):
        label = CLASSES[i % 2]
        ras = rng.normal(0.2, 0.05, (10, 12, 11)).astype(np.float32)  # NIfTI (x, y, z), x = towards the right
        x0 = 1 if label == "left" else 6
        ras[x0:x0 + 3, 3:9, 3:8] += 1.0
        affine = np.diag([*SPACING, 1.0])
        affine[:3, 3] = rng.uniform(-20, 20, 3)
        if i % 4 >= 2:  # stored LPS: x and y reversed, the affine to match
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = [9, 11]
            ras, affine = np.ascontiguousarray(ras[::-1, ::-1]), affine @ flip
        nib.save(nib.Nifti1Image(ras, affine), str(folder / f"v{i:03d}.nii.gz"))
        rows.append(f"v{i:03d}.nii.gz,{label},P{seed}-{i}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("volumes3d")
    data = {"classes": CLASSES, "spatial_size": SIZE, "spacing": SPACING, "fit": "crop_or_pad",
            "holdout_fraction": 0.25}
    sites = []
    for k, name in enumerate(["hospital-a", "hospital-b"]):
        (base / name).mkdir()
        write_volumes(base / name, 40, seed=k)
        cfg = {"site_id": name, "data": {"root": f"../{name}", **data},
               "privacy": {"dp": True, "epsilon": 4.0, "delta": 1e-4, "rounds": 1},
               "distill": {"iterations": 3, "inner_steps": 3, "ipc": 3, "width": 8, "batch_size": 24, "lr": 1.0,
                           "allocation": "uniform"},
               "output": f"../runs/{name}", "device": "cpu", "workers": 1, "evaluate": {"finetune": False}}
        (base / "site_configs").mkdir(exist_ok=True)
        path = base / "site_configs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        sites.append(path.name)
    (base / "test").mkdir()
    write_volumes(base / "test", 16, seed=9)
    coord = {"sites": sites, "rounds": 1, "merge": "concat", "output": "../runs/coordinator", "seed": 0,
             "train": {"epochs": 15, "lr": 0.01, "batch_size": 16, "width": 8, "augment": False},
             "test": {"root": "../test", "orientation": "RAS", "spacing": SPACING, "fit": "crop_or_pad"}}
    path = base / "site_configs" / "coordinator.yaml"
    path.write_text(yaml.safe_dump(coord))
    assert main(["coordinator", "run", str(path)]) == 0
    return path


def test_sites_release_synthetic_volumes_as_nifti_with_their_affine(consortium):
    for site in load_coordinator_config(consortium).site_paths:
        cfg = load_site_config(site)
        syn = load_synthetic(cfg.output_dir)
        assert syn.images.shape == (6, 1, *SIZE) and syn.meta["dp"] and syn.meta["spatial_size"] == SIZE
        img = nib.load(cfg.output_dir / "synthetic.nii.gz")
        assert img.shape == (*SIZE[::-1], 6)
        np.testing.assert_allclose(img.header.get_zooms()[:3], SPACING)
        assert "".join(nib.aff2axcodes(img.affine)) == "RAS" and int(img.header["sform_code"]) > 0
        vols = np.asarray(img.dataobj)
        for n in range(6):  # each volume, as its own file with the exported affine, loads back to the release
            one = cfg.output_dir / f"synthetic-{n}.nii.gz"
            nib.save(nib.Nifti1Image(vols[..., n], img.affine), str(one))
            lo, hi = float(syn.images[n].min()), float(syn.images[n].max())
            back, _ = load_scan(one, root=cfg.output_dir, cfg=cfg.data)
            np.testing.assert_allclose(back * (hi - lo) + lo, syn.images[n], atol=1e-4)  # minmax-scaled on load


def test_the_coordinator_trains_and_evaluates_a_3d_model(consortium):
    cfg = load_coordinator_config(consortium)
    run = json.loads((cfg.output_dir / "run.json").read_text())
    assert run["status"] == "completed"
    final = run["rounds"][-1]
    assert sorted(final["accepted"]) == ["hospital-a", "hospital-b"]
    m = final["metrics"]
    assert m["n"] == 16 and 0 <= m["accuracy"] <= 1
    model = load_model(cfg.output_dir / "global_model.safetensors")
    assert model.arch["spatial_size"] == SIZE


def test_the_audit_runs_on_volumes(consortium, tmp_path):
    run_dir = load_coordinator_config(consortium).output_dir
    out = tmp_path / "report"
    assert main(["audit", str(run_dir), "--out", str(out), "--attacks", "loss", "dcr"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    assert {r["attack"] for r in rows} == {"loss", "dcr"}
    assert {"hospital-a", "hospital-b"} <= {r["site"] for r in rows}  # each site, and the consortium's pooled row
    for r in rows:
        assert r["n_members"] > 0 and r["n_nonmembers"] > 0 and 0 <= r["auc"] <= 1
        assert r["epsilon_lower_bound"] <= r["epsilon_accounted"]
