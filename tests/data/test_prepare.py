"""`medfdd prepare`: sources, Dirichlet partition and the materialised consortium (files, manifests, configs)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from rich.console import Console

from medfdd.config import (
    DistillConfig,
    hybrid_finetune_share,
    load_coordinator_config,
    load_site_config,
    recommended_mode,
)
from medfdd.errors import ConfigError, SourceUnavailableError
from medfdd.prepare.consortium import (
    OutputNotEmptyError,
    PrepareResult,
    cap_per_class,
    prepare_consortium,
    site_id,
)
from medfdd.prepare.partition import PartitionError, dirichlet_partition, mean_class_entropy
from medfdd.prepare.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    FASHION_MNIST_FILES,
    SourceFormatError,
    find_fashion_mnist,
    load_digits_source,
    load_fashion_mnist,
    load_medmnist_npz,
    load_source,
    read_idx,
)
from medfdd.site.check import check_site

PATIENT = re.compile(r"^P[A-Z]+-\d{6}$")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def prepare(out: Path, **kw) -> PrepareResult:
    args = dict(source="digits", sites=3, alpha=0.5, fmt="dicom", seed=0, epsilon=2.0, delta=1e-5, ipc=3,
                iterations=7, rounds=1, method="dm", dp=True, max_per_class=25, console=quiet())
    args.update(kw)
    return prepare_consortium(out=out, **args)


def read_manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", "label", "patient_id"]
        return list(reader)


def read_record(path: Path, fmt: str, rgb: bool = False) -> np.ndarray:
    """Read a written record back into the source's row-major layout with pydicom / nibabel only."""
    if fmt == "dicom":
        if path.is_dir():  # DICOM series: one file per slice
            slices = [pydicom.dcmread(p) for p in sorted(path.glob("*.dcm"))]
            slices.sort(key=lambda d: int(d.InstanceNumber))
            assert len({d.SeriesInstanceUID for d in slices}) == 1
            return np.stack([d.pixel_array for d in slices])
        ds = pydicom.dcmread(path)
        assert ds.PhotometricInterpretation == ("RGB" if rgb else "MONOCHROME2")
        return ds.pixel_array
    data = np.asanyarray(nib.load(path).dataobj)
    if rgb:  # stored as a NIfTI vector image (W, H, 1, 1, 3)
        assert data.shape[2:4] == (1, 1) and data.shape[4] == 3
        assert nib.load(path).header.get_intent()[0] == "vector"
        return np.transpose(data[:, :, 0, 0, :], (1, 0, 2))
    return np.transpose(data, tuple(range(data.ndim))[::-1])


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- digits consortium


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_digits_consortium_files_manifests_and_configs(tmp_path, fmt):
    out = tmp_path / "consortium"
    res = prepare(out, fmt=fmt, max_per_class=25)
    src = cap_per_class(load_source("digits", seed=0), 25, 0)
    assert res.n_train == len(src.train_labels) == 250 and res.classes == [str(d) for d in range(10)]
    assert res.site_ids == ["hospital-a", "hospital-b", "hospital-c"]

    # the partition covers the training split exactly once
    idx = np.concatenate(res.partition.site_indices)
    assert len(idx) == res.n_train and np.array_equal(np.sort(idx), np.arange(res.n_train))
    assert res.partition.table.sum(axis=0).tolist() == np.bincount(src.train_labels, minlength=10).tolist()

    table = json.loads((out / "partition.json").read_text())
    all_patients: set[str] = set()
    for s, sid in enumerate(res.site_ids):
        rows = read_manifest(out / sid)
        counts = Counter(r["label"] for r in rows)
        expected = res.site_counts(sid)
        assert {c: counts.get(c, 0) for c in res.classes} == expected
        assert {c: table["partition"]["sites"][sid][c] for c in res.classes} == expected
        # every file exists, is readable and holds exactly the pixels the partition gave this site
        written = Counter()
        suffix = ".dcm" if fmt == "dicom" else ".nii.gz"
        for r in rows:
            assert r["path"].endswith(suffix) and not Path(r["path"]).is_absolute()
            pixels = read_record(out / sid / r["path"], fmt)
            assert pixels.shape == (8, 8) and pixels.dtype == np.uint8
            written[(r["label"], pixels.tobytes())] += 1
        site = res.partition.site_indices[s]
        assert written == Counter((str(int(y)), x.tobytes()) for x, y in
                                  zip(src.train_images[site], src.train_labels[site], strict=True))
        # patients: generated ids, 1-3 images each, never shared between sites
        per_patient = Counter(r["patient_id"] for r in rows)
        assert all(PATIENT.match(p) and p.startswith(f"P{sid[-1].upper()}-") for p in per_patient)
        assert set(per_patient.values()) <= {1, 2, 3} and max(per_patient.values()) > 1
        assert not all_patients & set(per_patient)
        all_patients |= set(per_patient)
        if fmt == "dicom":
            assert pydicom.dcmread(out / sid / rows[0]["path"]).PatientID == rows[0]["patient_id"]

    test_rows = read_manifest(out / "test")
    assert len(test_rows) == res.n_test == int(res.test_counts.sum()) > 0
    assert all(read_record(out / "test" / r["path"], fmt).shape == (8, 8) for r in test_rows)
    assert not all_patients & {r["patient_id"] for r in test_rows}

    for sid, path in zip(res.site_ids, res.site_configs, strict=True):
        assert path == (out / "site_configs" / f"{sid}.yaml").resolve()
        cfg = load_site_config(path)
        assert cfg.site_id == sid and cfg.data_root == (out / sid).resolve() and cfg.data.manifest == "labels.csv"
        assert cfg.data.format == fmt and cfg.data.classes == res.classes and cfg.data.spatial_size == [16, 16]  # 8x8 files, upsampled
        assert cfg.data.channels == 1 and cfg.data.intensity.mode == "minmax" and cfg.data.holdout_fraction == 0.2
        assert (cfg.privacy.dp, cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.accountant) == (True, 2.0, 1e-5,
                                                                                                    "rdp")
        assert (cfg.distill.method, cfg.distill.ipc, cfg.distill.iterations) == ("dm", 3, 7)
        assert cfg.output_dir == (out / "runs" / sid).resolve() and cfg.device == "auto" and cfg.seed == 0
    coord = load_coordinator_config(out / "site_configs" / "coordinator.yaml")
    assert coord.site_paths == res.site_configs and coord.rounds == 1
    assert (coord.base_dir / coord.test.root).resolve() == (out / "test").resolve() and coord.test.format == fmt
    assert coord.output_dir == (out / "runs" / "coordinator").resolve()


