"""Membership-inference attacks. Each returns one score per audited record (higher = "member").

- loss threshold (Yeom et al., CSF 2018): the target model's negative loss.
- distance to closest record, DCR: how closely the released synthetic set reproduces the record.
- LiRA (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022): shadow pipelines are run
  on random halves of the audit pool (the whole distill + train pipeline, `privacy.audit.pipeline`, replaying the
  audited release's mechanism: its noise multiplier, sample rate and steps, not ones recalibrated for half the
  pool, which would be another mechanism than the one audited); per record,
  Gaussians are fitted to its statistic in the shadows that trained on it (IN) and those that did not (OUT).
  Online: log N(t; mu_in, s_in) - log N(t; mu_out, s_out). Offline (OUT shadows only): -log P[Z > t], Z ~ N(mu_out,
  s_out), the one-sided test of their Sec. VI-C. Fixed variance: one pooled standard deviation for all records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from medfdd.data.records import RecordView, take
from privacy.audit.pipeline import PipelineOutput, PipelineSettings, run_pipeline
from privacy.audit.scores import dcr_scores, logit_confidence, logits, loss_scores

MIN_STD = 1e-6


def loss_attack(model, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return loss_scores(logits(model, images), labels)


def dcr_attack(synthetic_images: np.ndarray, images: np.ndarray) -> np.ndarray:
    return dcr_scores(images, synthetic_images)


def target_statistic(target: str, out: PipelineOutput, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The per-record statistic LiRA models: logit-scaled confidence of a model, or -log DCR of a synthetic set."""
    if target == "global_model":
        return logit_confidence(logits(out.model, images), labels)
    return dcr_scores(images, out.synthetic_images)


def balanced_halves(n_records: int, n_shadows: int, seed: int) -> np.ndarray:
    """[n_shadows, n_records] membership of shadow datasets: every record is IN exactly half of the shadows
    (Carlini et al.'s construction), and each shadow holds about half of the pool."""
    rng = np.random.default_rng(seed)
    ranks = rng.random((n_shadows, n_records)).argsort(axis=0).argsort(axis=0)
    return ranks < n_shadows // 2


@dataclass
class ShadowStats:
    in_mask: np.ndarray  # [K, N]
    stats: dict[str, np.ndarray]  # target -> [K, N]
    mechanisms: list[tuple[float, float, int]]  # per shadow: the (noise multiplier, sample rate, steps) it ran


def run_shadows(images: np.ndarray | RecordView, labels: np.ndarray, settings: PipelineSettings, *, n_shadows: int, seed: int,
                targets: tuple[str, ...], context: tuple[np.ndarray, np.ndarray] | None = None,
                on_shadow: Callable[[int], None] | None = None) -> ShadowStats:
    """Rerun the pipeline on `n_shadows` random halves of the pool and record every record's statistic (a
    `RecordView` pool is read by index, a batch at a time: nothing holds the whole pool)."""
    in_mask = balanced_halves(len(images), n_shadows, seed)
    out = {t: np.zeros((n_shadows, len(images))) for t in targets}
    mechanisms = []
    for k in range(n_shadows):
        idx = np.flatnonzero(in_mask[k])
        res = run_pipeline(take(images, idx), labels[idx], settings, seed=seed * 1000 + 17 + k, context=context,
                           train_model="global_model" in targets)
        mechanisms.append((res.noise_multiplier, res.sample_rate, res.steps))
        for t in targets:
            out[t][k] = target_statistic(t, res, images, labels)
        if on_shadow:
            on_shadow(k + 1)
    return ShadowStats(in_mask, out, mechanisms)


def _fit(stats_: np.ndarray, mask: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-record mean and std of the statistic over the shadows in `mask` ([K, N] both)."""
    cnt = mask.sum(0)
    pooled_mean = stats_[mask].mean() if mask.any() else 0.0
    mean = np.where(cnt > 0, (stats_ * mask).sum(0) / np.maximum(cnt, 1), pooled_mean)
    resid = np.where(mask, stats_ - mean, 0.0)
    global_std = float(np.sqrt((resid**2).sum() / max(1, mask.sum() - np.count_nonzero(cnt))))
    global_std = max(global_std, MIN_STD)
    if fixed_variance:
        return mean, np.full(stats_.shape[1], global_std)
    std = np.sqrt((resid**2).sum(0) / np.maximum(cnt - 1, 1))
    std = np.where(cnt >= 2, np.maximum(std, MIN_STD), global_std)
    return mean, std


def lira_scores(target_stats: np.ndarray, shadow_stats: np.ndarray, in_mask: np.ndarray, *, online: bool,
                fixed_variance: bool = False) -> np.ndarray:
    """LiRA membership scores of every record from its statistic on the target and on the shadows."""
    t = np.asarray(target_stats, dtype=np.float64)
    mu_out, sd_out = _fit(shadow_stats, ~in_mask, fixed_variance)
    if not online:
        return -stats.norm.logsf(t, loc=mu_out, scale=sd_out)
    mu_in, sd_in = _fit(shadow_stats, in_mask, fixed_variance)
    return stats.norm.logpdf(t, loc=mu_in, scale=sd_in) - stats.norm.logpdf(t, loc=mu_out, scale=sd_out)
