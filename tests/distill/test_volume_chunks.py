"""Memory-aware batches for volumes (`nets.records_per_chunk`): the chunk size follows the record size, and chunking
changes no result (the real statistic, a synthetic update, training and prediction agree with one-shot batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medfdd.nets as nets
from medfdd.config import DistillConfig
from medfdd.distill.base import PrivacyPlan
from medfdd.distill.distribution_matching import DistributionMatching, MatchTarget
from medfdd.nets import convnet_for, records_per_chunk
from medfdd.training import TrainSettings, predict_proba, train_classifier

SHAPE = (1, 8, 8, 8)


def test_chunk_size_follows_the_record_size():
    for backward in (False, True):  # 2D sites keep the batches they always ran with, training included
        assert records_per_chunk((1, 28, 28), 128, backward=backward) == 256
    assert records_per_chunk((1, 64, 64, 64), 128) == 8  # a 64^3 volume's first activation is 128 MiB
    assert records_per_chunk((1, 64, 64, 64), 128, backward=True) == 2
    assert records_per_chunk((1, 64, 64, 64), 32) == 32
    assert records_per_chunk((1, 128, 128, 128), 128) == 1  # larger than the budget: alone, never 0
    assert records_per_chunk((1, 64, 64, 64), 32, budget=256 << 20) == 8


def _volumes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand((n, *SHAPE), generator=g)
    x[y == 1, :, :4] += 0.5  # a class signal in the upper half of the volume
    return x.clamp(0, 1), y


def _distiller(**cfg) -> DistributionMatching:
    return DistributionMatching(DistillConfig(ipc=3, iterations=2, width=8, lr=1.0, allocation="uniform", **cfg),
                                PrivacyPlan(True, 1.0, 1.0, 2, 1.0), num_classes=2, image_shape=SHAPE, seed=0)


def _tiny_budget(monkeypatch) -> None:
    """One record per chunk (with or without a backward pass), as a 128^3 volume would get."""
    monkeypatch.setattr(nets, "ACTIVATION_BUDGET", 1)


def _counting(net, calls: list[int]):
    embed = net.embed
    net.embed = lambda x: calls.append(len(x)) or embed(x)
    return net


def test_the_real_statistic_is_the_same_in_chunks(monkeypatch):
    x, y = _volumes(20)
    d = _distiller(augment=False)  # augmentation draws per-record parameters chunk by chunk: a different stream
    whole_calls, chunk_calls = [], []
    whole = d.real_statistic(_counting(d.network(0), whole_calls), x, y, 0)
    _tiny_budget(monkeypatch)
    chunked = d.real_statistic(_counting(d.network(0), chunk_calls), x, y, 0)
    assert len(whole_calls) == 1 and chunk_calls == [1] * 20
    torch.testing.assert_close(chunked.sums, whole.sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.counts, whole.counts)


@pytest.mark.parametrize("family", [None, "crop"])
def test_a_synthetic_update_is_the_same_in_chunks(monkeypatch, family):
    """The chunked update (features without a graph, then each chunk back-propagated) moves the images as the
    one-shot update does, through the augmentation too."""
    d = _distiller()
    net = d.network(0)
    target = torch.rand(2, net.embed_dim, generator=torch.Generator().manual_seed(1))
    usable = torch.tensor([True, True])
    center = d.center(net, d.init_state().images)

    def update(calls: list[int]) -> tuple[torch.Tensor, float]:
        state = d.init_state()
        loss = d.match(state, [MatchTarget(_counting(net, calls), target, usable, center, family)],
                       torch.Generator().manual_seed(2))
        del net.embed  # the class method again
        return state.images.detach(), loss

    whole_calls, chunk_calls = [], []
    images, loss = update(whole_calls)
    _tiny_budget(monkeypatch)
    chunked, chunked_loss = update(chunk_calls)
    assert whole_calls == [6] and len(chunk_calls) == 12  # 6 without a graph, then 6 again with one
    assert not torch.equal(images, d.init_state().images)  # the update moved the images
    assert chunked_loss == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(chunked, images, atol=1e-5, rtol=1e-5)


def test_training_and_prediction_are_the_same_in_micro_batches(monkeypatch):
    x, y = _volumes(24, seed=3)
    settings = TrainSettings(epochs=2, lr=0.05, batch_size=12, width=8, augment=False)
    weights = np.linspace(0.5, 1.5, 24).astype(np.float32)

    def run() -> tuple[dict, np.ndarray]:
        model = train_classifier(x.numpy(), y.numpy(), 2, settings, seed=0, device=torch.device("cpu"),
                                 weights=weights)
        return {k: v.clone() for k, v in model.state_dict().items()}, predict_proba(model, x.numpy())

    state, proba = run()
    _tiny_budget(monkeypatch)
    assert nets.model_chunk(convnet_for(SHAPE, 2, width=8), SHAPE, backward=True) == 1
    micro_state, micro_proba = run()
    assert not torch.equal(state["classifier.weight"], convnet_for(SHAPE, 2, width=8, seed=0).classifier.weight)
    for k in state:
        torch.testing.assert_close(micro_state[k], state[k], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(micro_proba, proba, atol=1e-5)
