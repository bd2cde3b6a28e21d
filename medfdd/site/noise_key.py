"""The site's noise key: a secret that keys every random draw of private distillation.

The Gaussian mechanism's guarantee holds against an adversary who does not know the noise, and subsampling
amplification against one who does not know which records were sampled. The config's ``seed`` is reproducible by
design (and 0 by default), so it cannot be that secret. Each site therefore creates 32 random bytes from the
operating system (``secrets.token_bytes``) once, at ``output/noise_key`` (mode 0600, never sent anywhere), and
the distiller's generators are seeded by a digest of (key, seed): a rerun at the same site replays exactly (resume
without a second charge), while nobody without the key can regenerate the noise or the Poisson samples.
The generators themselves are torch's (Mersenne Twister, 64-bit seeds per step and stream), not a cryptographic
RNG: the same standard as Opacus without ``secure_mode``. ``privacy.noise_source: secure`` takes the Poisson samples
and the Gaussian noise from the operating system's CSPRNG instead (``mechanism.SECURE``); those draws cannot be
replayed, so a charged round is drawn at most once: it continues only from what it kept (checkpoint, bank), else
it is refused (``SecureNoiseReplay``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from medfdd.errors import MedfddError
from medfdd.io import write_error

KEY_FILENAME = "noise_key"
KEY_BYTES = 32


class NoiseKeyError(MedfddError):
    """The site's noise key exists but is not a key (wrong size, unreadable)."""


def load_or_create(path: Path) -> bytes:
    """The key at ``path``, created (exclusively, mode 0600, fsynced) when there is none yet."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    except OSError as e:
        raise write_error(path, e) from e
    key = secrets.token_bytes(KEY_BYTES)
    try:
        os.write(fd, key)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise write_error(path, e) from e
    os.close(fd)
    return key


def _read(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as e:
        raise NoiseKeyError(str(path), f"the site's noise key cannot be read ({e.strerror})",
                            "make the file readable by the site runner (mode 0600, owned by it)") from e
    if len(key) != KEY_BYTES:
        raise NoiseKeyError(str(path), f"holds {len(key)} bytes, not a {KEY_BYTES}-byte noise key",
                            "restore the key from the site's backup; a new key is only right for a new output folder "
                            "(rounds already charged cannot be replayed with another key)")
    return key


def keyed_seed(key: bytes, seed: int) -> int:
    """A 256-bit seed from the secret key and the config's seed (BLAKE2b keyed hash)."""
    return int.from_bytes(hashlib.blake2b(seed.to_bytes(16, "little"), key=key, digest_size=32).digest(), "little")