def test_same_seed_same_files_other_seed_other_split(tmp_path):
    a = prepare(tmp_path / "a", max_per_class=15, seed=4)
    b = prepare(tmp_path / "b", max_per_class=15, seed=4)
    c = prepare(tmp_path / "c", max_per_class=15, seed=5)
    da, db = tree_digest(a.out), tree_digest(b.out)
    assert da == db and len(da) > 150  # byte-identical DICOM files, manifests, configs and partition.json
    labels = "hospital-a/labels.csv"
    assert (a.out / labels).read_bytes() == (b.out / labels).read_bytes()
    assert (a.out / labels).read_bytes() != (c.out / labels).read_bytes()
    assert not np.array_equal(a.partition.table, c.partition.table)


def test_override_updates_sections_validates_and_keeps_the_file_on_a_bad_value(tmp_path):
    res = prepare(tmp_path / "c", max_per_class=10)
    res.override(site={"distill": {"ipc": 5}, "device": "cpu"}, coordinator={"train": {"epochs": 7}})
    for path in res.site_configs:
        cfg = load_site_config(path)
        assert cfg.distill.ipc == 5 and cfg.device == "cpu"
        assert cfg.distill.iterations == 7 and cfg.privacy.epsilon == 2.0  # untouched keys of the section stay
    coord = load_coordinator_config(res.coordinator_config)
    assert coord.train.epochs == 7 and coord.consortium.ipc == 3
    before = res.site_configs[0].read_bytes()
    with pytest.raises(ConfigError, match="distill.ipc"):
        res.override(site={"distill": {"ipc": 0}})
    assert res.site_configs[0].read_bytes() == before


