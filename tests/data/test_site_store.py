"""Out-of-core sites: the records live in one memory-mapped .npy per site, read by index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfdd.config import load_site_config
from medfdd.data.cache import SiteStore
from medfdd.data.records import RecordView, byte_chunks
from medfdd.data.site_data import load_site_data, site_store_path


def test_store_appends_keeps_and_publishes_a_read_only_map(tmp_path):
    rng = np.random.default_rng(0)
    records = rng.random((7, 1, 5, 6), dtype=np.float32)
    path = tmp_path / "cache" / "site_records.npy"
    with SiteStore(path, capacity=10, record_shape=(1, 5, 6)) as store:
        for r in records:
            store.append(r)
        np.testing.assert_array_equal(store.read(3), records[3])
        assert not path.exists()  # published only when finished
        store.keep([0, 2, 3, 6])
        images = store.finish()
    assert isinstance(images, np.memmap) and not images.flags.writeable
    np.testing.assert_array_equal(images, records[[0, 2, 3, 6]])
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), records[[0, 2, 3, 6]])
    assert sorted(p.name for p in path.parent.iterdir()) == ["site_records.npy"]  # no temp file left
    with pytest.raises(ValueError, match="shape"):
        SiteStore(path, 1, (1, 5, 6)).append(np.zeros((5, 6), np.float32))


def test_an_unfinished_store_leaves_nothing(tmp_path):
    path = tmp_path / "site_records.npy"
    with pytest.raises(RuntimeError), SiteStore(path, 3, (2,)) as store:
        store.append(np.ones(2, np.float32))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_record_view_reads_the_rows_asked_for_and_digests_like_the_tensor(tmp_path):
    rng = np.random.default_rng(1)
    records = rng.random((50, 1, 4, 4), dtype=np.float32)
    with SiteStore(tmp_path / "s.npy", 50, (1, 4, 4)) as store:
        for r in records:
            store.append(r)
        images = store.finish()
    train = np.array([3, 1, 4, 15, 9, 26, 5, 35, 8, 49])
    view = RecordView(images, train)
    assert len(view) == 10 and view.shape == (10, 1, 4, 4)
    idx = torch.tensor([0, 2, 9, 2])
    np.testing.assert_array_equal(view[idx].numpy(), records[train[[0, 2, 9, 2]]])
    assert view.to("cpu")[idx].dtype == torch.float32
    on_device = view.to("meta")  # an accelerator: a small site is copied there whole (meta: shapes only)
    assert isinstance(on_device, torch.Tensor) and tuple(on_device.shape) == view.shape
    # the release fingerprint reads the view a chunk at a time and digests the same bytes as the whole tensor did
    as_tensor = torch.as_tensor(records[train])
    assert b"".join(bytes(c) for c in byte_chunks(view)) == b"".join(bytes(c) for c in byte_chunks(as_tensor))


def test_load_site_data_returns_the_site_file_memory_mapped(site_builder):
    s = site_builder()
    for i in range(6):
        s.add_dicom(f"{i}.dcm", "ab"[i % 2], patient_id=f"P{i}")
    s.add("missing.dcm", "a")
    cfg = load_site_config(s.write())
    data = load_site_data(cfg)
    assert isinstance(data.images, np.memmap) and not data.images.flags.writeable
    assert data.images.shape == (6, 1, 16, 16)
    np.testing.assert_array_equal(np.load(site_store_path(cfg), allow_pickle=False), data.images)
    again = load_site_data(cfg)  # a second load replaces the file atomically; the first map still reads its data
    np.testing.assert_array_equal(again.images, data.images)
    assert [p.name for p in site_store_path(cfg).parent.iterdir() if p.name.startswith(".")] == []


def test_read_only_records_train_and_score_without_sharing_their_memory(tmp_path):
    """torch cannot share a read-only map (it warns, and writes through the tensor would be undefined): the store's
    records are copied where a tensor is made of them, in training, scoring and the audit's scores."""
    import warnings

    from medfdd.nets import convnet_for
    from medfdd.training import TrainSettings, as_tensor, predict_proba, train_classifier
    from privacy.audit.scores import logits

    path = tmp_path / "records.npy"
    np.save(path, np.random.default_rng(0).random((6, 1, 16, 16), dtype=np.float32))
    images = np.load(path, mmap_mode="r", allow_pickle=False)
    net = convnet_for((1, 16, 16), 2, width=8, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = as_tensor(images)
        train_classifier(images, np.array([0, 1] * 3), 2, TrainSettings(epochs=1, width=8), seed=0)
        predict_proba(net, images)
        logits(net, images)
    t += 1  # a copy: the file's map is untouched
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), images)
