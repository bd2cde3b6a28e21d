"""NVFlare `Shareable` <-> the engine-neutral messages (pure functions), the counterpart of the Flower codec.

What crosses the wire, and nothing else (plain msgpack types: NVFlare's FOBS never unpickles them):
- coordinator -> site (`Broadcast`, task `distill`; after the last round task `final_model`):
  {"broadcast": {"round": int}} and, from round 2, {"model": the global model's safetensors bytes}.
- site -> coordinator (`SiteOffer`): {"offer": {"site-id", "round", "meta-json"}, "arrays": {"images", "labels"}},
  each array {"dtype": str, "shape": [int], "data": raw little-endian C-order bytes}; to `final_model` an empty reply.
- a failed site task: return code EXECUTION_EXCEPTION and header `medfdd-failure` = its `FailureCode` only.

The receiver checks keys, types and sizes before anything is decoded (arrays are decoded later by the coordinator's
`from_wire`, which checks dtype, shape and byte count before allocating); NVFlare's own header key is the only other
key allowed.
"""

from __future__ import annotations

import json

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from medfdd.errors import MedfddError
from medfdd.messages import MAX_MODEL_BYTES, Broadcast, SiteOffer, WireArray, json_object

BROADCAST = "broadcast"
MODEL = "model"
OFFER = "offer"
ARRAYS = "arrays"
ARRAY_KEYS = ("images", "labels")
ARRAY_FIELDS = {"dtype": str, "shape": list, "data": bytes}
FAILURE_HEADER = "medfdd-failure"


class CodecError(MedfddError):
    """An NVFlare message does not have the agreed shape (keys, types, sizes)."""


def _fail(where: str, problem: str) -> CodecError:
    return CodecError(where, problem, "sites and the coordinator must run the same medfdd version")


def _only(s: dict, names: set[str], where: str) -> None:
    if not isinstance(s, dict):
        raise _fail(where, f"a {type(s).__name__}, expected a Shareable")
    extra = sorted(str(k) for k in set(s) - names - {ReservedHeaderKey.HEADERS})
    if extra:
        raise _fail(where, f"unexpected keys {extra} (allowed: {sorted(names)})")
    if not isinstance(s.get(ReservedHeaderKey.HEADERS, {}), dict):
        raise _fail(f"{where}: {ReservedHeaderKey.HEADERS}", "not a dict (NVFlare's headers)")


def _fields(value, keys: dict[str, type], where: str) -> dict:
    """`value` is a dict with exactly `keys`, each of its type (a bool is not an int)."""
    if not isinstance(value, dict):
        raise _fail(where, f"a {type(value).__name__}, expected a dict")
    if set(value) != set(keys):
        raise _fail(where, f"keys {sorted(map(str, value))}, expected {sorted(keys)}")
    for k, t in keys.items():
        if not isinstance(value[k], t) or (t is int and isinstance(value[k], bool)):
            raise _fail(f"{where}.{k}", f"{type(value[k]).__name__}, expected {t.__name__}")
    return value


def broadcast_to_shareable(b: Broadcast) -> Shareable:
    s = Shareable({BROADCAST: {"round": int(b.round)}})
    if b.model is not None:
        s[MODEL] = bytes(b.model)
    return s


def shareable_to_broadcast(s: Shareable, *, max_model_bytes: int = MAX_MODEL_BYTES) -> Broadcast:
    where = "broadcast from the coordinator"
    _only(s, {BROADCAST, MODEL}, where)
    round_ = _fields(s.get(BROADCAST), {"round": int}, f"{where}: {BROADCAST}")["round"]
    if round_ < 1:
        raise _fail(f"{where}: round", f"{round_} is not a round number (>= 1)")
    model = s.get(MODEL)
    if model is not None and (not isinstance(model, bytes) or len(model) > max_model_bytes):
        raise _fail(f"{where}: {MODEL}", f"expected at most {max_model_bytes} safetensors bytes")
    return Broadcast(round=round_, model=model)


def offer_to_shareable(offer: SiteOffer) -> Shareable:
    if set(offer.arrays) != set(ARRAY_KEYS):
        raise _fail(f"offer of {offer.site_id}", f"arrays {sorted(offer.arrays)}, expected {list(ARRAY_KEYS)}")
    arrays = {k: {"dtype": str(w.dtype), "shape": [int(n) for n in w.shape], "data": bytes(w.data)}
              for k, w in ((k, offer.arrays[k]) for k in ARRAY_KEYS)}
    return Shareable({OFFER: {"site-id": str(offer.site_id), "round": int(offer.round),
                              "meta-json": json.dumps(offer.meta, sort_keys=True, allow_nan=True)},
                      ARRAYS: arrays})


def shareable_to_offer(s: Shareable) -> SiteOffer:
    """The site's offer, still as wire arrays: the coordinator's `receive` checks sizes and decodes them."""
    where = "offer from a site"
    _only(s, {OFFER, ARRAYS}, where)
    head = _fields(s.get(OFFER), {"site-id": str, "round": int, "meta-json": str}, f"{where}: {OFFER}")
    where = f"offer from {head['site-id']!r}"
    try:
        meta = json_object(head["meta-json"])
    except ValueError as e:
        raise _fail(f"{where}: meta-json", str(e)) from None
    rec = _fields(s.get(ARRAYS), dict.fromkeys(ARRAY_KEYS, dict), f"{where}: {ARRAYS}")
    arrays = {}
    for k in ARRAY_KEYS:
        a = _fields(rec[k], ARRAY_FIELDS, f"{where}: {k}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in a["shape"]):
            raise _fail(f"{where}: {k}.shape", "expected a list of non-negative integers")
        arrays[k] = WireArray(dtype=a["dtype"], shape=tuple(a["shape"]), data=a["data"])
    return SiteOffer(site_id=head["site-id"], round=head["round"], arrays=arrays, meta=meta)


def failure_reply(code: str) -> Shareable:
    """A failed site task: NVFlare's EXECUTION_EXCEPTION and the failure code, nothing of the error."""
    s = Shareable()
    s.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    s.set_header(FAILURE_HEADER, str(code))
    return s


def shareable_nbytes(s) -> int:
    """Bytes a reply carried, counted without decoding it (bytes and text values, 8 per number), so an offer the
    coordinator cannot read still shows in the byte accounting."""
    def count(v, depth: int = 0) -> int:
        if depth > 8:
            return 0
        if isinstance(v, bytes | str):
            return len(v.encode() if isinstance(v, str) else v)
        if isinstance(v, dict):
            return sum(count(x, depth + 1) for k, x in v.items() if k != ReservedHeaderKey.HEADERS)
        if isinstance(v, list | tuple):
            return sum(count(x, depth + 1) for x in v)
        return 8

    try:
        return count(s)
    except Exception:  # noqa: BLE001 - a count of hostile bytes must not fail
        return 0
