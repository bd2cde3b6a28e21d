"""DP gradient matching (DC: Zhao, Mopuri & Bilen, ICLR 2021; private variant as in PSG: Chen, Orekondy & Fritz,
NeurIPS 2022).

Per step: a fresh random ConvNet-3 computes, with Opacus, the per-example gradient of the cross-entropy loss of each
record in a Poisson sample of augmented real records. Each record's full gradient (all parameters, flattened) is
normalised to unit norm and summed per class with a private count and Gaussian noise (`mechanism.noisy_class_stats`,
the same mechanism as DM), giving a noisy mean real gradient per class. The synthetic images of each class are then
moved so that the gradient of their own cross-entropy loss points the same way. The paid statistic may drive several
synthetic updates (`inner_steps`), which is post-processing and costs no privacy.

Design notes:
- The distance is the squared L2 between the unit-normalised synthetic gradient and the noisy mean real gradient
  ("l2", the default); DC's layer-wise distance (sum over weight tensors of 1 - cosine per output channel, biases and
  norm parameters ignored) is available as "layer_cos". Digits upsampled to 16x16, ipc 10, 200 steps, width 32,
  best lr of each: without noise they are about equal (layer_cos 0.89, l2 0.88 test accuracy); at epsilon 10 l2 keeps
  0.83 while layer_cos drops to 0.67 (the per-channel cosines amplify the noise in channels with little signal).
  The l2 loss has small image gradients: lr 1-3 works (1.0 is the config default).
- Per-example gradients are computed in fp32 (bf16 autocast changes their direction too much) in chunks of at most
  `GRAD_SAMPLE_FLOATS` floats of per-example gradients, written into one [B, P] buffer: memory is B * P floats
  (about 320 MB for a width-128 net, 28x28 images and 256 records) plus one chunk's activations.
- The matching network is a private copy with trainable parameters and out-of-place ReLUs (Opacus's backward hooks
  forbid in-place ops on hooked outputs); the broadcast global model (FedDM rounds) is never modified.
- Images must be large enough for ConvNet-3: at 8x8 the last instance norm sees a 2x2 map, a random net's embedding
  is nearly constant and its gradients carry almost no class information (GM stays at chance on raw 8x8 digits).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from medfdd.distill.base import Distiller, DistillState
from medfdd.distill.mechanism import NoisyClassStats, Rng, noisy_class_stats
from medfdd.nets import model_chunk, quiet_backward_hooks

GRAD_SAMPLE_FLOATS = 2**24  # per-example gradient floats held by Opacus per chunk (64 MB in fp32)
MAX_CHUNK = 256
Distance = Literal["l2", "layer_cos"]


def trainable_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` whose parameters require grad (ConvNet's ReLUs are out of place: Opacus-compatible)."""
    net = copy.deepcopy(net)
    for p in net.parameters():
        p.requires_grad_(True)
    return net.eval()


