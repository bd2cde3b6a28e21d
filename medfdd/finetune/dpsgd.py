"""Local DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1) for the hybrid
mode's fine-tuning rounds.

Each step: a Poisson sample of the site's records (each independently with probability q, compared against float64
uniforms from the site's keyed generator); per-example gradients by Opacus's GradSampleModule
(`gradient_matching.per_example_gradients`); each clipped to L2 norm C with Opacus's factor min(1, C / (|g| + 1e-6));
summed; Gaussian noise N(0, (sigma C)^2) on every coordinate, drawn and added in float64 (torch's float32 sampler
never exceeds |z| = 5.77: the missing tail would be output only a neighbouring data set can produce); divided by the
expected batch q n~ (Opacus's normalisation, n~ the site's DP record count, never the raw n); an SGD step with
momentum 0.9 (as `medfdd.baselines.fedavg`). Accounted as `steps` compositions of the Poisson-subsampled Gaussian
mechanism (the sampled gradient sum has sensitivity C under adding or removing one record).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medfdd.data.records import RecordView
from medfdd.distill.base import seeded_generator
from medfdd.distill.gradient_matching import per_example_gradients, trainable_copy
from medfdd.distill.mechanism import standard_normal, uniforms
from medfdd.nets import Classifier

SAMPLE_STREAM, NOISE_STREAM = 0x66740001, 0x66740002  # "ft": apart from distillation's and the record count's streams
MOMENTUM = 0.9


@dataclass(frozen=True)
class DPSGDPlan:
    """What is charged (noise_multiplier, sample_rate, steps) and how it runs (clip_norm, expected_batch = q n~)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    expected_batch: float


def keyed_generator(seed: int, round_: int, stream: int) -> torch.Generator:
    """A torch generator for one fine-tuning round and stream of the site's keyed seed (`noise_key.keyed_seed`)."""
    return seeded_generator(seed, round_, stream)


def poisson_sample(n: int, q: float, g: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: record i when its float64 uniform is below q (the distillation's sampler)."""
    return (uniforms(n, g) < q).nonzero().squeeze(1)


def gaussian_noise(size: int, std: float, g: torch.Generator) -> torch.Tensor:
    """float64 N(0, std^2) on the CPU from 53-bit uniforms (the distillation's sampler: the tail is not cut at
    5.77 as float32 Box-Muller's is)."""
    return std * standard_normal((size,), g)


def dp_sgd(model: Classifier, x: torch.Tensor | RecordView, y: torch.Tensor, plan: DPSGDPlan, *, lr: float, seed: int, round_: int,
           device: torch.device, on_step: Callable[[int], None] | None = None) -> Classifier:
    """`plan.steps` DP-SGD steps on a copy of `model` over the records (x, y; a `RecordView` is read by index, so only
    each step's Poisson sample is in memory); returns the trained copy (eval mode).
    `noise_multiplier` 0 (the --no-dp baseline) adds no noise."""
    net = trainable_copy(model).to(device)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    g_sample = keyed_generator(seed, round_, SAMPLE_STREAM)
    g_noise = keyed_generator(seed, round_, NOISE_STREAM)
    x, y = x.to(device), y.to(device)
    n_params = sum(p.numel() for p in params)
    std = plan.noise_multiplier * plan.clip_norm
    for t in range(plan.steps):
        idx = poisson_sample(len(x), plan.sample_rate, g_sample).to(device)
        grads = per_example_gradients(net, x[idx], y[idx])  # [B, P], fp32
        factor = (plan.clip_norm / (grads.norm(dim=1) + 1e-6)).clamp(max=1.0)
        total = (factor @ grads).to("cpu", torch.float64)  # the clipped sum, sensitivity C
        if std > 0:
            total = total + gaussian_noise(n_params, std, g_noise)
        update = (total / plan.expected_batch).to(device, torch.float32)
        col = 0
        for p in params:
            p.grad = update[col:col + p.numel()].view_as(p).clone()
            col += p.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(t + 1)
    return net.eval()
