"""Merge strategies: concat keeps everything, balanced weights equalise classes, redistill is post-processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medfdd.config import CoordinatorConfig
from medfdd.coordinator.merge import class_balanced_weights, merge
from medfdd.coordinator.validate import AcceptedOffer


def _offer(site: str, labels: list[int], seed: int) -> AcceptedOffer:
    rng = np.random.default_rng(seed)
    return AcceptedOffer(site, rng.uniform(0, 1, (len(labels), 1, 8, 8)).astype(np.float32),
                         np.array(labels, dtype=np.int64), {"epsilon": 1.0}, 0)


def _cfg(strategy: str, **kw) -> CoordinatorConfig:
    return CoordinatorConfig(sites=[Path("a.yaml")], merge=strategy, output=Path("out"), **kw)


def test_concat_is_the_union_and_independent_of_arrival_order():
    a, b = _offer("a", [0, 0, 1], 0), _offer("b", [1, 2], 1)
    m1 = merge([a, b], _cfg("concat"), num_classes=3, seed=0)
    m2 = merge([b, a], _cfg("concat"), num_classes=3, seed=0)
    assert np.array_equal(m1.images, m2.images) and np.array_equal(m1.labels, m2.labels)
    assert m1.labels.tolist() == [0, 0, 1, 1, 2] and np.all(m1.weights == 1) and m1.sources == ["a", "b"]


def test_balanced_weights_give_every_present_class_the_same_total():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    w = class_balanced_weights(labels)
    totals = [w[labels == c].sum() for c in range(3)]
    assert np.allclose(totals, totals[0]) and np.isclose(w.mean(), 1.0)
    m = merge([_offer("a", labels.tolist(), 0)], _cfg("balanced"), num_classes=4, seed=0)
    assert np.allclose(m.weights, w)


def test_redistill_condenses_the_union_to_the_global_ipc_without_touching_inputs():
    offers = [_offer("a", [0] * 6 + [1] * 6, 0), _offer("b", [1] * 4 + [2] * 8, 1)]
    before = [o.images.copy() for o in offers]
    cfg = _cfg("redistill", redistill={"ipc": 2, "iterations": 3, "batch_size": 8})
    torch.manual_seed(0)
    m = merge(offers, cfg, num_classes=4, seed=0)
    assert np.bincount(m.labels, minlength=4).tolist() == [2, 2, 2, 0]  # class 3 absent from the union: dropped
    assert m.images.shape == (6, 1, 8, 8) and m.images.min() >= 0 and m.images.max() <= 1
    assert all(np.array_equal(o.images, x) for o, x in zip(offers, before, strict=True))
    again = merge(offers, cfg, num_classes=4, seed=0)
    assert np.array_equal(again.images, m.images)  # seeded
