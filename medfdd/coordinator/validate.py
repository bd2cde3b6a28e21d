"""Validate a site's offer against what the consortium agreed, before and after decoding.

Announced dtype, shape and size are checked before any allocation; then values, labels and the ledger metadata.
A rejected offer raises `OfferRejected` with a reason code; the round goes on with the other sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from medfdd.artifacts import META_KEYS
from medfdd.config import ConsortiumConfig
from medfdd.distill.base import evidence_allocation
from medfdd.errors import MedfddError
from medfdd.io import json_number
from medfdd.messages import SiteOffer, WireError, from_wire
from privacy.accounting import PRIVACY_UNITS

REQUIRED_META = ("site_id", "round", "classes", "spatial_size", "epsilon", "delta", "dp", "accountant",
                 "noise_multiplier", "sample_rate", "steps")
RANGE_TOLERANCE = 1e-5  # images are agreed to lie in [0, 1]
MAX_EVIDENCE = 1e9  # class_evidence estimates records: anything larger is not a count


class Reason(StrEnum):
    UNKNOWN_SITE = "unknown_site"
    SPOOFED_SITE = "spoofed_site_id"
    DUPLICATE_OFFER = "duplicate_offer"
    WRONG_ROUND = "wrong_round"
    UNEXPECTED_ARRAYS = "unexpected_arrays"
    WRONG_DTYPE = "wrong_dtype"
    WRONG_SHAPE = "wrong_shape"
    TOO_MANY_IMAGES = "too_many_images"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    NON_FINITE = "non_finite"
    OUT_OF_RANGE = "out_of_range"
    LABEL_OUT_OF_RANGE = "label_out_of_range"
    MISSING_METADATA = "missing_ledger_metadata"
    UNEXPECTED_METADATA = "unexpected_metadata"
    INCONSISTENT_METADATA = "inconsistent_metadata"
    NOT_PRIVATE = "not_private"
    EPSILON_ABOVE_BUDGET = "epsilon_above_budget"
    WEAKER_UNIT = "weaker_privacy_unit"
    NO_ANSWER = "no_answer"
    SITE_UNAVAILABLE = "site_unavailable"  # its SuperNode stopped reporting to the SuperLink during the round
    SITE_FAILED = "site_failed"


class OfferRejected(MedfddError):
    """An offer failed validation; `reason` is a Reason code, the message says what and why."""

    def __init__(self, site_id: str, reason: Reason, detail: str):
        self.site_id, self.reason, self.detail = site_id, reason, detail
        super().__init__(f"offer from {site_id!r}", f"{reason.value}: {detail}",
                         "the site must re-run `medfdd site distill` with the consortium's agreed settings")


@dataclass
class AcceptedOffer:
    site_id: str
    images: np.ndarray  # float32 [N, C, *spatial] in [0, 1]
    labels: np.ndarray  # int64 [N]
    meta: dict
    nbytes: int


def _same_list(value, agreed: list) -> bool:
    """A JSON list (or tuple) equal to the agreed one; anything else (a number, a string, None) is not."""
    return isinstance(value, list | tuple) and list(value) == list(agreed)


def check_identity(offer: SiteOffer, sender: str, *, spec: ConsortiumConfig, bindings: dict[str, str],
                   received: set[str], round_: int) -> None:
    """Known site, the same sender as before for that site (and vice versa), one offer per round, this round."""
    sid = offer.site_id
    if sid not in spec.sites:
        raise OfferRejected(sid, Reason.UNKNOWN_SITE, f"site id not in the consortium {sorted(spec.sites)}")
    bound_site = bindings.get(sender)
    bound_sender = next((s for s, site in bindings.items() if site == sid), None)
    if (bound_site is not None and bound_site != sid) or (bound_sender is not None and bound_sender != sender):
        raise OfferRejected(sid, Reason.SPOOFED_SITE, f"sender {sender!r} is bound to {bound_site!r}; site {sid!r} "
                                                      f"to sender {bound_sender!r}")
    if sid in received:
        raise OfferRejected(sid, Reason.DUPLICATE_OFFER, f"a second offer for round {round_}")
    if offer.round != round_:
        raise OfferRejected(sid, Reason.WRONG_ROUND, f"offer is for round {offer.round}, the round is {round_}")


def _check_announced(offer: SiteOffer, spec: ConsortiumConfig) -> int:
    """dtype / shape / size from the announcement alone; returns the number of images."""
    sid, k = offer.site_id, len(spec.classes)
    if set(offer.arrays) != {"images", "labels"}:
        raise OfferRejected(sid, Reason.UNEXPECTED_ARRAYS, f"arrays {sorted(offer.arrays)}, expected images, labels")
    img, lab = offer.arrays["images"], offer.arrays["labels"]
    if img.dtype != "float32" or lab.dtype != "int64":
        raise OfferRejected(sid, Reason.WRONG_DTYPE, f"images {img.dtype}, labels {lab.dtype}; agreed float32, int64")
    total = img.announced_bytes + lab.announced_bytes
    if img.announced_bytes < 0 or lab.announced_bytes < 0:
        raise OfferRejected(sid, Reason.MALFORMED, f"shapes {img.shape}, {lab.shape} are not valid")
    if total > spec.max_offer_bytes:
        raise OfferRejected(sid, Reason.OVERSIZED, f"announces {total} bytes, limit {spec.max_offer_bytes}")
    expect = (spec.channels, *spec.spatial_size)
    if len(img.shape) != 1 + len(expect) or tuple(img.shape[1:]) != expect or lab.shape != img.shape[:1]:
        raise OfferRejected(sid, Reason.WRONG_SHAPE, f"images {img.shape}, labels {lab.shape}; agreed [N, "
                                                     f"{', '.join(map(str, expect))}] and [N]")
    n = img.shape[0]
    if n > spec.ipc * k:
        raise OfferRejected(sid, Reason.TOO_MANY_IMAGES, f"{n} images, at most ipc x classes = {spec.ipc * k}")
    if n == 0:
        raise OfferRejected(sid, Reason.WRONG_SHAPE, "no images")
    return n


def _check_meta(offer: SiteOffer, spec: ConsortiumConfig, previous_epsilon: float | None) -> dict:
    sid, meta = offer.site_id, offer.meta
    if not isinstance(meta, dict):
        raise OfferRejected(sid, Reason.MISSING_METADATA, "metadata is not a mapping")
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise OfferRejected(sid, Reason.UNEXPECTED_METADATA, f"keys outside the allow-list: {unknown}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise OfferRejected(sid, Reason.MISSING_METADATA, f"missing {missing}")
    if meta["site_id"] != sid or meta["round"] != offer.round:
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"metadata says site {meta['site_id']!r} round "
                                                               f"{meta['round']!r}")
    if not _same_list(meta["classes"], spec.classes) or not _same_list(meta["spatial_size"], spec.spatial_size):
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, "classes or spatial_size differ from the agreed ones")
    try:
        eps, delta = json_number(meta["epsilon"]), json_number(meta["delta"])
        sigma, q, steps = json_number(meta["noise_multiplier"]), json_number(meta["sample_rate"]), json_number(meta["steps"])
    except TypeError as e:
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, str(e)) from None
    unit = meta.get("privacy_unit", "scan")
    if unit not in PRIVACY_UNITS:
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"privacy_unit {unit!r}, expected one of "
                                                               f"{list(PRIVACY_UNITS)}")
    declared = spec.sites[sid]
    dp = meta["dp"] is True
    if declared.dp and declared.unit == "patient" and unit != "patient":
        raise OfferRejected(sid, Reason.WEAKER_UNIT, f"epsilon protects each {unit}; the site declared protection "
                                                     "of each patient (privacy.unit: patient)")
    if declared.dp:
        if not dp or not math.isfinite(eps):
            raise OfferRejected(sid, Reason.NOT_PRIVATE, "the site declared a DP budget but the offer is non-private")
        if not (sigma > 0 and 0 < q <= 1 and steps >= 1 and 0 < delta < 1):
            raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"noise_multiplier {sigma}, sample_rate {q}, "
                                                                   f"steps {steps}, delta {delta} are not a DP plan")
        if eps > declared.epsilon * (1 + 1e-6) or delta > declared.delta * (1 + 1e-9):
            raise OfferRejected(sid, Reason.EPSILON_ABOVE_BUDGET, f"epsilon {eps:.6g} (delta {delta:g}) above the "
                                                                  f"declared budget {declared.epsilon:g} "
                                                                  f"(delta {declared.delta:g})")
        if previous_epsilon is not None and eps < previous_epsilon * (1 - 1e-9):
            raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"cumulative epsilon {eps:.6g} is below the "
                                                                   f"{previous_epsilon:.6g} of an earlier round")
    if "class_evidence" in meta:
        _check_evidence(sid, meta["class_evidence"], len(spec.classes))
    return {**meta, "epsilon": eps}


def _check_evidence(sid: str, evidence, k: int) -> None:
    """class_evidence (optional): one finite number per agreed class (noisy estimates may be slightly negative)."""
    ok = isinstance(evidence, list) and len(evidence) == k and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= MAX_EVIDENCE
        for v in evidence)
    if not ok:
        shown = repr(evidence)[:80]
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"class_evidence {shown} is not {k} finite numbers "
                                                               f"of at most {MAX_EVIDENCE:g} in size")


def _check_class_counts(sid: str, per_class: np.ndarray, meta: dict, spec: ConsortiumConfig) -> None:
    """At most ipc images of a class; or, for `allocation: evidence`, exactly the counts that the offer's own
    released class_evidence gives (`evidence_allocation`)."""
    allocation = meta.get("allocation", "uniform")
    if allocation == "uniform":
        if per_class.max() > spec.ipc:
            raise OfferRejected(sid, Reason.TOO_MANY_IMAGES, f"{int(per_class.max())} images of class "
                                f"{spec.classes[int(per_class.argmax())]!r}, at most {spec.ipc}")
        return
    if allocation != "evidence" or "class_evidence" not in meta:
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"allocation {allocation!r} needs to be 'evidence' "
                                                               "with class_evidence, or absent")
    q = json_number(meta["sample_rate"])
    if not 0 < q <= 1:
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"sample_rate {q} is not a sampling probability, so "
                                                               "its evidence allocation cannot be checked")
    expected = evidence_allocation(meta["class_evidence"], q, spec.ipc * len(spec.classes))
    if per_class.tolist() != expected:
        raise OfferRejected(sid, Reason.TOO_MANY_IMAGES, f"images per class {per_class.tolist()} differ from the "
                                                         f"evidence allocation {expected} of its class_evidence")


def validate_offer(offer: SiteOffer, spec: ConsortiumConfig, *, previous_epsilon: float | None = None
                   ) -> AcceptedOffer:
    """Announcement -> metadata -> decode -> values. Raises OfferRejected with the first problem found; any other
    error while reading another party's offer is rejected as malformed too (a hostile offer must never stop the
    coordinator)."""
    try:
        return _validate(offer, spec, previous_epsilon)
    except OfferRejected:
        raise
    except Exception as e:  # noqa: BLE001 - the offer is untrusted input; its round goes on without it
        raise OfferRejected(str(offer.site_id), Reason.MALFORMED,
                            f"could not be validated ({type(e).__name__}: {str(e)[:200]})") from None


def _validate(offer: SiteOffer, spec: ConsortiumConfig, previous_epsilon: float | None) -> AcceptedOffer:
    sid = offer.site_id
    _check_announced(offer, spec)
    meta = _check_meta(offer, spec, previous_epsilon)
    try:
        images = from_wire(offer.arrays["images"], max_bytes=spec.max_offer_bytes, name="images")
        labels = from_wire(offer.arrays["labels"], max_bytes=spec.max_offer_bytes, name="labels")
    except WireError as e:
        raise OfferRejected(sid, Reason.MALFORMED, e.problem) from None
    if not np.isfinite(images).all():
        raise OfferRejected(sid, Reason.NON_FINITE, f"{int((~np.isfinite(images)).sum())} NaN/Inf values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise OfferRejected(sid, Reason.OUT_OF_RANGE, f"values in [{lo:.4g}, {hi:.4g}], agreed [0, 1]")
    k = len(spec.classes)
    if labels.min() < 0 or labels.max() >= k:
        raise OfferRejected(sid, Reason.LABEL_OUT_OF_RANGE, f"labels in [{labels.min()}, {labels.max()}], "
                                                            f"classes are 0..{k - 1}")
    _check_class_counts(sid, np.bincount(labels, minlength=k), meta, spec)
    return AcceptedOffer(sid, np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int64), meta, offer.nbytes())