def test_smaller_alpha_is_more_skewed(tmp_path):
    labels = load_digits_source(seed=0).train_labels
    # mean per-site class entropy (1 = every site IID, 0 = one class per site): lower = more skewed
    ent = {alpha: np.mean([mean_class_entropy(dirichlet_partition(labels, n_sites=5, alpha=alpha, seed=s,
                                                                  min_per_site=10).table) for s in range(5)])
           for alpha in (0.1, 1.0, 100.0)}
    assert ent[0.1] < ent[1.0] < ent[100.0]
    assert ent[0.1] < 0.6 and ent[100.0] > 0.95
    # the same holds for what lands in the site folders
    low = prepare(tmp_path / "low", alpha=0.1, max_per_class=20)
    high = prepare(tmp_path / "high", alpha=100.0, max_per_class=20)

    def folder_entropy(res: PrepareResult) -> float:
        counts = [Counter(r["label"] for r in read_manifest(d)) for d in res.site_dirs]
        return mean_class_entropy(np.array([[c.get(k, 0) for k in res.classes] for c in counts]))

    assert folder_entropy(low) < folder_entropy(high)


def test_partition_is_seeded_and_keeps_every_site_populated():
    labels = np.repeat(np.arange(4), 25)
    p1 = dirichlet_partition(labels, n_sites=4, alpha=0.05, seed=1, min_per_site=5)
    p2 = dirichlet_partition(labels, n_sites=4, alpha=0.05, seed=1, min_per_site=5)
    assert all(np.array_equal(x, y) for x, y in zip(p1.site_indices, p2.site_indices, strict=True))
    assert p1.site_totals.min() >= 5 and p1.table.sum() == 100
    with pytest.raises(PartitionError) as e:  # 0.001 puts each class on one site: 5 classes cannot feed 8 sites
        dirichlet_partition(np.repeat(np.arange(5), 20), n_sites=8, alpha=0.001, seed=0, min_per_site=5,
                            max_attempts=20)
    assert "--alpha 0.001" in str(e.value) and "--sites 8" in str(e.value) and "raise --alpha" in str(e.value)
    with pytest.raises(PartitionError, match="needs 40 records"):
        dirichlet_partition(labels[:30], n_sites=4, alpha=1.0, seed=0, min_per_site=10)


# --------------------------------------------------------------------------------------------------------- medmnist


