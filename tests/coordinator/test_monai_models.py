"""MONAI networks as the global model (`train.architecture`) and the final model as a MONAI bundle.

Real parts: MONAI's DenseNet121 trained by a real in-process coordinator run on a prepared digits consortium resized
to 64x64, its bundle read by `monai.bundle.ConfigParser` and run by `python -m monai.bundle run` on real NIfTI files.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from medfdd.artifacts import ArtifactError, load_agreed_model, load_model, save_model
from medfdd.config import Architecture, load_coordinator_config, load_site_config
from medfdd.coordinator.run import CoordinatorError
from medfdd.data.load import load_scan
from medfdd.distill.gradient_matching import per_example_gradients, trainable_copy
from medfdd.federation.inprocess import run_inprocess
from medfdd.nets import ARCHITECTURE_NAMES, MonaiClassifier, model_for
from medfdd.rundir import RunDir
from medfdd.training import predict_proba

SIZE = [64, 64]  # DenseNet121 pools 32x: 64 a side leaves a 2x2 map for its last instance norm


def test_config_names_the_architectures_nets_builds():
    assert get_args(Architecture) == ARCHITECTURE_NAMES


def _densenet(seed: int = 0) -> MonaiClassifier:
    return model_for((1, *SIZE), 3, architecture="densenet121", seed=seed)


def test_densenet_saves_loads_and_is_accepted_by_a_site(tmp_path):
    model = _densenet().eval()
    x = torch.rand(3, 1, *SIZE)
    path = save_model(tmp_path / "m.safetensors", model)
    back = load_agreed_model(path, in_channels=1, num_classes=3, spatial_size=SIZE)
    assert isinstance(back, MonaiClassifier) and back.arch == model.arch
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-6)
    # the same seed builds the same network; another seed another one
    assert torch.equal(_densenet(0).net.features[0].weight, model.net.features[0].weight)
    assert not torch.equal(_densenet(1).net.features[0].weight, model.net.features[0].weight)


@pytest.mark.parametrize("arch", [{"family": "monai", "name": "os.system"}, {"family": "pickle"},
                                  {"family": "monai", "name": "BasicUNet"}])
def test_a_model_header_cannot_choose_code(tmp_path, arch):
    """The architecture in a received file's header is data: only allow-listed networks are ever built."""
    path = save_model(tmp_path / "m.safetensors", _densenet())
    state = load_file(str(path))
    header = {"in_channels": 1, "num_classes": 3, "spatial_size": SIZE, **arch}
    save_file(state, str(tmp_path / "hostile.safetensors"), metadata={"arch": json.dumps(header)})
    with pytest.raises(ArtifactError, match="architecture metadata unusable"):
        load_model(tmp_path / "hostile.safetensors")


def test_densenet_keeps_records_independent_and_takes_per_example_gradients():
    """Instance norm instead of batch norm: a record's output (train mode) does not depend on its batch-mates, so
    DP-SGD's per-record sensitivity holds and Opacus computes per-example gradients (hybrid mode)."""
    model = _densenet().train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, *SIZE, generator=g), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        together, alone = model(x)[0], model(x[:1])[0]
    assert torch.allclose(together, alone, atol=1e-5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    net = trainable_copy(model)
    grads = per_example_gradients(net, x[:2], y[:2])
    exact = trainable_copy(model).double()  # float32 sums through 121 layers drift ~1e-3 from the exact gradient
    torch.nn.functional.cross_entropy(exact(x[:1].double()), y[:1], reduction="sum").backward()
    single = torch.cat([p.grad.flatten() for p in exact.parameters()])

    def rel(a: torch.Tensor) -> float:
        return float((a.double() - single).norm() / single.norm())

    assert rel(grads[0]) < 1e-2 < 0.5 < rel(grads[1])  # record 0's own gradient, not its batch-mate's


def test_embed_is_what_the_classifier_head_reads():
    model = _densenet().eval()
    x = torch.rand(2, 1, *SIZE)
    with torch.no_grad():
        assert torch.allclose(model.head(model.embed(x)), model(x), atol=1e-5)
    assert model.embed(x).shape == (2, model.embed_dim)


# ---------------------------------------------------------------- a real run, its bundle

@pytest.fixture(scope="module")
def densenet_run(tmp_path_factory):
    """A 2-site digits consortium at 64x64 whose coordinator trains DenseNet121 (one round, a few epochs)."""
    from tests.conftest import pin_noise_keys, small_digits_consortium

    out = tmp_path_factory.mktemp("densenet")
    coord = small_digits_consortium(out / "c", sites=2, distill={"ipc": 2, "iterations": 3},
                                    train={"epochs": 3, "batch_size": 64, "architecture": "densenet121"})
    doc = yaml.safe_load(coord.read_text())
    doc["consortium"]["spatial_size"] = SIZE
    doc["consortium"]["ipc"] = 2
    coord.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = load_coordinator_config(coord)
    for p in cfg.site_paths:
        site = yaml.safe_load(p.read_text())
        site["data"]["spatial_size"] = SIZE
        p.write_text(yaml.safe_dump(site, sort_keys=False))
    pin_noise_keys(cfg.site_paths)
    return coord, run_inprocess(cfg)


FLIPS = [(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0)]  # RAS, LAS, LPS


def _nifti_scans(coord: Path, folder: Path, n: int) -> tuple[list[Path], Path]:
    """The first `n` scans of the first site, written as 2D NIfTI files (x = columns, y = rows, as NIfTI stores
    them) in RAS, LAS and LPS storage order; returns the files and the site config."""
    site_path = load_coordinator_config(coord).site_paths[0]
    site = load_site_config(site_path)
    rows = list(csv.DictReader((site.data_root / site.data.manifest).open()))[:n]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, row in enumerate(rows):
        import pydicom

        pixels = pydicom.dcmread(site.data_root / row["path"]).pixel_array.astype(np.float32)
        files.append(folder / f"scan{i}.nii.gz")
        flip = FLIPS[i % len(FLIPS)]  # stored mirrored, with the affine that says so: both loaders reorient
        data = pixels.T[::-1 if flip[0] < 0 else 1, ::-1 if flip[1] < 0 else 1]
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), np.diag([*flip, 1.0, 1.0])), files[-1])
    return files, site_path


