"""The distiller interface: fit a site's training records, yield a synthetic set (DP or not).

Every step t draws its randomness (matching network, Poisson sample, augmentation, noise) from generators seeded
by (seed, round, t, stream), so a run resumed from a checkpoint replays exactly what the uninterrupted run does.
Under `noise_source: secure` the mechanism's own draws (Poisson sample and noise) come from the operating system
instead (`mechanism.SECURE`) and are never replayed. Under DP the synthetic images start from noise (never from
real records).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medfdd.augment import FAMILIES, augment
from medfdd.config import DistillConfig
from medfdd.distill.mechanism import SECURE, Rng, uniforms
from medfdd.nets import Classifier, convnet_for

STREAMS = {"net": 0, "sample": 1, "augment_real": 2, "augment_syn": 3, "noise": 4, "init": 5, "pick": 6}


@dataclass(frozen=True)
class PrivacyPlan:
    """What the mechanism runs with; noise_multiplier 0 and dp False only for --no-dp baselines."""

    dp: bool
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    noise_source: str = "keyed"  # `privacy.noise_source`: "keyed" or "secure" (the sample and noise from the OS)


@dataclass(frozen=True)
class WarmStart:
    """A site's own previous-round release (images and their labels) that the next round starts from."""

    images: torch.Tensor  # [K * ipc, C, *spatial]
    labels: torch.Tensor  # [K * ipc]


@dataclass
class DistillState:
    images: torch.Tensor  # [K * ipc, C, *spatial], requires grad
    labels: torch.Tensor  # [K * ipc]
    momentum: torch.Tensor  # SGD momentum buffer of the images
    iteration: int  # units of work completed (of `Distiller.total_work`)
    average: torch.Tensor | None = None  # moving average of the images (what is released, when kept)
    counts_sum: torch.Tensor | None = None  # [K] sum of the released noisy class counts over the paid steps so far
    losses: list[tuple[int, float]] = field(default_factory=list)  # (update, matching loss) of each update so far
    # (interleaved: each paid step's last update); post-processing of released statistics, kept at the site

    def add_counts(self, counts: torch.Tensor) -> None:
        """Keep a paid step's noisy class counts (already released, so their sum is post-processing)."""
        c = counts.detach().float()
        self.counts_sum = c if self.counts_sum is None else self.counts_sum + c

    def result(self) -> torch.Tensor:
        """The synthetic images to release: the moving average when one is kept, else the last iterate."""
        return (self.average if self.average is not None else self.images).detach()


def seeded_generator(*entropy: int) -> torch.Generator:
    """A torch generator seeded by a SeedSequence of `entropy` (the keyed seed first): independent streams per key."""
    state = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def generator(seed: int, round_: int, t: int, stream: str) -> torch.Generator:
    return seeded_generator(seed, round_, t, STREAMS[stream])


def synthetic_labels(num_classes: int, ipc: int | list[int]) -> torch.Tensor:
    """The label of every synthetic image, class by class: [0] * ipc + [1] * ipc + ... (`ipc` a list: that many
    of each class)."""
    return torch.arange(num_classes).repeat_interleave(torch.as_tensor(ipc))


def evidence_allocation(evidence: list[float], sample_rate: float, total: int) -> list[int]:
    """Images per class for `allocation: evidence`: `total` shared in proportion to the released class evidence
    (noisy records per class, `class_evidence` in synthetic.json), a class with under one expected record per paid
    step (evidence x sample_rate < 1, no usable matching target) getting none; largest-remainder (Hamilton)
    apportionment, ties to the lower class index; equal shares when no class qualifies. The coordinator recomputes
    it from the same released numbers to check an offer's labels."""
    e = [v if v * sample_rate >= 1.0 else 0.0 for v in evidence]
    if sum(e) <= 0:
        e = [1.0] * len(evidence)
    whole = sum(e)
    quota = [v / whole * total for v in e]
    counts = [math.floor(v) for v in quota]
    order = sorted(range(len(e)), key=lambda k: (counts[k] - quota[k], k))
    for k in order[:total - sum(counts)]:
        counts[k] += 1
    return counts


def check_warm_start(start: WarmStart, cfg: DistillConfig, num_classes: int, image_shape: tuple[int, ...]) -> None:
    """A warm start must match this round's plan: ipc x classes finite images, labels in range, and (uniform
    allocation) exactly ipc of each class. Raises ValueError naming what differs."""
    n = num_classes * cfg.ipc
    if tuple(start.images.shape) != (n, *image_shape) or not torch.isfinite(start.images).all():
        raise ValueError(f"start images must be finite with shape {(n, *image_shape)}, "
                         f"got {tuple(start.images.shape)}")
    labels = start.labels
    if tuple(labels.shape) != (n,) or labels.is_floating_point() or int(labels.min()) < 0 \
            or int(labels.max()) >= num_classes:
        raise ValueError(f"start labels must be {n} class indices in 0..{num_classes - 1}")
    if cfg.allocation == "uniform" and not torch.equal(labels.cpu().long(), synthetic_labels(num_classes, cfg.ipc)):
        raise ValueError(f"start labels must be {cfg.ipc} of each class in order (allocation uniform)")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds up the real-data embedding here: on CUDA, and on CPUs with native bf16
    (AVX512-BF16 or AMX). Without it (e.g. AVX2 only) bf16 was 10x slower than fp32 (1.0 s vs 10.5 s per 256
    Fashion-MNIST images, width 128, one thread)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if callable(check))


