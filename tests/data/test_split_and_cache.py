"""Patient-level split and the preprocessing cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfdd.config import load_site_config
from medfdd.data.check import check_site
from medfdd.data.site_data import load_site_data
from medfdd.data.split import patient_split


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), n_pat=st.integers(1, 60), frac=st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.9]),
       seed=st.integers(0, 10), with_ids=st.booleans())
def test_split_is_a_partition_with_no_shared_patient(n, n_pat, frac, seed, with_ids):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    pids = [f"P{rng.integers(0, n_pat)}" for _ in range(n)] if with_ids else [None] * n
    train, hold = patient_split(labels, pids, frac, seed)
    assert len(np.intersect1d(train, hold)) == 0
    assert sorted(np.concatenate([train, hold]).tolist()) == list(range(n))
    if with_ids:
        assert not {pids[i] for i in train} & {pids[i] for i in hold}
    if frac == 0:
        assert len(hold) == 0
    # deterministic
    t2, h2 = patient_split(labels, pids, frac, seed)
    assert np.array_equal(train, t2) and np.array_equal(hold, h2)


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
    check_site(cfg_path)
    cfg = load_site_config(cfg_path)
    split = json.loads((cfg.output_dir / "split.json").read_text())
    row_pid = {i + 2: f"P{i // 3}" for i in range(30)}  # manifest line numbers start at 2
    train = {row_pid[r] for r in split["train_rows"]}
    hold = {row_pid[r] for r in split["holdout_rows"]}
    assert hold and train and not train & hold
    check_site(cfg_path)
    assert json.loads((cfg.output_dir / "split.json").read_text())["holdout_rows"] == split["holdout_rows"]


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
    from medfdd.data.writers import write_dicom

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
        check_site(cfg_path)
    q = json.loads((load_site_config(cfg_path).output_dir / "quarantine.json").read_text())
    assert [e["reason"] for e in q["entries"]] == ["unreadable", "unreadable"]