def write_npz(path: Path, shape: tuple[int, ...], n_train=36, n_test=12, n_classes=3, **override) -> Path:
    rng = np.random.default_rng(7)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % n_classes).reshape(-1, 1),
        "val_images": rng.integers(0, 256, (5, *shape), dtype=np.uint8),
        "val_labels": np.zeros((5, 1), dtype=np.int64),
        "test_images": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "test_labels": np.arange(n_test) % n_classes,
    }
    arrays.update(override)
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
@pytest.mark.parametrize("kind,shape,spatial,channels", [
    ("gray", (10, 12), [10, 12], 1),
    ("rgb", (10, 12, 3), [10, 12], 3),
    ("volume", (8, 8, 8), [8, 8, 8], 1),
])
def test_medmnist_round_trip(tmp_path, fmt, kind, shape, spatial, channels):
    npz = write_npz(tmp_path / f"{kind}.npz", shape)
    src = load_medmnist_npz(npz)
    res = prepare(tmp_path / "c", source="medmnist", npz=npz, sites=2, alpha=1.0, fmt=fmt, max_per_class=None,
                  min_per_site=5)
    assert res.classes == ["c0", "c1", "c2"] and res.n_train == 36 and res.n_test == 12  # val_* is not used
    assert res.spatial_size == spatial and res.channels == channels
    rgb = kind == "rgb"
    seen = Counter()
    for d in [*res.site_dirs, res.test_dir]:
        for r in read_manifest(d):
            path = d / r["path"]
            assert path.is_dir() if (kind == "volume" and fmt == "dicom") else path.is_file()
            seen[(r["label"], read_record(path, fmt, rgb=rgb).tobytes())] += 1
    expected = Counter((f"c{int(y)}", x.tobytes()) for x, y in
                       [*zip(src.train_images, src.train_labels, strict=True),
                        *zip(src.test_images, src.test_labels, strict=True)])
    assert seen == expected
    cfg = load_site_config(res.site_configs[0])
    assert cfg.data.spatial_size == [max(s, 16) for s in spatial] and cfg.data.channels == channels and cfg.data.classes == res.classes
    report = check_site(load_site_config(res.site_configs[0]), console=quiet())  # every written record goes through the MONAI loading path
    assert report.n_quarantined == 0 and report.class_counts == res.site_counts(cfg.site_id)


