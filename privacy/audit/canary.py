"""Canary audit in one run (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023).

m canaries (records of the site's audit holdout, which the audited run never saw; or the same records with a wrong
label, a stronger, out-of-distribution canary) are each added to the training records independently with
probability 1/2; the pipeline runs once; every canary is scored against the released artifact. The guesses give the
one-run epsilon lower bound (`metrics.one_run_lower_bound`) and, reading each canary as a trial, a Clopper-Pearson
bound (Jagielski et al. 2020). The run replays the audited release's mechanism (`PipelineSettings.mechanism`: its
noise multiplier, sample rate and steps, whatever the m/2 added canaries do to the record count); its accounted
epsilon (Opacus) sits next to the bounds, and each bound carries its power (`max_certifiable`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfdd.data.records import RecordView, concat, take
from privacy.audit.attacks import target_statistic
from privacy.audit.metrics import EpsilonBound, clopper_pearson_lower_bound, one_run_lower_bound
from privacy.audit.pipeline import PipelineSettings, run_pipeline


@dataclass
class CanaryOutcome:
    scores: np.ndarray
    included: np.ndarray
    one_run: EpsilonBound | None  # None when every canary fell on one side (nothing to compare)
    clopper_pearson: EpsilonBound | None
    epsilon_accounted: float
    kind: str
    target: str
    mechanism: tuple[float, float, int] = (0.0, 0.0, 0)  # (noise multiplier, sample rate, steps) the run used


def canary_audit(train_images: np.ndarray | RecordView, train_labels: np.ndarray, canary_images: np.ndarray | RecordView,
                 canary_labels: np.ndarray, settings: PipelineSettings, *, target: str, kind: str, seed: int,
                 delta: float, confidence: float, context: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> CanaryOutcome:
    rng = np.random.default_rng([seed, 7])
    labels = canary_labels.copy()
    if kind == "mislabeled":  # a wrong class, uniformly among the others
        shift = rng.integers(1, settings.num_classes, size=len(labels))
        labels = (labels + shift) % settings.num_classes
    included = rng.random(len(labels)) < 0.5
    x = concat(train_images, take(canary_images, np.flatnonzero(included)))  # views stay views: read by index
    y = np.concatenate([train_labels, labels[included]])
    out = run_pipeline(x, y, settings, seed=seed * 1000 + 3, context=context, train_model=target == "global_model")
    scores = target_statistic(target, out, canary_images, labels)
    both_sides = included.any() and not included.all()
    return CanaryOutcome(
        scores=scores, included=included,
        one_run=one_run_lower_bound(scores, included, delta=delta, confidence=confidence) if both_sides else None,
        clopper_pearson=clopper_pearson_lower_bound(scores, included, delta=delta, confidence=confidence, seed=seed)
        if both_sides else None,
        epsilon_accounted=out.epsilon_accounted, kind=kind, target=target,
        mechanism=(out.noise_multiplier, out.sample_rate, out.steps))
