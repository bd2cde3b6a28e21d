"""Hybrid mode at the coordinator: validate each site's locally DP-fine-tuned model, then average them (DP-FedAvg,
McMahan et al., ICLR 2018: the server's weighted mean of the clients' models).

Each model is weighted by the site's DP record count n~ = batch_size / q, public through the sample rate the site
published (post-processing of its charged count; never the raw n). A model that is not the agreed architecture of
the broadcast model, holds NaN/Inf, or comes with metadata outside the allow-list or above the site's declared budget
is rejected with a reason (`validate.Reason`), as an offer is, and its round goes on without it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from medfdd.artifacts import ArtifactError, load_agreed_model
from medfdd.config import ConsortiumConfig, FinetuneConfig
from medfdd.coordinator.validate import OfferRejected, Reason
from medfdd.io import atomic_write_bytes, json_number
from medfdd.messages import UPDATE_META, LocalUpdate
from medfdd.nets import Classifier


@dataclass
class AcceptedUpdate:
    site_id: str
    state: dict[str, torch.Tensor]
    meta: dict  # epsilon as a float (inf for a declared non-private site)
    weight: float  # n~ = batch_size / q
    nbytes: int


def _check_meta(update: LocalUpdate, spec: ConsortiumConfig, previous_epsilon: float | None) -> dict:
    sid, meta = update.site_id, update.meta
    if not isinstance(meta, dict):
        raise OfferRejected(sid, Reason.MISSING_METADATA, "metadata is not a mapping")
    if set(meta) - set(UPDATE_META):
        raise OfferRejected(sid, Reason.UNEXPECTED_METADATA, f"keys outside the allow-list: "
                                                             f"{sorted(set(meta) - set(UPDATE_META))}")
    if set(UPDATE_META) - set(meta):
        raise OfferRejected(sid, Reason.MISSING_METADATA, f"missing {sorted(set(UPDATE_META) - set(meta))}")
    if meta["site_id"] != sid or meta["round"] != update.round:
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"metadata says site {meta['site_id']!r} round "
                                                               f"{meta['round']!r}")
    try:
        eps, sigma, q, steps = (json_number(meta[k]) for k in ("epsilon", "noise_multiplier", "sample_rate", "steps"))
    except TypeError as e:
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, str(e)) from None
    if not (0 < q <= 1 and steps >= 1):
        raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"sample_rate {q}, steps {steps} are not a plan")
    declared = spec.sites[sid]
    if declared.dp:
        if not (sigma > 0 and math.isfinite(eps)):
            raise OfferRejected(sid, Reason.NOT_PRIVATE, "the site declared a DP budget but the update is non-private")
        if eps > declared.epsilon * (1 + 1e-6):
            raise OfferRejected(sid, Reason.EPSILON_ABOVE_BUDGET, f"epsilon {eps:.6g} above the declared budget "
                                                                  f"{declared.epsilon:g}")
        if previous_epsilon is not None and eps < previous_epsilon * (1 - 1e-9):
            raise OfferRejected(sid, Reason.INCONSISTENT_METADATA, f"cumulative epsilon {eps:.6g} is below the "
                                                                   f"{previous_epsilon:.6g} of an earlier round")
    return {**meta, "epsilon": eps}


def validate_update(update: LocalUpdate, spec: ConsortiumConfig, *, reference: Classifier, recipe: FinetuneConfig,
                    received: Path, previous_epsilon: float | None = None) -> AcceptedUpdate:
    """Metadata -> size -> the model as received (written to `received`) loaded as the agreed architecture, finite,
    with the broadcast model's shapes. Raises OfferRejected; any other error while reading it is `malformed`."""
    try:
        return _validate(update, spec, reference, recipe, received, previous_epsilon)
    except OfferRejected:
        raise
    except Exception as e:  # noqa: BLE001 - another party's model: its round goes on without it
        raise OfferRejected(str(update.site_id), Reason.MALFORMED,
                            f"could not be validated ({type(e).__name__}: {str(e)[:200]})") from None


def _validate(update: LocalUpdate, spec: ConsortiumConfig, reference: Classifier, recipe: FinetuneConfig,
              received: Path, previous_epsilon: float | None) -> AcceptedUpdate:
    sid = update.site_id
    meta = _check_meta(update, spec, previous_epsilon)
    if not isinstance(update.model, bytes) or len(update.model) > spec.max_offer_bytes:
        raise OfferRejected(sid, Reason.OVERSIZED, f"a model of {len(update.model)} bytes, limit "
                                                   f"{spec.max_offer_bytes}")
    atomic_write_bytes(received, update.model)
    try:
        model = load_agreed_model(received, in_channels=spec.channels, num_classes=len(spec.classes),
                                  spatial_size=spec.spatial_size)
    except ArtifactError as e:
        reason = Reason.NON_FINITE if "NaN/Inf" in e.problem else Reason.MALFORMED
        raise OfferRejected(sid, reason, e.problem) from None
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if model.arch != reference.arch or {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise OfferRejected(sid, Reason.WRONG_SHAPE, f"architecture {model.arch} is not the broadcast model's "
                                                     f"{reference.arch}")
    return AcceptedUpdate(sid, state, meta, recipe.batch_size / json_number(meta["sample_rate"]), update.nbytes())


def average(updates: list[AcceptedUpdate], reference: Classifier) -> Classifier:
    """The n~-weighted mean of the accepted models (float64 sums), in a copy of `reference`."""
    total = sum(u.weight for u in updates)
    avg = {k: sum((u.weight / total) * u.state[k].double() for u in updates).to(v.dtype)
           for k, v in reference.state_dict().items()}
    model = copy.deepcopy(reference).cpu()
    model.load_state_dict(avg)
    return model.eval()
