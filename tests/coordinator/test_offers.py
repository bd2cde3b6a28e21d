"""Hostile and malformed offers are rejected with a reason; the announcement is checked before decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfdd.config import ConsortiumConfig
from medfdd.coordinator.validate import OfferRejected, Reason, check_identity, validate_offer
from medfdd.messages import SiteOffer, WireArray, WireError, from_wire, to_wire

K, IPC, SHAPE = 3, 2, (1, 8, 8)


@pytest.fixture
def spec() -> ConsortiumConfig:
    return ConsortiumConfig(classes=["a", "b", "c"], spatial_size=[8, 8], channels=1, ipc=IPC,
                            sites={"site-a": {"epsilon": 1.0, "delta": 1e-5}, "site-b": {"epsilon": 2.0},
                                   "baseline": {"dp": False}}, max_offer_bytes=64 * 1024)


def good_meta(site="site-a", round_=1, **kw) -> dict:
    return {"site_id": site, "round": round_, "method": "dm", "ipc": IPC, "classes": ["a", "b", "c"],
            "spatial_size": [8, 8], "channels": 1, "epsilon": 0.98, "epsilon_round": 0.98, "delta": 1e-5,
            "accountant": "rdp", "noise_multiplier": 3.1, "sample_rate": 0.1, "steps": 20, "clip_norm": 1.0,
            "dp": True, **kw}


def offer(images=None, labels=None, meta=None, site="site-a", round_=1, arrays=None) -> SiteOffer:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (K * IPC, *SHAPE)).astype(np.float32) if images is None else images
    labels = np.repeat(np.arange(K), IPC).astype(np.int64) if labels is None else labels
    arrays = arrays or {"images": to_wire(images), "labels": to_wire(labels)}
    return SiteOffer(site, round_, arrays, good_meta(site, round_) if meta is None else meta)


def test_a_well_formed_offer_is_accepted_bit_exact(spec):
    o = offer()
    acc = validate_offer(o, spec)
    assert acc.images.shape == (K * IPC, *SHAPE) and acc.labels.dtype == np.int64
    assert np.array_equal(acc.images, from_wire(o.arrays["images"], max_bytes=10**6))
    assert acc.nbytes == o.nbytes() > acc.images.nbytes


def test_privacy_unit_is_optional_and_kept(spec):
    assert validate_offer(offer(meta=good_meta(privacy_unit="patient")), spec).meta["privacy_unit"] == "patient"
    assert "privacy_unit" not in validate_offer(offer(), spec).meta  # artifacts before privacy units: scan


def test_a_site_that_declared_patient_protection_must_offer_it():
    agreed = ConsortiumConfig(classes=["a", "b", "c"], spatial_size=[8, 8], ipc=IPC,
                              sites={"site-a": {"epsilon": 1.0, "delta": 1e-5, "unit": "patient"}})
    assert validate_offer(offer(meta=good_meta(privacy_unit="patient")), agreed).meta["privacy_unit"] == "patient"
    for meta in (good_meta(privacy_unit="scan"), good_meta()):  # said, or absent (older sites protect scans)
        with pytest.raises(OfferRejected) as err:
            validate_offer(offer(meta=meta), agreed)
        assert err.value.reason == Reason.WEAKER_UNIT and "patient" in err.value.detail


def test_class_evidence_is_optional_and_kept_when_well_formed(spec):
    assert "class_evidence" not in validate_offer(offer(), spec).meta
    acc = validate_offer(offer(meta=good_meta(class_evidence=[120.5, -3.2, 0])), spec)
    assert acc.meta["class_evidence"] == [120.5, -3.2, 0]  # noisy estimates may dip below zero


HOSTILE = {
    "wrong shape": (lambda: offer(images=np.zeros((K * IPC, 1, 9, 8), np.float32)), Reason.WRONG_SHAPE),
    "wrong channels": (lambda: offer(images=np.zeros((K * IPC, 3, 8, 8), np.float32)), Reason.WRONG_SHAPE),
    "wrong dtype": (lambda: offer(images=np.zeros((K * IPC, *SHAPE), np.float64).astype(np.int64)), Reason.WRONG_DTYPE),
    "NaN": (lambda: offer(images=np.full((K * IPC, *SHAPE), np.nan, np.float32)), Reason.NON_FINITE),
    "Inf": (lambda: offer(images=np.full((K * IPC, *SHAPE), np.inf, np.float32)), Reason.NON_FINITE),
    "out of range": (lambda: offer(images=np.full((K * IPC, *SHAPE), 7.0, np.float32)), Reason.OUT_OF_RANGE),
    "too many images": (lambda: offer(images=np.zeros((K * IPC + 1, *SHAPE), np.float32),
                                      labels=np.zeros(K * IPC + 1, np.int64)), Reason.TOO_MANY_IMAGES),
    "too many of one class": (lambda: offer(labels=np.zeros(K * IPC, np.int64)), Reason.TOO_MANY_IMAGES),
    "label out of range": (lambda: offer(labels=np.full(K * IPC, K, np.int64)), Reason.LABEL_OUT_OF_RANGE),
    "negative label": (lambda: offer(labels=np.full(K * IPC, -1, np.int64)), Reason.LABEL_OUT_OF_RANGE),
    "extra array": (lambda: offer(arrays={"images": to_wire(np.zeros((1, *SHAPE), np.float32)),
                                          "labels": to_wire(np.zeros(1, np.int64)),
                                          "real_rows": to_wire(np.zeros(1, np.int64))}), Reason.UNEXPECTED_ARRAYS),
    "missing ledger metadata": (lambda: offer(meta={k: v for k, v in good_meta().items() if k != "epsilon"}),
                                Reason.MISSING_METADATA),
    "missing noise multiplier": (lambda: offer(meta={k: v for k, v in good_meta().items()
                                                     if k != "noise_multiplier"}), Reason.MISSING_METADATA),
    "metadata outside the allow-list": (lambda: offer(meta=good_meta(PatientName="DOE^JOHN")),
                                        Reason.UNEXPECTED_METADATA),
    "metadata for another site": (lambda: offer(meta=good_meta(site="site-b")), Reason.INCONSISTENT_METADATA),
    "metadata for another round": (lambda: offer(meta=good_meta(round_=2)), Reason.INCONSISTENT_METADATA),
    "classes disagree": (lambda: offer(meta=good_meta(classes=["x", "y", "z"])), Reason.INCONSISTENT_METADATA),
    "classes as a number": (lambda: offer(meta=good_meta(classes=3)), Reason.INCONSISTENT_METADATA),
    "spatial size missing its list": (lambda: offer(meta=good_meta(spatial_size=None)), Reason.INCONSISTENT_METADATA),
    "classes as one string": (lambda: offer(meta=good_meta(classes="abc")), Reason.INCONSISTENT_METADATA),
    "non-private evidence allocation at sample rate inf": (lambda: offer(
        site="baseline", labels=np.array([0, 0, 0, 0, 1, 1]),
        meta=good_meta(site="baseline", dp=False, epsilon="inf", noise_multiplier=0.0, sample_rate="inf",
                       allocation="evidence", class_evidence=[50.0, 10.0, 0.0])), Reason.INCONSISTENT_METADATA),
    "evidence allocation as a list": (lambda: offer(meta=good_meta(allocation=["evidence"],
                                                                   class_evidence=[50.0, 10.0, 0.0])),
                                      Reason.INCONSISTENT_METADATA),
    "epsilon above budget": (lambda: offer(meta=good_meta(epsilon=1.5)), Reason.EPSILON_ABOVE_BUDGET),
    "delta above budget": (lambda: offer(meta=good_meta(delta=1e-3)), Reason.EPSILON_ABOVE_BUDGET),
    "non-private from a DP site": (lambda: offer(meta=good_meta(dp=False, epsilon="inf")), Reason.NOT_PRIVATE),
    "zero noise": (lambda: offer(meta=good_meta(noise_multiplier=0.0)), Reason.INCONSISTENT_METADATA),
    "epsilon as text": (lambda: offer(meta=good_meta(epsilon="0.5")), Reason.INCONSISTENT_METADATA),
    "class evidence of the wrong length": (lambda: offer(meta=good_meta(class_evidence=[5.0, 5.0])),
                                           Reason.INCONSISTENT_METADATA),
    "class evidence as text": (lambda: offer(meta=good_meta(class_evidence=["many", 1, 2])),
                               Reason.INCONSISTENT_METADATA),
    "class evidence absurdly large": (lambda: offer(meta=good_meta(class_evidence=[1e12, 1.0, 1.0])),
                                      Reason.INCONSISTENT_METADATA),
    # evidence [50, 10, 0] at sample rate 0.1 allocates [5, 1, 0]: an offer must carry exactly that
    "allocation the evidence does not give": (lambda: offer(labels=np.array([0, 0, 0, 0, 1, 1]), meta=good_meta(
        allocation="evidence", class_evidence=[50.0, 10.0, 0.0])), Reason.TOO_MANY_IMAGES),
    "evidence allocation without evidence": (lambda: offer(meta=good_meta(allocation="evidence")),
                                             Reason.INCONSISTENT_METADATA),
    "unknown allocation": (lambda: offer(meta=good_meta(allocation="whatever-i-like",
                                                        class_evidence=[50.0, 10.0, 0.0])),
                           Reason.INCONSISTENT_METADATA),
    "unknown privacy unit": (lambda: offer(meta=good_meta(privacy_unit="household")), Reason.INCONSISTENT_METADATA),
    "privacy unit as a list": (lambda: offer(meta=good_meta(privacy_unit=["scan"])), Reason.INCONSISTENT_METADATA),
}


def test_an_offer_allocated_by_its_own_class_evidence_may_exceed_ipc_per_class(spec):
    labels = np.array([0, 0, 0, 0, 0, 1])  # 5 of class a > ipc 2, as evidence [50, 10, 0] at rate 0.1 allocates
    acc = validate_offer(offer(labels=labels, meta=good_meta(allocation="evidence", class_evidence=[50.0, 10.0, 0.0])),
                         spec)
    assert np.bincount(acc.labels, minlength=K).tolist() == [5, 1, 0]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_offer_is_rejected_with_its_reason(spec, case):
    make, reason = HOSTILE[case]
    hostile = make()
    with pytest.raises(OfferRejected) as err:
        validate_offer(hostile, spec)
    assert err.value.reason == reason, err.value
    assert err.value.site_id == hostile.site_id


def test_oversized_announcement_is_refused_before_any_allocation(spec):
    # announces 10^12 images but carries 8 bytes: refused from the header alone
    huge = WireArray("float32", (10**12, 1, 8, 8), b"\0" * 8)
    o = offer(arrays={"images": huge, "labels": WireArray("int64", (10**12,), b"")})
    with pytest.raises(OfferRejected) as err:
        validate_offer(o, spec)
    assert err.value.reason == Reason.OVERSIZED
    with pytest.raises(WireError, match="announces"):
        from_wire(huge, max_bytes=10**6)


def test_bytes_that_disagree_with_the_announced_shape_are_malformed(spec):
    good = offer()
    short = WireArray("float32", good.arrays["images"].shape, good.arrays["images"].data[:-4])
    with pytest.raises(OfferRejected) as err:
        validate_offer(offer(arrays={"images": short, "labels": good.arrays["labels"]}), spec)
    assert err.value.reason == Reason.MALFORMED


@pytest.mark.parametrize("shape", [(-1, 1, 8, 8), (2.5, 1, 8, 8)])
def test_nonsense_shapes_are_malformed(spec, shape):
    o = offer(arrays={"images": WireArray("float32", shape, b""), "labels": WireArray("int64", (1,), b"\0" * 8)})
    with pytest.raises(OfferRejected) as err:
        validate_offer(o, spec)
    assert err.value.reason == Reason.MALFORMED


def test_declared_non_private_site_is_accepted_as_epsilon_inf(spec):
    acc = validate_offer(offer(site="baseline", meta=good_meta(site="baseline", dp=False, epsilon="inf",
                                                                noise_multiplier=0.0)), spec)
    assert math.isinf(acc.meta["epsilon"])


def test_cumulative_epsilon_must_not_shrink_between_rounds(spec):
    with pytest.raises(OfferRejected) as err:
        validate_offer(offer(meta=good_meta(epsilon=0.5)), spec, previous_epsilon=0.9)
    assert err.value.reason == Reason.INCONSISTENT_METADATA


def test_identity_unknown_spoofed_duplicate_and_wrong_round(spec):
    bindings = {"node-1": "site-a"}
    with pytest.raises(OfferRejected, match="unknown_site"):
        check_identity(offer(site="mallory"), "node-9", spec=spec, bindings=bindings, received=set(), round_=1)
    with pytest.raises(OfferRejected, match="spoofed"):  # node-2 claims to be site-a
        check_identity(offer(), "node-2", spec=spec, bindings=bindings, received=set(), round_=1)
    with pytest.raises(OfferRejected, match="spoofed"):  # node-1 (site-a) claims to be site-b
        check_identity(offer(site="site-b"), "node-1", spec=spec, bindings=bindings, received=set(), round_=1)
    with pytest.raises(OfferRejected, match="duplicate"):
        check_identity(offer(), "node-1", spec=spec, bindings=bindings, received={"site-a"}, round_=1)
    with pytest.raises(OfferRejected, match="wrong_round"):
        check_identity(offer(round_=2), "node-1", spec=spec, bindings=bindings, received=set(), round_=1)
    check_identity(offer(), "node-1", spec=spec, bindings=bindings, received=set(), round_=1)  # the real one


def test_wire_round_trip_is_little_endian_and_exact():
    a = np.arange(12, dtype=">i8").reshape(3, 4)  # big-endian input
    w = to_wire(a)
    assert w.dtype == "int64" and w.data[:8] == (0).to_bytes(8, "little")
    assert np.array_equal(from_wire(w, max_bytes=1000), a)
    with pytest.raises(WireError, match="dtype"):
        to_wire(np.zeros(2, dtype=object))
    with pytest.raises(WireError, match="not allowed"):
        from_wire(WireArray("object", (1,), b"x"), max_bytes=10)
