"""Flower records <-> engine-neutral messages: exact round trips, and refusal of anything outside the agreed shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medfdd.federation.flower import codec
from medfdd.federation.flower.codec import CodecError
from medfdd.messages import Broadcast, SiteOffer, WireError, from_wire, to_wire


def _offer(meta: dict | None = None) -> SiteOffer:
    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 16, 16), dtype=np.float32)
    labels = np.array([0, 1, 2, 3], dtype=np.int64)
    return SiteOffer(site_id="hospital-a", round=2, arrays={"images": to_wire(images), "labels": to_wire(labels)},
                     meta=meta if meta is not None else {"site_id": "hospital-a", "round": 2, "epsilon": 0.5,
                                                         "classes": ["a", "b"], "spatial_size": [16, 16],
                                                         "dp": True})


def test_offer_round_trip_is_exact():
    offer = _offer()
    back = codec.records_to_offer(codec.offer_to_records(offer))
    assert back.site_id == offer.site_id and back.round == offer.round and back.meta == offer.meta
    for k in ("images", "labels"):
        assert back.arrays[k] == offer.arrays[k]
        np.testing.assert_array_equal(from_wire(back.arrays[k], max_bytes=10**6), from_wire(offer.arrays[k],
                                                                                           max_bytes=10**6))
    assert back.nbytes() == offer.nbytes()


def test_non_private_epsilon_inf_survives_the_wire():
    offer = _offer({"site_id": "hospital-a", "epsilon": math.inf, "dp": False})
    assert codec.records_to_offer(codec.offer_to_records(offer)).meta["epsilon"] == math.inf


def test_broadcast_round_trip_with_and_without_model():
    assert codec.records_to_broadcast(codec.broadcast_to_records(Broadcast(1, None))) == Broadcast(1, None)
    model = bytes(range(256)) * 10
    back = codec.records_to_broadcast(codec.broadcast_to_records(Broadcast(3, model)))
    assert back.round == 3 and back.model == model


def test_arrays_travel_raw_not_as_numpy_files():
    rd = codec.offer_to_records(_offer())
    arr = rd.array_records["arrays"]["images"]
    assert arr.stype == codec.WIRE_STYPE and arr.dtype == "float32" and arr.shape == (4, 1, 16, 16)
    assert not arr.data.startswith(b"\x93NUMPY")


def test_numpy_serialised_arrays_are_refused():
    rd = codec.offer_to_records(_offer())
    rd.array_records["arrays"]["images"] = Array(np.zeros((4, 1, 16, 16), np.float32))  # stype numpy.ndarray
    with pytest.raises(CodecError, match="serialisation"):
        codec.records_to_offer(rd)


def test_extra_records_and_keys_are_refused():
    rd = codec.offer_to_records(_offer())
    rd["leak"] = MetricRecord({"n_patients": 123})
    with pytest.raises(CodecError, match="unexpected records"):
        codec.records_to_offer(rd)
    rd = codec.offer_to_records(_offer())
    rd.array_records["arrays"]["patient_ids"] = codec.wire_to_array(to_wire(np.arange(3, dtype=np.int64)))
    with pytest.raises(CodecError, match="keys"):
        codec.records_to_offer(rd)
    rd = codec.offer_to_records(_offer())
    rd.config_records["offer"]["path"] = "/data/patient-1.dcm"
    with pytest.raises(CodecError, match="keys"):
        codec.records_to_offer(rd)


def test_wrong_types_and_bad_meta_are_refused():
    rd = codec.offer_to_records(_offer())
    rd.config_records["offer"]["round"] = "2"
    with pytest.raises(CodecError, match="round"):
        codec.records_to_offer(rd)
    for bad in ("[1, 2]", "{not json", '{"epsilon": NaN}', '{"a": ' + '[' * 20000 + ']' * 20000 + '}'):  # last: too deep
        rd = codec.offer_to_records(_offer())
        rd.config_records["offer"]["meta-json"] = bad
        with pytest.raises(CodecError, match="meta-json"):
            codec.records_to_offer(rd)


def test_lying_shape_is_caught_before_decoding():
    rd = codec.offer_to_records(_offer())
    a = rd.array_records["arrays"]["images"]
    rd.array_records["arrays"]["images"] = Array(dtype="float32", shape=(10**6, 1, 16, 16), stype=codec.WIRE_STYPE,
                                                 data=a.data)
    offer = codec.records_to_offer(rd)  # the codec passes the announcement through; from_wire checks it
    with pytest.raises(WireError, match="above the limit"):
        from_wire(offer.arrays["images"], max_bytes=2**20)
    with pytest.raises(WireError, match="bytes sent"):
        from_wire(offer.arrays["images"], max_bytes=2**40)


def test_broadcast_refuses_bad_model_and_round():
    rd = codec.broadcast_to_records(Broadcast(2, b"abc"))
    rd.array_records["model"]["safetensors"] = Array(dtype="uint8", shape=(5,), stype=codec.WIRE_STYPE, data=b"abc")
    with pytest.raises(CodecError, match="model"):
        codec.records_to_broadcast(rd)
    with pytest.raises(CodecError, match="limit"):
        codec.records_to_broadcast(codec.broadcast_to_records(Broadcast(2, b"x" * 100)), max_model_bytes=10)
    rd = RecordDict({"broadcast": ConfigRecord({"round": 0})})
    with pytest.raises(CodecError, match="round"):
        codec.records_to_broadcast(rd)
    rd = RecordDict({"broadcast": ConfigRecord({"round": 1}), "model": ArrayRecord({"x": Array(np.zeros(2))})})
    with pytest.raises(CodecError):
        codec.records_to_broadcast(rd)