class Distiller(ABC):
    """Template: subclasses implement `step` (one paid noisy statistic + `inner_steps` synthetic updates)."""

    secure_store: tuple[Path, str] | None = None  # (site-local file, release tag): where a secure-noise run keeps
    # paid draws that a resume cannot redraw (decoupled DM: its bank); None: nothing kept, such a resume is refused

    def __init__(self, cfg: DistillConfig, plan: PrivacyPlan, *, num_classes: int, image_shape: tuple[int, ...],
                 seed: int, round_: int = 1, device: torch.device | None = None,
                 matching_net: Classifier | None = None, start: WarmStart | None = None):
        self.cfg, self.plan = cfg, plan
        self.num_classes, self.image_shape = num_classes, tuple(image_shape)
        self.seed, self.round = seed, round_
        self.device = device or torch.device("cpu")
        self.matching_net = matching_net.to(self.device).eval() if matching_net is not None else None
        if start is not None:
            check_warm_start(start, cfg, num_classes, self.image_shape)
        self.start = start
        self.families = (FAMILIES + (("flip",) if cfg.flip else ())) if cfg.augment else ()
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and fast_bf16(self.device))
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    @property
    def total_work(self) -> int:
        """Units of work of a whole run (progress and checkpoints count these): one per paid step here."""
        return self.plan.steps

    def class_evidence(self, state: DistillState) -> list[float] | None:
        """Estimated training records per class, to 2 decimals: the mean released noisy count per paid step over
        the sample rate (post-processing of what the ledger paid for; the true counts are never used). The
        coordinator's `evidence` merge weights each site's images of a class by it. None when no count was
        released."""
        if state.counts_sum is None or self.plan.steps == 0:
            return None
        return [round(v, 2) for v in (state.counts_sum / (self.plan.steps * self.plan.sample_rate)).cpu().tolist()]

    def g(self, t: int, stream: str) -> torch.Generator:
        return generator(self.seed, self.round, t, stream)

    @property
    def secure(self) -> bool:
        return self.plan.noise_source == "secure"

    def mechanism_rng(self, t: int, stream: str) -> Rng:
        """The source of step t's Poisson sample ("sample") or Gaussian noise ("noise"): its keyed generator, or
        the operating system's CSPRNG under `noise_source: secure`."""
        return SECURE if self.secure else self.g(t, stream)

    def init_state(self) -> DistillState:
        """Noise initialisation (invariant 2): N(0.5, 0.2^2) clipped to [0, 1]; no real pixel is used. A warm start
        (rounds >= 2) begins from the site's own previous release instead: DP output, so post-processing that
        costs no privacy (Dwork & Roth 2014, Prop. 2.1), and still no real pixel."""
        if self.start is not None:
            x = self.start.images.detach().to(self.device, torch.float32).clone()
            labels = self.start.labels.to(self.device, torch.long)
        else:
            x = self.noise_images()
            labels = synthetic_labels(self.num_classes, self.cfg.ipc).to(self.device)
        return DistillState(x.requires_grad_(True), labels, torch.zeros_like(x), 0)

    def noise_images(self) -> torch.Tensor:
        """ipc x classes images of N(0.5, 0.2^2) noise clipped to [0, 1] (seeded by step 0's init stream)."""
        n = self.num_classes * self.cfg.ipc
        g = self.g(0, "init")
        return (0.5 + 0.2 * torch.randn((n, *self.image_shape), generator=g)).clamp(0, 1).to(self.device)

    def network(self, t: int) -> Classifier:
        """The matching network of step t: a fresh random ConvNet-3, or (FedDM rounds) the broadcast global model
        on every other step."""
        if self.matching_net is not None and t % 2 == 1:
            return self.matching_net
        seed = int(torch.randint(0, 2**62, (1,), generator=self.g(t, "net")))
        net = convnet_for(self.image_shape, self.num_classes, width=self.cfg.width, seed=seed).to(self.device)
        for p in net.parameters():
            p.requires_grad_(False)
        return net.eval()

    def poisson_sample(self, n: int, t: int) -> torch.Tensor:
        """Indices of a Poisson sample: each record independently with probability sample_rate (a float64 uniform
        below q: a float32 one would realise a rate up to 2^-24 away from the q that was accounted)."""
        mask = uniforms(n, self.mechanism_rng(t, "sample")) < self.plan.sample_rate
        return mask.nonzero().squeeze(1)

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return augment(x, g, self.families)

    def sgd_update(self, state: DistillState, loss: torch.Tensor) -> None:
        """SGD with momentum 0.5 on the images (DM's optimiser), projected back to [0, 1]."""
        (grad,) = torch.autograd.grad(loss, state.images)
        self.sgd_step(state, grad)

    def sgd_step(self, state: DistillState, grad: torch.Tensor) -> None:
        """The same update from the loss's gradient with respect to the images."""
        with torch.no_grad():
            state.momentum.mul_(0.5).add_(grad)
            state.images.sub_(self.cfg.lr * state.momentum).clamp_(0, 1)

    @abstractmethod
    def step(self, state: DistillState, x: torch.Tensor, y: torch.Tensor, t: int) -> float:
        """One paid step: noisy real statistic (index t), then cfg.inner_steps synthetic updates. Returns the loss."""

    def run(self, x: torch.Tensor, y: torch.Tensor, state: DistillState | None = None,
            on_step: Callable[[DistillState, float], None] | None = None) -> DistillState:
        state = state or self.init_state()
        x, y = x.to(self.device), y.to(self.device)
        for t in range(state.iteration, self.plan.steps):  # interleaved: one unit of work = one paid step
            loss = self.step(state, x, y, t)
            state.iteration = t + 1
            state.losses.append((t + 1, loss))
            if on_step:
                on_step(state, loss)
        return state
