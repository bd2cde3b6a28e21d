"""Engine-neutral messages: what a site sends (an offer) and what the coordinator broadcasts (the global model).

Arrays travel as raw little-endian bytes with their dtype and shape announced beside them, so a receiver checks the
announcement (and the byte count it implies) before allocating anything; nothing is ever unpickled (invariant 6).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from medfdd.errors import MedfddError

ALLOWED_DTYPES = ("float32", "int64")
MAX_META_CHARS = 64 * 1024  # a metadata or recipe JSON text from another party
MAX_MODEL_BYTES = 512 * 1024 * 1024  # a model's safetensors bytes from another party


class WireError(MedfddError):
    """An array on the wire is malformed (unknown dtype, shape that disagrees with its bytes, too large)."""


@dataclass(frozen=True)
class WireArray:
    dtype: str  # one of ALLOWED_DTYPES
    shape: tuple[int, ...]
    data: bytes  # C order, little-endian

    @property
    def announced_bytes(self) -> int:
        """Bytes implied by dtype and shape (what a receiver would allocate)."""
        if self.dtype not in ALLOWED_DTYPES or any((not isinstance(s, int)) or s < 0 for s in self.shape):
            return -1
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def to_wire(a: np.ndarray) -> WireArray:
    a = np.asarray(a)
    if a.dtype.name not in ALLOWED_DTYPES:
        raise WireError("array", f"dtype {a.dtype.name} cannot be sent", f"convert to one of {ALLOWED_DTYPES}")
    return WireArray(a.dtype.name, tuple(int(s) for s in a.shape),
                     np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())


def from_wire(w: WireArray, *, max_bytes: int, name: str = "array") -> np.ndarray:
    """Decode after checking the announcement: known dtype, non-negative shape, at most max_bytes, exact length."""
    if w.dtype not in ALLOWED_DTYPES:
        raise WireError(name, f"dtype {w.dtype!r} is not allowed", f"send one of {ALLOWED_DTYPES}")
    n = w.announced_bytes
    if n < 0:
        raise WireError(name, f"shape {w.shape} is not a list of non-negative integers", "send a valid shape")
    if n > max_bytes:
        raise WireError(name, f"announces {n} bytes, above the limit of {max_bytes}", "send a smaller array")
    if len(w.data) != n:
        raise WireError(name, f"{len(w.data)} bytes sent but dtype {w.dtype} x shape {w.shape} needs {n}",
                        "send the array's full contents")
    return np.frombuffer(w.data, dtype=np.dtype(w.dtype).newbyteorder("<")).astype(w.dtype).reshape(w.shape)


def _no_constants(token: str) -> float:
    if token == "Infinity":  # epsilon = inf marks a --no-dp offer; NaN and -Infinity have no meaning here
        return math.inf
    raise ValueError(f"{token} is not allowed")


def json_object(text: str) -> dict:
    """A JSON object received from another party (metadata, a recipe), at most MAX_META_CHARS long; ValueError names
    the problem (each engine's codec wraps it in its own error)."""
    if len(text) > MAX_META_CHARS:
        raise ValueError(f"{len(text)} characters, more than {MAX_META_CHARS}")
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deep enough to exhaust the parser's stack
        raise ValueError(f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, expected an object")
    return value


def _meta_bytes(meta: dict) -> int:
    return len(json.dumps(meta, sort_keys=True, default=str).encode())


@dataclass
class SiteOffer:
    """A site's synthetic set for one round: arrays "images" and "labels" plus allow-listed metadata."""

    site_id: str
    round: int
    arrays: dict[str, WireArray]
    meta: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(len(a.data) for a in self.arrays.values()) + _meta_bytes(self.meta)


@dataclass
class Broadcast:
    """The coordinator's message to every site for one round: the global model (safetensors bytes) from round 2."""

    round: int
    model: bytes | None = None

    def nbytes(self) -> int:
        return len(self.model or b"") + _meta_bytes({"round": self.round})


@dataclass
class FinetuneRound:
    """Hybrid mode, coordinator -> site: DP fine-tuning round `round` (1-based, after the distillation rounds) of the
    global model (safetensors bytes) with the consortium's recipe (`CoordinatorConfig.finetune` as a dict)."""

    round: int
    model: bytes
    recipe: dict

    def nbytes(self) -> int:
        return len(self.model) + _meta_bytes({"round": self.round, "recipe": self.recipe})


UPDATE_META = ("site_id", "round", "epsilon", "noise_multiplier", "sample_rate", "steps")  # a LocalUpdate's allow-list


@dataclass
class LocalUpdate:
    """Hybrid mode, site -> coordinator: the site's locally DP-fine-tuned model (safetensors bytes) and allow-listed
    metadata (`UPDATE_META`)."""

    site_id: str
    round: int
    model: bytes
    meta: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return len(self.model) + _meta_bytes(self.meta)
