"""A differentially private count of a site's training records, so that the default sample rate does not publish it.

The published Poisson sample rate q = batch_size / n reveals n, a count of patient records (DESIGN invariant 1: any
count leaves a site only through a DP mechanism). With `privacy.count_noise: s` the site releases
n~ = round(n + N(0, s^2)) instead, through the Gaussian mechanism with sensitivity 1 (adding or removing one record
changes n by one; Dwork & Roth 2014, Thm A.1), charged to the ledger as one step of noise multiplier s at sampling
rate 1, and derives q = batch_size / n~. Choosing q from an earlier DP release is adaptive composition, which the
accountant covers (Mironov 2017, Prop. 1). The estimate is paid once and reused by every round (post-processing).
The noise is numpy's float64 normal (ziggurat over 64-bit draws with Marsaglia's tail method: not truncated at any
float32 limit) from the keyed seed, or under `privacy.noise_source: secure` a float64 normal from OS randomness
(`mechanism.SECURE`), which a lost `record_count.json` cannot replay once a round has used the estimate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from medfdd.config import SiteConfig
from medfdd.distill.mechanism import SECURE, secure_replay_refused, standard_normal
from medfdd.io import atomic_write_json
from privacy.accounting import PURPOSE_RECORD_COUNT, RECORD_COUNT_ROUND, Charge, PrivacyLedger

COUNT_FILE = "record_count.json"  # at the site: the released estimate, reused by later rounds
_NOISE_STREAM = 0x636F756E74  # separates this draw from distillation's streams of the same keyed seed


def _stored(path: Path, sigma: float) -> int | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("n_estimate"), int) and doc.get("noise_std") == sigma
    return doc["n_estimate"] if ok and doc["n_estimate"] >= 1 else None


def _rounded(noisy: float) -> int:
    return max(1, int(round(noisy)))


def noisy_count(n: int, sigma: float, seed: int) -> int:
    """round(n + N(0, sigma^2)) from the keyed stream of `seed`, at least 1 (the release itself; charge it first)."""
    return _rounded(n + np.random.default_rng([seed, _NOISE_STREAM]).normal(0.0, sigma))


def private_record_count(cfg: SiteConfig, ledger: PrivacyLedger, *, n: int, seed: int) -> int:
    """The site's DP estimate of `n` training records (at least 1), charged to `ledger` before it is computed.

    Reused from `record_count.json` once paid. A lost file is recomputed from the same keyed noise and the same
    charge; if the records changed meanwhile, the ledger refuses the second, different release (ChargeConflict).
    Under secure noise a lost file is redrawn only while no other charge exists (the lost draw was never used), and
    refused (SecureNoiseReplay) once a round's sample rate may have published it.
    """
    sigma = float(cfg.privacy.count_noise)
    path = cfg.output_dir / COUNT_FILE
    if ledger.find_charge(RECORD_COUNT_ROUND, PURPOSE_RECORD_COUNT) is not None:
        stored = _stored(path, sigma)
        if stored is not None:
            return stored
        if cfg.privacy.noise_source == "secure" and any(e.purpose != PURPOSE_RECORD_COUNT for e in ledger.entries):
            raise secure_replay_refused(str(path), "the paid record count is missing or unreadable although a "
                                        "round already used it", "restore record_count.json from the site's backup")
    # the ledger may travel with the run directory: the secret-keyed seed keeps n from being brute-forced from this
    release = hashlib.blake2b(json.dumps([n, sigma, str(seed)]).encode(), digest_size=16).hexdigest()
    ledger.charge(Charge(sigma, 1.0, 1, round=RECORD_COUNT_ROUND, purpose=PURPOSE_RECORD_COUNT, release=release))  # write-ahead
    if cfg.privacy.noise_source == "secure":
        estimate = _rounded(n + sigma * float(standard_normal((1,), SECURE)[0]))
    else:
        estimate = noisy_count(n, sigma, seed)
    atomic_write_json(path, {"site_id": cfg.site_id, "n_estimate": estimate, "noise_std": sigma,
                             "note": "differentially private estimate of the training records (Gaussian mechanism); "
                                     "the true count is not stored"})
    return estimate
