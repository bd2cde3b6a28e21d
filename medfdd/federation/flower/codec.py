"""Flower records <-> the engine-neutral messages (pure functions: testable without a running Flower app).

What crosses the wire, and nothing else:
- coordinator -> site (`Broadcast`): ConfigRecord "broadcast" {round} and, from round 2, ArrayRecord "model"
  {"safetensors": the global model's safetensors bytes as a 1-D uint8 array}.
- site -> coordinator (`SiteOffer`): ConfigRecord "offer" {site-id, round, meta-json} and ArrayRecord "arrays"
  {"images", "labels"}.
- after the last round, coordinator -> site: the final global model in the broadcast's records (message type
  `evaluate.final_model`); the site replies with an empty record dict.

- hybrid mode, coordinator -> site (`FinetuneRound`, message type `train.finetune`): ConfigRecord "finetune"
  {round, recipe-json} and ArrayRecord "model"; site -> coordinator (`LocalUpdate`): ConfigRecord "update"
  {site-id, round, meta-json} and ArrayRecord "model" (the local model's safetensors bytes).

Arrays travel as raw little-endian C-order bytes with stype `medfdd.raw-le` (never `numpy.ndarray`, whose decoder is
`np.load`): the receiver checks record names, dtype, shape and byte count before anything is allocated
(`from_wire`). Unknown records or keys are refused: the payload is an allow-list on the wire too.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from medfdd.errors import MedfddError
from medfdd.messages import MAX_MODEL_BYTES, Broadcast, FinetuneRound, LocalUpdate, SiteOffer, WireArray, json_object

WIRE_STYPE = "medfdd.raw-le"
BROADCAST = "broadcast"
MODEL = "model"
MODEL_KEY = "safetensors"
OFFER = "offer"
FINETUNE = "finetune"
UPDATE = "update"
ARRAYS = "arrays"
ARRAY_KEYS = ("images", "labels")


class CodecError(MedfddError):
    """A Flower message does not have the agreed shape (records, keys, types, sizes)."""


def _fail(where: str, problem: str) -> CodecError:
    return CodecError(where, problem, "sites and the coordinator must run the same medfdd version")


def wire_to_array(w: WireArray) -> Array:
    return Array(dtype=str(w.dtype), shape=tuple(int(s) for s in w.shape), stype=WIRE_STYPE, data=bytes(w.data))


def array_to_wire(a: Array, *, where: str) -> WireArray:
    """Only the medfdd wire format is accepted (no numpy/pickle decoding of anything received)."""
    if not isinstance(a, Array):
        raise _fail(where, f"expected an array, got {type(a).__name__}")
    if a.stype != WIRE_STYPE:
        raise _fail(where, f"array serialisation {a.stype!r}, expected {WIRE_STYPE!r}")
    if not isinstance(a.dtype, str) or not isinstance(a.data, bytes):
        raise _fail(where, "malformed array")
    shape = tuple(a.shape)
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _fail(where, f"malformed shape {shape!r}")
    return WireArray(dtype=a.dtype, shape=shape, data=a.data)


def _only(rd: RecordDict, names: set[str], where: str) -> None:
    extra = sorted(set(rd.keys()) - names)
    if extra:
        raise _fail(where, f"unexpected records {extra} (allowed: {sorted(names)})")


def _config(rd: RecordDict, name: str, keys: dict[str, type], where: str) -> dict:
    if name not in rd.config_records:
        raise _fail(where, f"record {name!r} missing")
    rec = rd.config_records[name]
    if set(rec.keys()) != set(keys):
        raise _fail(f"{where}: {name}", f"keys {sorted(rec.keys())}, expected {sorted(keys)}")
    out = {}
    for k, t in keys.items():
        v = rec[k]
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise _fail(f"{where}: {name}.{k}", f"{type(v).__name__}, expected {t.__name__}")
        out[k] = v
    return out


def _model_record(model: bytes) -> ArrayRecord:
    model = bytes(model)
    return ArrayRecord({MODEL_KEY: Array(dtype="uint8", shape=(len(model),), stype=WIRE_STYPE, data=model)})


def _model_bytes(rd: RecordDict, where: str, max_model_bytes: int) -> bytes:
    """The safetensors bytes of the "model" record: one 1-D uint8 array, at most `max_model_bytes`."""
    if MODEL not in rd.array_records:
        raise _fail(f"{where}: {MODEL}", "not an array record" if MODEL in rd else "missing")
    rec = rd.array_records[MODEL]
    if list(rec.keys()) != [MODEL_KEY]:
        raise _fail(f"{where}: {MODEL}", f"keys {sorted(rec.keys())}, expected [{MODEL_KEY!r}]")
    w = array_to_wire(rec[MODEL_KEY], where=f"{where}: {MODEL}")
    if w.dtype != "uint8" or len(w.shape) != 1 or w.shape[0] != len(w.data):
        raise _fail(f"{where}: {MODEL}", f"dtype {w.dtype} shape {w.shape} with {len(w.data)} bytes, expected "
                    "1-D uint8 matching its byte count")
    if len(w.data) > max_model_bytes:
        raise _fail(f"{where}: {MODEL}", f"{len(w.data)} bytes, more than the limit {max_model_bytes}")
    return w.data


def _json_object(text: str, where: str) -> dict:
    try:
        return json_object(text)
    except ValueError as e:
        raise _fail(where, str(e)) from None


def broadcast_to_records(b: Broadcast) -> RecordDict:
    recs: dict = {BROADCAST: ConfigRecord({"round": int(b.round)})}
    if b.model is not None:
        recs[MODEL] = _model_record(b.model)
    return RecordDict(recs)


def records_to_broadcast(rd: RecordDict, *, max_model_bytes: int = MAX_MODEL_BYTES) -> Broadcast:
    where = "broadcast from the coordinator"
    _only(rd, {BROADCAST, MODEL}, where)
    round_ = _config(rd, BROADCAST, {"round": int}, where)["round"]
    if round_ < 1:
        raise _fail(f"{where}: round", f"{round_} is not a round number (>= 1)")
    model = _model_bytes(rd, where, max_model_bytes) if MODEL in rd else None
    return Broadcast(round=round_, model=model)


def empty_reply() -> RecordDict:
    """A site's reply to the final model: nothing (its scores stay at the site)."""
    return RecordDict()


