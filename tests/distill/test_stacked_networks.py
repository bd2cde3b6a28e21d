"""Several matching networks per synthetic update (`distill.networks_per_update`, `nets.stacked`): the grouped network
computes what each network computes alone, an update over stacked networks moves the images as the same update over
the networks one by one, and the option is post-processing only (the paid bank does not change)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import medfdd.nets as nets
from medfdd.config import DistillConfig
from medfdd.distill.base import PrivacyPlan
from medfdd.distill.distribution_matching import DistributionMatching, MatchTarget
from medfdd.nets import convnet_for
from medfdd.nets.stacked import Alone, Stacked, stack_networks


class _Unstackable(nn.Module):
    """The same function as `net`, hidden behind a type `stack_networks` must evaluate alone."""

    def __init__(self, net):
        super().__init__()
        self.inner = net
        self.arch = net.arch

    def embed(self, x):
        return self.inner.embed(x)


@pytest.mark.parametrize("shape", [(2, 12, 12), (1, 6, 6, 6)])
def test_the_stacked_network_computes_each_network(shape):
    group = [convnet_for(shape, 3, width=8, seed=s) for s in range(3)]
    xs = torch.rand(3, 5, *shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    stacked = Stacked(group)
    assert stacked.arch["width"] == 24
    out = stacked.embed(xs)
    alone = torch.stack([n.embed(xs[i]) for i, n in enumerate(group)])
    assert out.shape == (3, 5, group[0].embed_dim)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    (g_stacked,) = torch.autograd.grad((out * w).sum(), xs)
    (g_alone,) = torch.autograd.grad((alone * w).sum(), xs)
    torch.testing.assert_close(g_stacked, g_alone, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out[0], out[1])  # different networks: different features


def test_networks_are_grouped_by_architecture():
    a, b = convnet_for((1, 8, 8), 2, width=8, seed=0), convnet_for((1, 8, 8), 2, width=8, seed=1)
    wide = convnet_for((1, 8, 8), 2, width=16, seed=2)
    odd = _Unstackable(convnet_for((1, 8, 8), 2, width=8, seed=3))
    groups = stack_networks([a, wide, odd, b, wide])
    kinds = [(type(net).__name__, idx) for net, idx in groups]
    assert kinds == [("Stacked", [0, 3]), ("Stacked", [1, 4]), ("Alone", [2])]
    single = stack_networks([a])
    assert isinstance(single[0][0], Alone) and single[0][1] == [0]  # one network: exactly its own computation
    with pytest.raises(ValueError, match="one architecture"):
        Stacked([a, wide])


def _distiller(shape=(1, 10, 10), **cfg) -> DistributionMatching:
    return DistributionMatching(DistillConfig(ipc=3, iterations=4, width=8, lr=1.0, batch_size=40,
                                              allocation="uniform", **cfg),
                                PrivacyPlan(True, 1.0, 0.5, 4, 1.0), num_classes=2, image_shape=shape, seed=0)


def _targets(d: DistributionMatching, wrap=lambda n: n) -> list[MatchTarget]:
    state = d.init_state()
    out = []
    for t in range(3):
        net = d.network(t)
        center = d.center(net, state.images)
        mean = torch.rand(2, net.embed_dim, generator=torch.Generator().manual_seed(t))
        out.append(MatchTarget(wrap(net), mean, torch.tensor([True, t != 1]), center, ("crop", None, "color")[t]))
    return out


@pytest.mark.parametrize("tiny_chunks", [False, True])
def test_an_update_over_stacked_networks_is_the_update_over_each(monkeypatch, tiny_chunks):
    """Three targets in one update: through one grouped network, or each network alone, the loss (the mean of the
    three matching losses) and the moved images agree; with one record per chunk (volumes) too."""
    shape = (1, 8, 8, 8) if tiny_chunks else (1, 10, 10)
    d = _distiller(shape)
    if tiny_chunks:
        monkeypatch.setattr(nets, "ACTIVATION_BUDGET", 1)

    def update(targets) -> tuple[torch.Tensor, float]:
        state = d.init_state()
        loss = d.match(state, targets, torch.Generator().manual_seed(7))
        return state.images.detach(), loss

    stacked_images, stacked_loss = update(_targets(d))
    alone_images, alone_loss = update(_targets(d, _Unstackable))
    single = [update([t])[1] for t in _targets(d)]
    assert not torch.equal(stacked_images, d.init_state().images)
    assert stacked_loss == pytest.approx(alone_loss, rel=1e-5)
    torch.testing.assert_close(stacked_images, alone_images, atol=1e-5, rtol=1e-5)
    # the mean of the three losses (the augmentation stream advances per target, so only the first is the same draw)
    assert single[0] != pytest.approx(stacked_loss, rel=1e-3)
    assert stacked_loss > 0


def test_networks_per_update_is_post_processing():
    """G statistics per update: the paid bank is the same (nothing paid changes; its G networks evaluated together,
    each step on its own Poisson sample, padded to the longest), the run makes iterations x
    inner_steps / G updates (as many network evaluations as with one), each moving the images. Whether fewer,
    averaged updates distil as well is a benchmark question (benchmarks/stacked_networks.py)."""
    x = torch.rand(200, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(200) % 2
    banks, runs = {}, {}
    for per_update in (1, 4):
        d = _distiller(inner_steps=5, networks_per_update=per_update)
        banks[per_update] = d.bank(x, y, d.init_state().images.detach())
        assert d.updates == -(-4 * 5 // per_update)
        runs[per_update] = d.run(x, y)
        assert runs[per_update].iteration == 4 + d.updates and len(runs[per_update].losses) == d.updates
    for a, b in zip(banks[1].sums, banks[4].sums, strict=True):  # the bank's 4 networks evaluated together
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(banks[1].pooled_counts, banks[4].pooled_counts)
    assert banks[1].families == banks[4].families
    for state in runs.values():
        assert all(loss > 0 for _, loss in state.losses) and torch.isfinite(state.result()).all()
    assert not torch.equal(runs[1].result(), runs[4].result())  # other updates: other images


def test_networks_per_update_with_the_broadcast_global_model():
    """FedDM rounds: every other statistic is the global model's (another width): it is evaluated beside the
    stacked random networks."""
    x = torch.rand(120, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    y = torch.arange(120) % 2
    d = DistributionMatching(DistillConfig(ipc=2, iterations=4, width=8, inner_steps=3, networks_per_update=3,
                                           batch_size=40, allocation="uniform"),
                             PrivacyPlan(True, 1.0, 0.5, 4, 1.0), num_classes=2, image_shape=(1, 10, 10), seed=0,
                             round_=2, matching_net=convnet_for((1, 10, 10), 2, width=16, seed=9))
    state = d.run(x, y)
    assert d.updates == 4 and torch.isfinite(state.result()).all()
    assert not torch.equal(state.result(), d.init_state().images)


def test_networks_per_update_needs_the_decoupled_schedule():
    with pytest.raises(ValidationError, match="networks_per_update"):
        DistillConfig(networks_per_update=2, schedule="interleaved")
    with pytest.raises(ValidationError, match="networks_per_update"):
        DistillConfig(networks_per_update=2, method="gm")
    assert DistillConfig(networks_per_update=8).networks_per_update == 8


@pytest.mark.parametrize("tiny_chunks", [False, True])
def test_paid_statistics_evaluated_together_are_each_step_alone(monkeypatch, tiny_chunks):
    """The bank's stacked evaluation: three steps' Poisson samples (of different sizes, so the shorter are padded)
    through one grouped network give each step's release as computed alone, in chunks too (volumes)."""
    shape = (1, 8, 8, 8) if tiny_chunks else (1, 10, 10)
    d = _distiller(shape)
    if tiny_chunks:
        monkeypatch.setattr(nets, "ACTIVATION_BUDGET", 1)
    x = torch.rand(40, *shape, generator=torch.Generator().manual_seed(3))
    y = torch.arange(40) % 2
    steps = [0, 1, 2]
    assert len({len(d.poisson_sample(40, t)) for t in steps}) > 1  # padding happens
    state = d.init_state()
    group = [d.network(t) for t in steps]
    centers = [d.center(net, state.images) for net in group]
    together = d.real_statistics(group, x, y, steps, centers, ["crop", None, "color"])
    alone = [d.real_statistic(d.network(t), x, y, t, centers[t], ("crop", None, "color")[t]) for t in steps]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a.sums, b.sums, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.counts, b.counts)
    assert not torch.allclose(together[0].sums, together[1].sums)
