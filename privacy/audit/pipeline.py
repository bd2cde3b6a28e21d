"""The audited pipeline, rerun in memory at the site: distill a record set (DP or not) and train a classifier on
the synthetic set (plus, optionally, the other sites' released synthetic sets, as the coordinator would).

Shadow pipelines (LiRA) and canary runs call this with the audited release's own mechanism (`mechanism`: the
noise multiplier, sample rate and steps of its ledger charge, not recalibrated for the shadow's record set), its
round's seed stream, warm start (the site's previous release) and matching network (the broadcast global model): the
shadows then differ from the audited run only in their records and noise draws. Nothing is charged to the site's
ledger and nothing leaves the site: these runs exist only to measure the audited one. Without `mechanism` (unit
tests) the noise is calibrated by Opacus (`privacy.accounting.calibrate_noise`) to `epsilon` at this record set's
sample rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from medfdd.config import DistillConfig
from medfdd.data.records import RecordView
from medfdd.distill import create_distiller
from medfdd.distill.base import PrivacyPlan, WarmStart
from medfdd.nets import Classifier
from medfdd.training import TrainSettings, as_tensor, train_classifier
from privacy.accounting import calibrate_noise, epsilon_for


@dataclass(frozen=True)
class PipelineSettings:
    """Everything that determines one pipeline run except the records and the seed."""

    distill: DistillConfig
    train: TrainSettings
    num_classes: int
    epsilon: float  # per-round budget; math.inf = non-private (--no-dp)
    delta: float
    accountant: str = "rdp"
    mechanism: PrivacyPlan | None = None  # the audited release's (sigma, q, steps, clip), replayed as is
    round_: int = 1  # the audited round (its seed stream)
    matching_net: Classifier | None = None  # the model broadcast for that round (rounds >= 2, FedDM)
    start: WarmStart | None = None  # the site's previous release, when that round warm-started from it

    @property
    def dp(self) -> bool:
        return math.isfinite(self.epsilon)


@dataclass
class PipelineOutput:
    synthetic_images: np.ndarray
    synthetic_labels: np.ndarray
    model: Classifier | None
    epsilon_accounted: float  # what Opacus accounts for this run (inf without DP)
    noise_multiplier: float
    sample_rate: float
    steps: int = 0


def privacy_plan(settings: PipelineSettings, n_records: int) -> PrivacyPlan:
    """The replayed mechanism when given (whatever `n_records`: the audited site published its q), else a plan
    calibrated for `n_records` as a fresh site would."""
    if settings.mechanism is not None:
        return settings.mechanism
    cfg = settings.distill
    q = cfg.sample_rate_for(n_records, settings.num_classes)  # as the site runner samples
    if not settings.dp:
        return PrivacyPlan(False, 0.0, q, cfg.iterations, cfg.clip_norm)
    sigma = calibrate_noise(epsilon=settings.epsilon, delta=settings.delta, sample_rate=q, steps=cfg.iterations,
                            accountant=settings.accountant)
    return PrivacyPlan(True, sigma, q, cfg.iterations, cfg.clip_norm)


def run_pipeline(images: np.ndarray | RecordView, labels: np.ndarray, settings: PipelineSettings, *, seed: int,
                 context: tuple[np.ndarray, np.ndarray] | None = None, train_model: bool = True,
                 device: torch.device | None = None) -> PipelineOutput:
    """Distill (`images`, `labels`) with the run's distiller, then train a ConvNet-3 on the synthetic set
    concatenated with `context` (other sites' synthetic sets). `seed` drives both stages."""
    device = device or torch.device("cpu")
    plan = privacy_plan(settings, len(images))
    distiller = create_distiller(
        settings.distill, plan, num_classes=settings.num_classes, image_shape=tuple(images.shape[1:]), seed=seed,
        round_=settings.round_, device=device, matching_net=settings.matching_net, start=settings.start)
    records = images if isinstance(images, RecordView) else as_tensor(images)  # a view is read by index
    state = distiller.run(records, as_tensor(labels, dtype=torch.long))
    syn_x = state.result().cpu().numpy().astype(np.float32)
    syn_y = state.labels.cpu().numpy().astype(np.int64)
    model = None
    if train_model:
        x, y = syn_x, syn_y
        if context is not None and len(context[0]):
            x, y = np.concatenate([syn_x, context[0]]), np.concatenate([syn_y, context[1]])
        model = train_classifier(x, y, settings.num_classes, settings.train, seed=seed, device=device)
    eps = (epsilon_for([(plan.noise_multiplier, plan.sample_rate, plan.steps)], delta=settings.delta,
                       accountant=settings.accountant) if plan.dp else math.inf)
    return PipelineOutput(syn_x, syn_y, model, eps, plan.noise_multiplier, plan.sample_rate, plan.steps)
