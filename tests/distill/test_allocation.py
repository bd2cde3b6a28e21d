"""`distill.allocation: evidence`: a site shares its ipc x classes images by its released class evidence.

The allocation is post-processing of DP outputs (the noisy class counts the ledger paid for), never of the true
counts, and the coordinator can recompute it from the offer's own metadata.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from medfdd.config import DistillConfig
from medfdd.distill.base import PrivacyPlan, evidence_allocation
from medfdd.distill.distribution_matching import DistributionMatching


@pytest.mark.parametrize("evidence, rate, total, expected", [
    ([30.0, 10.0, 0.0, 0.0], 1.0, 8, [6, 2, 0, 0]),  # exact quotas
    ([5.0, 5.0, 5.0], 1.0, 10, [4, 3, 3]),  # 3.33 each: the one left over goes to the lowest index
    ([100.0, 0.5, 50.0], 0.01, 6, [6, 0, 0]),  # 0.5 and 50 records x 0.01 < 1 expected record per step: none
    ([-40.0, 10.0, 30.0], 1.0, 4, [0, 1, 3]),  # a negative noisy estimate counts as nothing
    ([0.2, 0.3], 1.0, 10, [5, 5]),  # no class qualifies: equal shares
    ([1.0, 2.0, 3.0, 4.0], 1.0, 7, [1, 1, 2, 3]),  # quotas 0.7 1.4 2.1 2.8: floors 0 1 2 2, remainders to 0 and 3
])
def test_hand_computed_allocations(evidence, rate, total, expected):
    assert evidence_allocation(evidence, rate, total) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e4, 1e6, allow_nan=False), min_size=1, max_size=12), st.floats(1e-3, 1.0),
       st.integers(1, 500))
def test_allocation_spends_exactly_the_total_within_one_of_each_quota(evidence, rate, total):
    counts = evidence_allocation(evidence, rate, total)
    assert sum(counts) == total and min(counts) >= 0
    usable = [v if v * rate >= 1.0 else 0.0 for v in evidence]
    if sum(usable) > 0:
        for n, v in zip(counts, usable, strict=True):
            assert math.floor(v / sum(usable) * total) <= n <= math.ceil(v / sum(usable) * total)


def _imbalanced(n_per_class: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(n_per_class)])
    x = (torch.rand(len(y), 1, 8, 8, generator=g) * 0.2 + y.view(-1, 1, 1, 1) / len(n_per_class)).clamp(0, 1)
    return x, y


def _run(dp: bool, sigma: float, counts: list[int]):
    cfg = DistillConfig(ipc=3, iterations=6, batch_size=120, width=8, inner_steps=1, allocation="evidence")
    q = 120 / sum(counts)
    d = DistributionMatching(cfg, PrivacyPlan(dp, sigma, q, cfg.iterations, 1.0), num_classes=len(counts),
                             image_shape=(1, 8, 8), seed=3)
    x, y = _imbalanced(counts)
    return d, d.run(x, y), q


def test_without_noise_the_images_follow_the_class_counts_and_an_absent_class_gets_none():
    counts = [300, 100, 0, 200]
    d, state, q = _run(False, 0.0, counts)
    got = torch.bincount(state.labels, minlength=4).tolist()
    assert got[2] == 0 and sum(got) == 12
    assert got[0] > got[3] > got[1]


def test_under_dp_the_labels_come_from_the_released_evidence_not_the_true_counts():
    counts = [300, 100, 20, 200]
    d, state, q = _run(True, 8.0, counts)
    released = d.class_evidence(state)
    got = torch.bincount(state.labels, minlength=4).tolist()
    assert got == evidence_allocation(released, q, 12)  # the coordinator recomputes exactly this
    assert got != evidence_allocation([float(c) for c in counts], q, 12)  # heavy noise moved it off the truth


@pytest.mark.parametrize("change", [{"schedule": "interleaved"}, {"method": "gm"}])
def test_evidence_allocation_needs_the_decoupled_dm_bank(change):
    with pytest.raises(ValidationError, match="allocation"):
        DistillConfig(allocation="evidence", **change)