def test_medmnist_bad_files_are_typed_errors(tmp_path):
    missing = write_npz(tmp_path / "missing.npz", (8, 8), test_labels=None)
    with pytest.raises(SourceFormatError) as e:
        load_medmnist_npz(missing)
    assert "'test_labels'" in str(e.value) and "missing" in e.value.problem and "test_labels" in e.value.fix
    multi = write_npz(tmp_path / "multi.npz", (8, 8), train_labels=np.zeros((36, 4), dtype=np.int64))
    with pytest.raises(SourceFormatError, match="train_labels.*multi-label"):
        load_medmnist_npz(multi)
    five_d = write_npz(tmp_path / "5d.npz", (4, 4, 4, 3))
    with pytest.raises(SourceFormatError, match="train_images"):
        load_medmnist_npz(five_d)
    floats = write_npz(tmp_path / "f.npz", (8, 8), train_images=np.zeros((36, 8, 8), dtype=np.float32))
    with pytest.raises(SourceFormatError, match="dtype float32"):
        load_medmnist_npz(floats)
    with pytest.raises(SourceUnavailableError, match="--npz"):
        load_medmnist_npz(tmp_path / "nope.npz")
    with pytest.raises(SourceUnavailableError, match="--npz"):
        prepare(tmp_path / "c", source="medmnist", npz=None)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, array: np.ndarray) -> Path:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def fake_fashion_mnist(folder: Path, n_train=60, n_test=20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for split, n in (("train", n_train), ("test", n_test)):
        write_idx(folder / FASHION_MNIST_FILES[f"{split}_images"], rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / FASHION_MNIST_FILES[f"{split}_labels"], (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_fashion_mnist_absent_says_how_to_install(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceUnavailableError) as e:
        load_fashion_mnist(search_dirs=[empty])
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and str(empty) in str(e.value)
    with pytest.raises(SourceUnavailableError, match="apt-get install dataset-fashion-mnist"):
        prepare(tmp_path / "c", source="fashion-mnist", search_dirs=[empty])
    assert not (tmp_path / "c").exists()


def test_fashion_mnist_idx_files(tmp_path, monkeypatch):
    folder = fake_fashion_mnist(tmp_path / "datasets" / "fashion-mnist")
    assert find_fashion_mnist([tmp_path / "datasets"]) == folder
    src = load_fashion_mnist(search_dirs=[folder])
    assert src.train_images.shape == (60, 28, 28) and src.test_images.shape == (20, 28, 28)
    assert src.classes == FASHION_MNIST_CLASSES and src.train_labels.dtype == np.int64
    monkeypatch.setenv(FASHION_MNIST_ENV, str(folder))
    res = prepare(tmp_path / "c", source="fashion-mnist", sites=2, fmt="nifti", max_per_class=None, min_per_site=5)
    assert res.spatial_size == [28, 28] and res.n_train == 60
    labels = {r["label"] for d in res.site_dirs for r in read_manifest(d)}
    assert labels <= set(FASHION_MNIST_CLASSES) and len(labels) == 10
    bad = folder / FASHION_MNIST_FILES["test_labels"]
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x63" + bytes(20)))  # announces 99 labels, holds 20
    with pytest.raises(SourceFormatError, match="announces"):
        read_idx(bad)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist_reads():
    src = load_fashion_mnist()
    assert src.train_images.shape == (60000, 28, 28) and src.test_images.shape == (10000, 28, 28)
    assert np.bincount(src.train_labels).tolist() == [6000] * 10


# ------------------------------------------------------------------------------------------------------- out folder


def test_refuses_foreign_folder_and_replaces_earlier_consortium(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputNotEmptyError, match="not an earlier medfdd consortium"):
        prepare(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = tmp_path / "c"
    prepare(out, sites=3, max_per_class=10, min_per_site=3)
    (out / "runs").mkdir()
    (out / "runs" / "ledger.json").write_text("{}")
    res = prepare(out, sites=2, max_per_class=10, min_per_site=3)
    assert sorted(p.name for p in out.iterdir()) == ["hospital-a", "hospital-b", "partition.json", "runs",
                                                     "site_configs", "test"]
    assert (out / "runs" / "ledger.json").read_text() == "{}"  # what prepare did not write is left alone
    assert sorted(p.name for p in (out / "site_configs").iterdir()) == ["coordinator.yaml", "hospital-a.yaml",
                                                                        "hospital-b.yaml"]
    assert sum(len(read_manifest(d)) for d in res.site_dirs) == res.n_train
    assert site_id(0) == "hospital-a" and site_id(25) == "hospital-z" and site_id(26) == "hospital-aa"


# ------------------------------------------------------------------------------------------------------ CLI & check


def test_cli_prepare(tmp_path, capsys):
    from medfdd import exit_codes
    from medfdd.cli import main

    out = tmp_path / "cli"
    argv = ["prepare", "--source", "digits", "--sites", "2", "--alpha", "0.3", "--format", "nifti", "--out", str(out),
            "--seed", "2", "--epsilon", "4", "--delta", "1e-6", "--ipc", "5", "--iterations", "10", "--method", "gm",
            "--no-dp", "--max-per-class", "12"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "hospital-a" in printed and "hospital-b" in printed and "total" in printed
    cfg = load_site_config(out / "site_configs" / "hospital-b.yaml")
    assert (cfg.privacy.dp, cfg.privacy.epsilon, cfg.privacy.delta) == (False, 4.0, 1e-6)
    assert (cfg.distill.method, cfg.distill.ipc, cfg.seed) == ("gm", 5, 2)
    # --iterations are the paid steps over all rounds (the default 3): split evenly, rounded up
    assert (cfg.distill.iterations, cfg.privacy.rounds) == (4, 3)
    assert load_coordinator_config(out / "site_configs" / "coordinator.yaml").rounds == 3
    assert cfg.distill.allocation == "uniform"  # gm has no class counts before its first update
    assert sum(len(read_manifest(out / s)) for s in ("hospital-a", "hospital-b")) == 120
    assert main(["prepare", "--source", "digits", "--sites", "2", "--alpha", "-1", "--format", "dicom",
                 "--out", str(tmp_path / "bad")]) == exit_codes.RUNTIME_ERROR
    assert "--alpha" in capsys.readouterr().err
    assert main(["prepare", "--source", "digits", "--sites", "2", "--alpha", "1", "--format", "dicom", "--rounds", "3",
                 "--iterations", "2", "--out", str(tmp_path / "bad2")]) == exit_codes.RUNTIME_ERROR
    assert "--iterations 2" in capsys.readouterr().err


def test_prepare_writes_the_recommended_defaults(tmp_path):
    """Only data-specific keys and the budget are written: every distillation and merge setting is the default."""
    res = prepare(tmp_path / "c", sites=2, rounds=3, iterations=100)
    cfg = load_site_config(res.site_configs[0])
    assert cfg.distill == DistillConfig(ipc=3, iterations=34) and cfg.privacy.rounds == 3
    assert (cfg.distill.allocation, cfg.distill.updates_per_statistic, cfg.distill.expected_batch(10)) == \
        ("evidence", 20, 1280)
    coord = load_coordinator_config(res.coordinator_config)
    assert (coord.rounds, coord.merge, coord.train_rounds) == (3, "evidence", 0)


def test_recommended_mode_is_hybrid_only_where_it_was_measured_ahead():
    big = [6000, 18000, 9000]
    assert recommended_mode(epsilon=10, alpha=0.5, dp=True, site_records=big) == "hybrid"
    assert recommended_mode(epsilon=4, alpha=1.0, dp=True, site_records=big) == "hybrid"
    assert recommended_mode(epsilon=1, alpha=0.5, dp=True, site_records=big) == "one-shot"  # small budget
    assert recommended_mode(epsilon=10, alpha=0.1, dp=True, site_records=big) == "one-shot"  # strongly non-IID
    assert recommended_mode(epsilon=10, alpha=0.5, dp=True, site_records=[*big, 800]) == "one-shot"  # a small site
    assert recommended_mode(epsilon=10, alpha=0.5, dp=False, site_records=big) == "one-shot"
    assert (hybrid_finetune_share(10), hybrid_finetune_share(4), hybrid_finetune_share(1)) == (0.9, 0.75, 0.5)


def test_prepare_writes_the_hybrid_plan(tmp_path, capsys):
    """--mode hybrid (auto would pick one-shot for these small digits sites): every site keeps epsilon 1 for the
    distillation and plans the fine-tuning rounds the coordinator runs, on a width-32 global model."""
    from medfdd import exit_codes
    from medfdd.cli import main

    res = prepare(tmp_path / "c", epsilon=10.0, mode="hybrid", max_per_class=10)
    for path in res.site_configs:
        cfg = load_site_config(path)
        assert (cfg.privacy.finetune_share, cfg.privacy.finetune_rounds) == (0.9, 20)
        assert cfg.distill == DistillConfig(ipc=3, iterations=7)  # the distillation keeps its defaults
    coord = load_coordinator_config(res.coordinator_config)
    assert (coord.finetune.rounds, coord.train.width) == (20, 32)
    assert json.loads(res.partition_json.read_text())["mode"] == "hybrid"
    auto = prepare(tmp_path / "auto", epsilon=10.0, max_per_class=10)
    assert load_site_config(auto.site_configs[0]).privacy.finetune_rounds == 0
    assert load_coordinator_config(auto.coordinator_config).finetune.rounds == 0
    assert json.loads(auto.partition_json.read_text())["mode"] == "one-shot"
    assert main(["prepare", "--source", "digits", "--sites", "2", "--alpha", "1", "--format", "dicom", "--no-dp",
                 "--mode", "hybrid", "--out", str(tmp_path / "bad")]) == exit_codes.RUNTIME_ERROR
    assert "--mode" in capsys.readouterr().err


def test_check_site_sees_exactly_the_partition(tmp_path):
    res = prepare(tmp_path / "c", sites=3, max_per_class=20)
    for sid, path in zip(res.site_ids, res.site_configs, strict=True):
        report = check_site(load_site_config(path), console=quiet())
        assert report.class_counts == res.site_counts(sid)
        assert report.n_quarantined == 0 and report.n_rows == report.n_used == sum(res.site_counts(sid).values())