def _medfdd_preprocessed(site, f: Path) -> np.ndarray:
    """`f` through medfdd's own loader and the site's preprocessing (its data settings, NIfTI format)."""
    return load_scan(f, root=f.parent, cfg=site.data.model_copy(update={"root": f.parent, "format": "nifti"}))[0]


def test_densenet_run_trains_and_reports_a_monai_global_model(densenet_run):
    coord, run_dir = densenet_run
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["config"]["train"]["architecture"] == "densenet121"
    model = load_model(run_dir / "global_model.safetensors")
    assert isinstance(model, MonaiClassifier) and model.arch["name"] == "densenet121"
    assert 0.0 <= run["final"]["accuracy"] <= 1.0


def test_bundle_predicts_what_medfdd_predicts(densenet_run, tmp_path):
    """`monai.bundle.ConfigParser` builds the network with MONAI alone, loads the weights with weights_only=True and
    preprocesses a NIfTI scan as the sites do: the same probabilities as medfdd's loader and model."""
    from monai.bundle import ConfigParser

    coord, run_dir = densenet_run
    bundle = RunDir(run_dir).bundle
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == SIZE
    classes = json.loads((run_dir / "run.json").read_text())["classes"]
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == classes
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    assert type(network).__module__.startswith("monai.networks.nets")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    files, site_path = _nifti_scans(coord, tmp_path / "scans", 3)
    site = load_site_config(site_path)
    preprocessing = parser.get_parsed_content("preprocessing")
    ours = load_model(run_dir / "global_model.safetensors")
    for f in files:
        x_bundle = preprocessing({"image": str(f)})["image"]
        x_ours = _medfdd_preprocessed(site, f)
        np.testing.assert_allclose(np.asarray(x_bundle), x_ours, atol=1e-6)
        with torch.no_grad():
            p_bundle = torch.softmax(network(torch.as_tensor(np.asarray(x_bundle))[None]), 1)[0].numpy()
        np.testing.assert_allclose(p_bundle, predict_proba(ours, x_ours[None])[0], atol=1e-5)


def test_monai_bundle_run_writes_the_predictions(densenet_run, tmp_path):
    """The bundle runs as MONAI users run bundles: `monai.bundle.run` (what `python -m monai.bundle run` calls, whose
    command line needs the `fire` package) in a fresh interpreter over a folder of NIfTI scans."""
    coord, run_dir = densenet_run
    bundle = RunDir(run_dir).bundle
    files, site_path = _nifti_scans(coord, tmp_path / "scans", 2)
    out = tmp_path / "predictions"
    call = (f"from monai.bundle import run; run(config_file={str(bundle / 'configs' / 'inference.json')!r}, "
            f"bundle_root={str(bundle)!r}, input_dir={str(tmp_path / 'scans')!r}, output_dir={str(out)!r})")
    proc = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.reader((out / "predictions.csv").open()))
    assert len(rows) == len(files)
    site = load_site_config(site_path)
    ours = load_model(run_dir / "global_model.safetensors")
    for row in rows:
        f = Path(row[0])
        x = _medfdd_preprocessed(site, f)
        np.testing.assert_allclose(np.asarray(row[1:], dtype=float), predict_proba(ours, x[None])[0], atol=1e-5)


def test_an_architecture_too_deep_for_the_images_is_refused_before_any_round(digits_consortium):
    coord = digits_consortium(sites=2, train={"architecture": "densenet121"})  # 16x16 digits
    with pytest.raises(CoordinatorError, match="train.architecture"):
        run_inprocess(load_coordinator_config(coord))
