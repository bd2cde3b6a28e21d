"""Shared fixtures: build a site folder (files + labels.csv + site config) in tmp_path."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medfdd.prepare.writers import write_dicom


class SiteBuilder:
    """Writes scans into `root`, collects manifest rows, then a labels.csv and a site config."""

    def __init__(self, base: Path, classes: list[str], spatial_size: list[int], **data_overrides):
        self.base = base
        self.root = base / "site"
        self.root.mkdir(parents=True, exist_ok=True)
        self.classes = classes
        self.spatial_size = spatial_size
        self.data_overrides = data_overrides
        self.rows: list[list[str]] = []
        self.rng = np.random.default_rng(0)

    def add(self, rel: str, label: str, patient_id: str = "") -> str:
        self.rows.append([rel, label, patient_id])
        return rel

    def add_dicom(self, rel: str, label: str, pixels: np.ndarray | None = None, patient_id: str = "", **kw) -> Path:
        if pixels is None:
            pixels = self.rng.integers(0, 255, size=(16, 16), dtype=np.uint8)
        path = write_dicom(self.root / rel, pixels, patient_id=patient_id or "P-000", rng=self.rng, **kw)
        self.add(rel, label, patient_id)
        return path

    def add_copy(self, src: Path, rel: str, label: str, patient_id: str = "") -> Path:
        dst = self.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        self.add(rel, label, patient_id)
        return dst

    def write(self, header: list[str] | None = None, **config_overrides) -> Path:
        with open(self.root / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header or ["path", "label", "patient_id"])
            w.writerows(self.rows)
        cfg = {
            "site_id": "test-site",
            "data": {"root": "site", "manifest": "labels.csv", "format": "auto", "classes": self.classes,
                     "spatial_size": self.spatial_size, "intensity": {"mode": "minmax"}, "holdout_fraction": 0.2,
                     **self.data_overrides},
            # one site alone: its whole budget in one round; uniform images per class at this size
            "privacy": {"dp": True, "epsilon": 1.0, "delta": 1e-5, "accountant": "rdp", "rounds": 1},
            "distill": {"method": "dm", "ipc": 2, "iterations": 5, "allocation": "uniform"},
            "output": "out",
            "device": "cpu",
            **config_overrides,
        }
        path = self.base / "site.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path


def assert_final_model_delivered(run_dir, site_paths: dict):
    """After the last round exactly the sites of `site_paths` (site id -> config) hold the run's final model, scored
    on their own scans, and run.json counts the bytes sent to each."""
    from medfdd.config import load_site_config

    run = json.loads((run_dir / "run.json").read_text())
    final = (run_dir / "global_model.safetensors").read_bytes()
    assert sorted(run["final_model_bytes_down"]) == sorted(site_paths)
    for s in site_paths:
        out = load_site_config(site_paths[s]).output_dir
        assert (out / "global_model.safetensors").read_bytes() == final
        assert run["final_model_bytes_down"][s] > len(final)
        evaluation = json.loads((out / "evaluation.json").read_text())
        assert evaluation["site_id"] == s and evaluation["results"]["holdout"]["n"] > 0
        assert evaluation["model_sha256"] == hashlib.sha256(final).hexdigest()


@pytest.fixture
def site_builder(tmp_path):
    def make(classes=("a", "b"), spatial_size=(16, 16), **data_overrides) -> SiteBuilder:
        return SiteBuilder(tmp_path, list(classes), list(spatial_size), **data_overrides)

    return make


def pytest_collection_modifyitems(config, items):
    """Modules marked `slow` (each minutes long) come first, so that `make test`'s two workers (`--dist loadfile
    --no-loadscope-reorder`) start on the long files and finish together on the short ones: xdist's default
    reorders files by their number of tests, which left the long files with few tests for the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: collection order otherwise


# Tests run small models in two workers on two cores: a second intra-op thread per worker only oversubscribes the
# cores (OpenMP workers spin waiting for one; measured up to ~200x slower on a busy machine).
torch.set_num_threads(1)


# CI-sized: small sites, few steps; uniform images per class (the default evidence allocation suits sites of
# hundreds of records per class)
SMALL_DISTILL = {"iterations": 5, "inner_steps": 5, "batch_size": 256, "lr": 1.0, "width": 16, "ipc": 5,
                 "checkpoint_every": 2, "allocation": "uniform"}
SMALL_TRAIN = {"epochs": 20, "width": 32, "batch_size": 256}


def small_digits_consortium(out: Path, *, sites: int = 3, rounds: int = 1, seed: int = 0, dp: bool = True,
                            distill: dict | None = None, train: dict | None = None, cache_dir: Path | None = None,
                            **coordinator) -> Path:
    """A digits consortium from `prepare` with CI-sized distillation and training; returns coordinator.yaml.

    `cache_dir`: the sites' preprocessing cache (`data.cache_dir`). `prepare` writes the same bytes for the same
    seed and the cache is keyed by content, so tests that share one decode each scan through MONAI only once."""
    import yaml
    from rich.console import Console

    from medfdd.prepare.consortium import prepare_consortium

    res = prepare_consortium(source="digits", out=out, sites=sites, alpha=0.5, fmt="dicom", seed=seed, epsilon=1.0,
                             delta=1e-5, ipc=SMALL_DISTILL["ipc"], iterations=SMALL_DISTILL["iterations"] * rounds,
                             rounds=rounds, method="dm", dp=dp, console=Console(quiet=True))
    for path in res.site_configs:
        cfg = yaml.safe_load(path.read_text())
        cfg["distill"].update({**SMALL_DISTILL, **(distill or {})})
        cfg["privacy"]["rounds"] = rounds
        cfg["evaluate"] = {"finetune": False}  # the site's own models cost minutes: tests/integration/test_site_finetune.py
        if cache_dir is not None:
            cfg["data"]["cache_dir"] = str(cache_dir)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    coord = yaml.safe_load(res.coordinator_config.read_text())
    coord["train"].update({**SMALL_TRAIN, **(train or {})})
    coord.update(rounds=rounds, **coordinator)
    res.coordinator_config.write_text(yaml.safe_dump(coord, sort_keys=False))
    return res.coordinator_config


def hybrid_sites(coord: Path, *, share: float, rounds: int) -> dict:
    """Give every site of the consortium a hybrid plan (`privacy.finetune_share`, `finetune_rounds`); returns site id
    -> config path."""
    import yaml

    from medfdd.config import load_coordinator_config

    paths = {}
    for p in load_coordinator_config(coord).site_paths:
        doc = yaml.safe_load(p.read_text())
        doc["privacy"].update(finetune_share=share, finetune_rounds=rounds)
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths[doc["site_id"]] = p
    return paths


def prepared_digits(out: Path, *, ipc: int, iterations: int) -> Path:
    """`prepare` a 2-site DICOM digits consortium (DM with DP, epsilon 1) into `out`, quietly; returns `out`."""
    from rich.console import Console

    from medfdd.prepare.consortium import prepare_consortium

    prepare_consortium(source="digits", out=out, sites=2, alpha=1.0, fmt="dicom", seed=0, epsilon=1.0, delta=1e-5,
                       ipc=ipc, iterations=iterations, rounds=1, method="dm", dp=True, console=Console(quiet=True))
    return out


def pin_noise_keys(site_configs, *, no_dp: bool = False) -> None:
    """Install a fixed noise key in each site's output folder before its first run (`provision_noise_key`: the empty
    ledger first, as a site restoring its key does; `no_dp`: for a --no-dp run, whose ledger records epsilon inf).
    The key is otherwise random per site (it keys the DP noise and sampling), so a test whose assertion is
    statistical (a utility floor, audit power) would see new noise on every run."""
    from medfdd.config import load_site_config
    from medfdd.site.budget import provision_noise_key
    from medfdd.site.noise_key import KEY_BYTES

    for i, path in enumerate(site_configs):
        cfg = load_site_config(path)
        provision_noise_key(cfg, bytes([0, i % 256]) * (KEY_BYTES // 2), dp=cfg.privacy.dp and not no_dp)


@pytest.fixture(scope="session")
def shared_preprocess_cache(tmp_path_factory) -> Path:
    """One preprocessing cache per test process for the prepared digits consortia (see small_digits_consortium)."""
    return tmp_path_factory.mktemp("preprocess-cache")


@pytest.fixture
def digits_consortium(tmp_path, shared_preprocess_cache):
    """Factory: `digits_consortium(**kw)` -> path of a small consortium's coordinator.yaml (see small_digits_consortium)."""
    return lambda name="consortium", **kw: small_digits_consortium(
        tmp_path / name, **{"cache_dir": shared_preprocess_cache, **kw})


def assert_png(path: Path, *, min_bytes: int = 3000, max_bytes: int = 300_000) -> tuple[int, int]:
    """`path` is a PNG that decodes, of a plausible size for a chart; returns its (height, width) in pixels."""
    from PIL import Image

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert min_bytes < len(data) < max_bytes, f"{path}: {len(data)} bytes"
    with Image.open(path) as img:
        img.load()
        assert min(img.size) >= 150, f"{path}: {img.size}"
        return img.size[1], img.size[0]