def offer_to_records(offer: SiteOffer) -> RecordDict:
    if set(offer.arrays) != set(ARRAY_KEYS):
        raise _fail(f"offer of {offer.site_id}", f"arrays {sorted(offer.arrays)}, expected {list(ARRAY_KEYS)}")
    meta = json.dumps(offer.meta, sort_keys=True, allow_nan=True)
    return RecordDict({
        OFFER: ConfigRecord({"site-id": str(offer.site_id), "round": int(offer.round), "meta-json": meta}),
        ARRAYS: ArrayRecord({k: wire_to_array(offer.arrays[k]) for k in ARRAY_KEYS}),
    })


def records_to_offer(rd: RecordDict) -> SiteOffer:
    """The site's offer, still as wire arrays: the coordinator's `receive` checks sizes and decodes them."""
    where = "offer from a site"
    _only(rd, {OFFER, ARRAYS}, where)
    head = _config(rd, OFFER, {"site-id": str, "round": int, "meta-json": str}, where)
    where = f"offer from {head['site-id']!r}"
    meta = _json_object(head["meta-json"], f"{where}: meta-json")
    if ARRAYS not in rd.array_records:
        raise _fail(where, f"record {ARRAYS!r} missing")
    rec = rd.array_records[ARRAYS]
    if sorted(rec.keys()) != sorted(ARRAY_KEYS):
        raise _fail(f"{where}: {ARRAYS}", f"keys {sorted(rec.keys())}, expected {list(ARRAY_KEYS)}")
    arrays = {k: array_to_wire(rec[k], where=f"{where}: {k}") for k in ARRAY_KEYS}
    return SiteOffer(site_id=head["site-id"], round=head["round"], arrays=arrays, meta=meta)


def content_nbytes(rd: RecordDict) -> int:
    """Bytes a reply carried, counted without decoding it (array payloads, text and bytes values, 8 per number), so
    an offer the coordinator cannot read still shows in the byte accounting (issue 4: bytes up per site)."""
    total = 0
    try:
        for rec in rd.array_records.values():
            total += sum(len(getattr(a, "data", b"") or b"") for a in rec.values())
        for rec in (*rd.config_records.values(), *rd.metric_records.values()):
            for v in rec.values():
                for x in (v if isinstance(v, list) else [v]):
                    total += len(x.encode()) if isinstance(x, str) else len(x) if isinstance(x, bytes) else 8
    except Exception:  # noqa: BLE001 - a count of hostile bytes must not fail; what was counted so far stands
        pass
    return total


# ---- hybrid mode: fine-tuning rounds --------------------------------------------------------------------------------
def finetune_to_records(task: FinetuneRound) -> RecordDict:
    return RecordDict({FINETUNE: ConfigRecord({"round": int(task.round),
                                               "recipe-json": json.dumps(task.recipe, sort_keys=True)}),
                       MODEL: _model_record(task.model)})


def records_to_finetune(rd: RecordDict, *, max_model_bytes: int = MAX_MODEL_BYTES) -> FinetuneRound:
    where = "fine-tuning task from the coordinator"
    _only(rd, {FINETUNE, MODEL}, where)
    head = _config(rd, FINETUNE, {"round": int, "recipe-json": str}, where)
    if head["round"] < 1:
        raise _fail(f"{where}: round", f"{head['round']} is not a round number (>= 1)")
    return FinetuneRound(head["round"], _model_bytes(rd, where, max_model_bytes),
                         _json_object(head["recipe-json"], f"{where}: recipe-json"))


def update_to_records(update: LocalUpdate) -> RecordDict:
    return RecordDict({UPDATE: ConfigRecord({"site-id": str(update.site_id), "round": int(update.round),
                                             "meta-json": json.dumps(update.meta, sort_keys=True, allow_nan=True)}),
                       MODEL: _model_record(update.model)})


def records_to_update(rd: RecordDict, *, max_model_bytes: int = MAX_MODEL_BYTES) -> LocalUpdate:
    """A site's fine-tuned model, still as bytes: the coordinator's `receive_update` validates and loads it."""
    where = "fine-tuned model from a site"
    _only(rd, {UPDATE, MODEL}, where)
    head = _config(rd, UPDATE, {"site-id": str, "round": int, "meta-json": str}, where)
    where = f"fine-tuned model from {head['site-id']!r}"
    meta = _json_object(head["meta-json"], f"{where}: meta-json")
    return LocalUpdate(head["site-id"], head["round"], _model_bytes(rd, where, max_model_bytes), meta)
