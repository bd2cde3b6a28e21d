"""Patient-level split and the preprocessing cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfdd.config import load_site_config
from medfdd.data.site_data import load_site_data
from medfdd.data.split import SPLITS, patient_split, site_split, stable_split
from medfdd.site.check import check_site


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), n_pat=st.integers(1, 60), frac=st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.9]),
       seed=st.integers(0, 10), with_ids=st.booleans(), method=st.sampled_from(SPLITS))
def test_split_is_a_partition_with_no_shared_patient(n, n_pat, frac, seed, with_ids, method):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    pids = [f"P{rng.integers(0, n_pat)}" for _ in range(n)] if with_ids else [None] * n
    paths = [f"scan{i}.dcm" for i in range(n)]
    train, hold = site_split(method, labels, pids, paths, frac, seed)
    assert len(np.intersect1d(train, hold)) == 0
    assert sorted(np.concatenate([train, hold]).tolist()) == list(range(n))
    if with_ids:
        assert not {pids[i] for i in train} & {pids[i] for i in hold}
    if frac == 0:
        assert len(hold) == 0
    # deterministic
    t2, h2 = site_split(method, labels, pids, paths, frac, seed)
    assert np.array_equal(train, t2) and np.array_equal(hold, h2)


def _sides(pids, paths, train, hold):
    """patient (or path, without an id) -> True when held out."""
    key = [p if p is not None else f"path:{q}" for p, q in zip(pids, paths, strict=True)]
    return {key[i]: False for i in train.tolist()} | {key[i]: True for i in hold.tolist()}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 150), n_pat=st.integers(1, 40), seed=st.integers(0, 5), frac=st.sampled_from([0.2, 0.5]),
       drop=st.integers(0, 39), data=st.randoms(use_true_random=False))
def test_stable_split_never_moves_another_patient(n, n_pat, seed, frac, drop, data):
    """Neighbouring manifests (one patient removed, rows reordered, new patients added) put every other patient on
    the same side: the training sets differ by that patient's scans only, so DP in the training set is DP in the
    manifest. The stratified split does not have this property (the case below shows it moving patients)."""
    pids = [f"P{data.randrange(n_pat)}" if data.random() < 0.8 else None for _ in range(n)]
    paths = [f"scan{i}.dcm" for i in range(n)]
    before = _sides(pids, paths, *stable_split(pids, paths, frac, seed))
    gone = f"P{drop % n_pat}"
    keep = [i for i in range(n) if pids[i] != gone]
    data.shuffle(keep)
    pids2 = [pids[i] for i in keep] + [f"new{j}" for j in range(5)]
    paths2 = [paths[i] for i in keep] + [f"new{j}.dcm" for j in range(5)]
    after = _sides(pids2, paths2, *stable_split(pids2, paths2, frac, seed))
    assert all(after[k] == before[k] for k in after if k in before)


def test_stratified_split_reshuffles_when_a_patient_is_added():
    """Why `stable` is the default: one more patient moves others between training and holdout."""
    labels = np.zeros(50, dtype=np.int64)
    pids = [f"P{i}" for i in range(50)]
    before = set(patient_split(labels, pids, 0.2, seed=0)[1].tolist())
    after = set(patient_split(np.zeros(51, dtype=np.int64), [*pids, "P50"], 0.2, seed=0)[1].tolist())
    assert before - after  # patients held out before are training patients now


def test_stable_split_fraction_per_class_and_seed():
    n = 20_000
    labels = np.arange(n) % 4
    pids = [f"P{i // 2}" for i in range(n)]  # two scans per patient, same label
    _, hold = stable_split(pids, [f"s{i}" for i in range(n)], 0.2, seed=3)
    per_class = np.bincount(labels[hold], minlength=4) / (n / 4)
    # binomial over 2,500 patients per class: sd 0.008; 5 sd either side
    assert np.all(np.abs(per_class - 0.2) < 0.04), per_class
    assert not np.array_equal(hold, stable_split(pids, [f"s{i}" for i in range(n)], 0.2, seed=4)[1])
    assert len(stable_split(pids, [f"s{i}" for i in range(n)], 0.0, seed=3)[1]) == 0


def test_split_fraction_and_stratification():
    labels = np.repeat(np.arange(4), 250)
    pids = [f"P{i // 2}" for i in range(1000)]  # two images per patient, same label
    train, hold = patient_split(labels, pids, 0.2, seed=3)
    assert len(hold) == 200
    assert np.bincount(labels[hold]).tolist() == [50, 50, 50, 50]
    other = patient_split(labels, pids, 0.2, seed=4)[1]
    assert not np.array_equal(hold, other)  # the seed matters


def test_per_row_split_without_patient_ids():
    labels = np.repeat([0, 1], 50)
    train, hold = patient_split(labels, [None] * 100, 0.3, seed=0)
    assert len(hold) == 30


def _site(site_builder, n=12, **kw):
    s = site_builder(**kw)
    rng = np.random.default_rng(5)
    for i in range(n):
        s.add_dicom(f"img{i}.dcm", "ab"[i % 2], pixels=rng.integers(0, 255, (20, 20), dtype=np.uint8),
                    patient_id=f"P{i // 3}")
    return s


def test_split_json_is_patient_level_and_reproducible(site_builder):
    s = _site(site_builder, n=30)
    cfg_path = s.write()
    check_site(load_site_config(cfg_path))
    cfg = load_site_config(cfg_path)
    split = json.loads((cfg.output_dir / "split.json").read_text())
    row_pid = {i + 2: f"P{i // 3}" for i in range(30)}  # manifest line numbers start at 2
    train = {row_pid[r] for r in split["train_rows"]}
    hold = {row_pid[r] for r in split["holdout_rows"]}
    assert hold and train and not train & hold
    check_site(load_site_config(cfg_path))
    assert json.loads((cfg.output_dir / "split.json").read_text())["holdout_rows"] == split["holdout_rows"]


@pytest.mark.parametrize("split", SPLITS)
def test_check_warns_when_a_class_is_all_held_out(site_builder, split):
    """A class whose only patient hashes into the holdout trains on nothing at this site: `site check` says so and
    names the fixes (the stratified split keeps that patient for training instead)."""
    held = next(f"B{i}" for i in range(1000) if len(stable_split([f"B{i}"], ["x"], 0.2, seed=0)[1]))
    s = site_builder(split=split)
    for i in range(8):
        s.add_dicom(f"a{i}.dcm", "a", patient_id=f"A{i}")
    s.add_dicom("b0.dcm", "b", patient_id=held)
    s.add_dicom("b1.dcm", "b", patient_id=held)
    cfg_path = s.write()
    report = check_site(load_site_config(cfg_path))
    warned = [w for w in report.warnings if "in the audit holdout" in w]
    if split == "stable":
        assert report.train_counts["b"] == 0 and report.holdout_counts["b"] == 2
        assert len(warned) == 1 and "['b']" in warned[0] and "holdout_fraction" in warned[0]
    else:
        assert report.train_counts["b"] == 2 and not warned
    written = json.loads((load_site_config(cfg_path).output_dir / "split.json").read_text())
    assert written["split"] == split


def test_cache_hits_and_invalidation(site_builder):
    s = _site(site_builder)
    cfg_path = s.write()
    cfg = load_site_config(cfg_path)
    first = load_site_data(cfg)
    assert (first.cache_hits, first.cache_misses) == (0, 12)
    second = load_site_data(cfg)
    assert (second.cache_hits, second.cache_misses) == (12, 0)
    np.testing.assert_array_equal(first.images, second.images)
    assert [i.modality for i in second.infos] == [i.modality for i in first.infos]

    # a changed file is re-decoded (content hash), and gives the new pixels
    from medfdd.prepare.writers import write_dicom

    write_dicom(s.root / "img0.dcm", np.tile(np.arange(20, dtype=np.uint8), (20, 1)), patient_id="P0", rng=s.rng)
    third = load_site_data(cfg)
    assert (third.cache_hits, third.cache_misses) == (11, 1)
    assert not np.allclose(third.images[0], first.images[0])

    # a changed preprocessing setting invalidates everything
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace("- 16\n  - 16", "- 8\n  - 8"))
    fourth = load_site_data(load_site_config(cfg_path))
    assert fourth.cache_misses == 12 and fourth.images.shape[-2:] == (8, 8)

    # a changed manifest (labels) is picked up: labels are never cached
    (s.root / "labels.csv").write_text((s.root / "labels.csv").read_text().replace("img1.dcm,b", "img1.dcm,a"))
    fifth = load_site_data(load_site_config(cfg_path))
    assert fifth.labels[1] == 0 and fifth.cache_hits == 12


def test_a_shared_cache_dir_serves_runs_with_other_output_folders(site_builder, tmp_path):
    """data.cache_dir (relative to the config): a second output folder reads the first run's tensors; the entries
    are still keyed by content, so a changed scan is decoded again there."""
    s = _site(site_builder, cache_dir="shared-cache")
    cfg_path = s.write()
    first = load_site_data(load_site_config(cfg_path))
    assert (first.cache_hits, first.cache_misses) == (0, 12)
    assert len(list((tmp_path / "shared-cache").rglob("*.npy"))) == 12
    assert not (load_site_config(cfg_path).output_dir / "cache").exists()
    cfg_path.write_text(cfg_path.read_text().replace("output: out", "output: elsewhere"))
    from medfdd.prepare.writers import write_dicom

    write_dicom(s.root / "img0.dcm", np.tile(np.arange(20, dtype=np.uint8), (20, 1)), patient_id="P0", rng=s.rng)
    second = load_site_data(load_site_config(cfg_path))
    assert (second.cache_hits, second.cache_misses) == (11, 1)
    np.testing.assert_array_equal(second.images[1:], first.images[1:])
    assert not np.allclose(second.images[0], first.images[0])


def test_corrupt_cache_entry_is_recomputed(site_builder):
    s = _site(site_builder, n=2)
    cfg = load_site_config(s.write())
    ref = load_site_data(cfg).images
    for f in (cfg.output_dir / "cache").rglob("*.npy"):
        f.write_bytes(b"garbage")
    again = load_site_data(cfg)
    assert again.cache_misses == 2
    np.testing.assert_array_equal(again.images, ref)


def test_cache_entry_from_another_version_is_recomputed(site_builder):
    """Info written by another medfdd version (unknown or missing fields) is a miss, not a crash."""
    s = _site(site_builder, n=2)
    cfg = load_site_config(s.write())
    ref = load_site_data(cfg).images
    infos = sorted((cfg.output_dir / "cache").rglob("*.json"))
    infos[0].write_text(json.dumps({"format": "dicom", "colour": "red"}))
    infos[1].write_text(json.dumps(["not", "a", "mapping"]))
    again = load_site_data(cfg)
    assert (again.cache_hits, again.cache_misses) == (0, 2)
    np.testing.assert_array_equal(again.images, ref)


def test_cache_never_unpickles(site_builder):
    """An object array planted in the cache is refused by np.load(allow_pickle=False) and recomputed."""
    s = _site(site_builder, n=1)
    cfg = load_site_config(s.write())
    load_site_data(cfg)
    (entry,) = list((cfg.output_dir / "cache").rglob("*.npy"))
    np.save(entry, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    again = load_site_data(cfg)
    assert again.cache_misses == 1 and again.images.dtype == np.float32


def test_cache_disabled(site_builder):
    s = _site(site_builder, n=2, cache=False)
    cfg = load_site_config(s.write())
    load_site_data(cfg)
    assert not (cfg.output_dir / "cache").exists()


@pytest.mark.parametrize("fmt", ["nifti", "png"])
def test_declared_format_that_does_not_match_the_files(site_builder, fmt):
    """data.format: nifti/png over DICOM files: every row quarantined as unreadable, with a typed error at the end."""
    from medfdd.errors import NoUsableDataError

    s = _site(site_builder, n=2, format=fmt)
    cfg_path = s.write()
    with pytest.raises(NoUsableDataError):
        check_site(load_site_config(cfg_path))
    q = json.loads((load_site_config(cfg_path).output_dir / "quarantine.json").read_text())
    assert [e["reason"] for e in q["entries"]] == ["unreadable", "unreadable"]
