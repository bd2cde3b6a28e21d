"""Merge strategies: concat keeps everything, balanced weights equalise classes, redistill is post-processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medfdd.config import CoordinatorConfig
from medfdd.coordinator.merge import class_balanced_weights, evidence_weights, merge
from medfdd.coordinator.validate import AcceptedOffer


def _offer(site: str, labels: list[int], seed: int, evidence: list[float] | None = None) -> AcceptedOffer:
    rng = np.random.default_rng(seed)
    meta = {"epsilon": 1.0, **({"class_evidence": evidence} if evidence is not None else {})}
    return AcceptedOffer(site, rng.uniform(0, 1, (len(labels), 1, 8, 8)).astype(np.float32),
                         np.array(labels, dtype=np.int64), meta, 0)


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


def test_evidence_weights_share_each_class_by_the_sites_estimated_records():
    """Two sites, two images of each of 3 classes each. Class 0: equal evidence; class 1: site a estimates -4
    records (noise below zero, clipped to 0); class 2: nobody has positive evidence (equal shares)."""
    labels = np.array([0, 0, 1, 1, 2, 2] * 2)
    site_of = np.repeat([0, 1], 6)
    evidence = np.array([[100.0, -4.0, 0.0], [100.0, 300.0, 0.0]])
    w = evidence_weights(evidence, site_of, labels, power=1.0)
    assert w.tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 2, 2, 1, 1]  # hand-computed: N_c * share / n
    # power 2 (inverse-variance pooling): evidence 100 vs 300 gives shares 1/10 and 9/10
    w2 = evidence_weights(np.array([[100.0, 0, 0], [300.0, 1, 1]]), site_of, labels, power=2.0)
    assert np.allclose(w2[[0, 6]] / w2.mean(), [4 * 0.1 / 2, 4 * 0.9 / 2])
    # every class keeps the total weight of its images; power 0 is concat
    assert np.allclose(np.bincount(labels, weights=w2), np.bincount(labels))
    assert np.all(evidence_weights(evidence, site_of, labels, power=0.0) == 1)


def test_evidence_merge_uses_the_offers_evidence_and_falls_back_to_weight_one():
    a = _offer("a", [0, 0, 1], 0, evidence=[500.0, 0.0, 3.0])
    b = _offer("b", [0, 1, 1], 1, evidence=[0.0, 80.0, 0.0])
    m = merge([b, a], _cfg("evidence", evidence_power=1.0), num_classes=3, seed=0)
    assert m.labels.tolist() == [0, 0, 1, 0, 1, 1] and not m.note
    assert m.weights.tolist() == [1.5, 1.5, 0, 0, 1.5, 1.5]  # class 0 all from a, class 1 all from b
    silent = _offer("c", [2], 2)  # no class_evidence (e.g. an older site): every image keeps weight 1
    m2 = merge([a, b, silent], _cfg("evidence"), num_classes=3, seed=0)
    assert np.all(m2.weights == 1) and "['c']" in m2.note