def per_example_gradients(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
    """[B, P]: row i is the gradient of cross_entropy(net(x[i]), y[i]) w.r.t. all parameters of `net`, flattened and
    concatenated in `net.parameters()` order. Computed by Opacus's GradSampleModule, `chunk` records at a time."""
    params = [p for p in net.parameters()]
    if any(not p.requires_grad for p in params):
        raise ValueError("per_example_gradients needs a network whose parameters require grad: use trainable_copy")
    n_params = sum(p.numel() for p in params)
    out = torch.zeros(len(x), n_params, device=x.device)
    if len(x) == 0:
        return out
    chunk = chunk or max(1, min(MAX_CHUNK, GRAD_SAMPLE_FLOATS // n_params,  # volumes: their activations, too
                                model_chunk(net, tuple(x.shape[1:]), backward=True)))
    was_training = net.training
    net.train()  # Opacus captures activations only in training mode (ConvNet-3 has no mode-dependent layer)
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum")
    try:
        for start in range(0, len(x), chunk):
            xb, yb = x[start:start + chunk].float(), y[start:start + chunk]
            gsm.zero_grad(set_to_none=True)
            with quiet_backward_hooks():
                F.cross_entropy(gsm(xb), yb, reduction="sum").backward()
            col = 0
            for p in params:
                k = p.numel()
                out[start:start + len(xb), col:col + k] = p.grad_sample.reshape(len(xb), k)
                col += k
    finally:
        gsm.zero_grad(set_to_none=True)
        gsm._close()  # removes the hooks and grad_sample attributes; `net` is a plain module again
        net.train(was_training)
    return out


def class_gradient_stats(net: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, clip_norm: float,
                         noise_multiplier: float, generator: Rng,
                         chunk: int | None = None) -> NoisyClassStats:
    """The released statistic of one step for the (already sampled and augmented) records x, y: per-class noisy sums
    of unit-normalised per-example gradients scaled to c_feat, plus private counts (noise_multiplier 0 = exact)."""
    grads = per_example_gradients(net, x, y, chunk=chunk)
    return noisy_class_stats(grads, y, num_classes, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                             generator=generator)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp(min=1e-12)


def layer_cos_distance(grads: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """DC's distance: sum over weight tensors of sum over output channels of 1 - cos(syn, real); 1-D params ignored."""
    total = grads[0].new_zeros(())
    col = 0
    for g in grads:
        k = g.numel()
        if g.dim() > 1:
            gs = g.reshape(g.shape[0], -1)
            gr = target[col:col + k].reshape(g.shape[0], -1)
            cos = (gs * gr).sum(1) / (gs.norm(dim=1) * gr.norm(dim=1) + 1e-6)
            total = total + (1 - cos).sum()
        col += k
    return total


def l2_distance(grads: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Squared L2 between the unit-normalised flattened synthetic gradient and the noisy mean real gradient."""
    return ((_unit(torch.cat([g.reshape(-1) for g in grads])) - target) ** 2).sum()


DISTANCES = {"l2": l2_distance, "layer_cos": layer_cos_distance}


class GradientMatching(Distiller):
    def __init__(self, *args, distance: Distance = "l2", **kwargs):
        super().__init__(*args, **kwargs)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {distance!r}")
        self.distance = distance

    def real_statistic(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int) -> NoisyClassStats:
        """Poisson sample (rate q), augment, per-example gradients, Gaussian mechanism. Nothing else of x, y is used."""
        idx = self.poisson_sample(len(x), t).to(x.device)
        xb = self.augment(x[idx], self.g(t, "augment_real"))
        return class_gradient_stats(net, xb, y[idx], self.num_classes, clip_norm=self.plan.clip_norm,
                                    noise_multiplier=self.plan.noise_multiplier, generator=self.mechanism_rng(t, "noise"))

    def step(self, state: DistillState, x: torch.Tensor, y: torch.Tensor, t: int) -> float:
        net = trainable_copy(self.network(t))
        stats = self.real_statistic(net, x, y, t)
        state.add_counts(stats.counts)
        target, usable = stats.means()
        classes = [k for k in range(self.num_classes) if bool(usable[k])]
        if not classes:
            return 0.0
        params = list(net.parameters())
        members = {k: (state.labels == k).nonzero().squeeze(1) for k in classes}
        dist = DISTANCES[self.distance]
        g_syn = self.g(t, "augment_syn")
        loss_value = 0.0
        for _ in range(self.cfg.updates_per_statistic):
            loss = state.images.new_zeros(())
            for k in classes:
                xs = self.augment(state.images[members[k]], g_syn)
                ce = F.cross_entropy(net(xs), state.labels[members[k]])
                grads = torch.autograd.grad(ce, params, create_graph=True)
                loss = loss + dist(list(grads), target[k])
            self.sgd_update(state, loss)
            loss_value = float(loss.detach())
        return loss_value
