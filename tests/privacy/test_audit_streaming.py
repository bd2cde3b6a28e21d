"""The audit reads a site's records by index, a batch at a time: LiRA shadows, the canary run, the loss and DCR
attacks and the audit gate never hold the whole pool, and they score exactly what they scored from an array."""

from __future__ import annotations

import numpy as np
import pytest

from medfdd.config import DistillConfig
from medfdd.data.records import RecordView, concat, take
from medfdd.training import TrainSettings, train_classifier
from privacy.audit.attacks import dcr_attack, loss_attack, run_shadows
from privacy.audit.canary import canary_audit
from privacy.audit.pipeline import PipelineSettings

N = 3000  # records in the pool: larger than any batch the audit reads (logits 1,024, DCR 512)


class CountingRecords:
    """A records array that counts the rows each read gathers and cannot be converted whole (no __array__): a code
    path that materialised the pool would fail here or show up as a read of N rows."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.dtype = a, a.shape, a.dtype
        self.largest_read = 0

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, idx):
        out = self.a[idx]
        self.largest_read = max(self.largest_read, len(out))
        return out


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    y = np.arange(N) % 2
    x = (rng.random((N, 1, 8, 8)) * 0.5 + 0.5 * y[:, None, None, None]).astype(np.float32)
    return x, y


def settings() -> PipelineSettings:
    return PipelineSettings(DistillConfig(ipc=2, iterations=2, batch_size=40, width=8), TrainSettings(epochs=1, width=8),
                            2, 1.0, 1e-5)


def test_shadows_on_a_view_read_batches_and_score_like_the_array(pool):
    x, y = pool
    records = CountingRecords(x)
    view = RecordView(records, np.arange(N))
    streamed = run_shadows(view, y, settings(), n_shadows=2, seed=5, targets=("global_model", "synthetic"))
    in_memory = run_shadows(x, y, settings(), n_shadows=2, seed=5, targets=("global_model", "synthetic"))
    assert 0 < records.largest_read <= 1024
    np.testing.assert_array_equal(streamed.in_mask, in_memory.in_mask)
    for t in ("global_model", "synthetic"):
        np.testing.assert_allclose(streamed.stats[t], in_memory.stats[t], rtol=1e-6)


def test_canary_run_on_views_reads_batches_and_matches_the_array(pool):
    x, y = pool
    records = CountingRecords(x)
    train, canaries = np.arange(N - 64), np.arange(N - 64, N)
    kw = {"target": "synthetic", "kind": "holdout", "seed": 3, "delta": 1e-5, "confidence": 0.95}
    streamed = canary_audit(RecordView(records, train), y[train], RecordView(records, canaries), y[canaries],
                            settings(), **kw)
    in_memory = canary_audit(x[train], y[train], x[canaries], y[canaries], settings(), **kw)
    assert 0 < records.largest_read <= 1024
    np.testing.assert_array_equal(streamed.included, in_memory.included)
    np.testing.assert_allclose(streamed.scores, in_memory.scores, rtol=1e-6)


def test_loss_and_dcr_on_a_view_read_batches(pool):
    x, y = pool
    records = CountingRecords(x)
    view = RecordView(records, np.arange(N)[::-1])  # any order of the site's rows
    reversed_x, reversed_y = np.ascontiguousarray(x[::-1]), np.ascontiguousarray(y[::-1])
    model = train_classifier(x[:100], y[:100], 2, TrainSettings(epochs=1, width=8), seed=0)
    np.testing.assert_allclose(loss_attack(model, view, reversed_y), loss_attack(model, reversed_x, reversed_y),
                               rtol=1e-6)
    np.testing.assert_allclose(dcr_attack(x[:7], view), dcr_attack(x[:7], reversed_x), rtol=1e-12)
    assert 0 < records.largest_read <= 1024


def test_take_and_concat_keep_views_unread(pool):
    x, _ = pool
    records = CountingRecords(x)
    a, b = RecordView(records, np.arange(10)), RecordView(records, np.arange(20, 25))
    joined = concat(take(a, np.array([1, 3])), b)
    assert isinstance(joined, RecordView) and records.largest_read == 0
    np.testing.assert_array_equal(joined.rows(slice(None)), x[[1, 3, 20, 21, 22, 23, 24]])
    np.testing.assert_array_equal(concat(x[:2], RecordView(records, np.array([5]))), x[[0, 1, 5]])
    with pytest.raises(ValueError, match="same records array"):
        a.followed_by(RecordView(x, np.arange(3)))
