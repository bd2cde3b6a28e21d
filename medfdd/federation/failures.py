"""What a failed site task tells the coordinator: one code of a small fixed set, never the error itself.

An exception's class and message can depend on the site's records (a `DistillError` when delta >= 1/n or when the
training split is empty, a quarantine count, a file name), and nothing derived from records may leave a site except
through a charged DP mechanism (shared/DESIGN.md, invariants 1 and 8). So the code is chosen by the phase the task
failed in, never by the exception: a phase before any record is read has its own code (its trigger is the
coordinator's message or the site's configuration alone); anything raised after is `site-failed`, whatever it was,
the audit gate's refusal included. The details stay in the site's own log. Both engines use this module (the
in-process loop and the Flower ClientApp), so the same code crosses either transport; what it still reveals is
listed in `privacy.report.channels`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from medfdd.config import SiteConfig, load_site_config

T = TypeVar("T")


class FailureCode(StrEnum):
    BAD_BROADCAST = "bad-broadcast"  # the coordinator's message could not be decoded (depends on that message only)
    NOT_CONFIGURED = "site-not-configured"  # no site config, or it does not load (depends on the config only)
    SITE_FAILED = "site-failed"  # anything once the site config loaded: reading records, distilling, the audit gate


class SiteTaskFailed(Exception):
    """Raised in place of the site's error (chained to it for the site's own log): its text is the code alone."""

    def __init__(self, code: FailureCode):
        super().__init__(code.value)
        self.code = FailureCode(code)


@contextmanager
def failing_as(code: FailureCode) -> Iterator[None]:
    """Any error inside becomes SiteTaskFailed(code), whatever its class or message (an earlier code is kept)."""
    try:
        yield
    except SiteTaskFailed:
        raise
    except Exception as e:  # noqa: BLE001 - the class of the error must not choose what leaves
        raise SiteTaskFailed(code) from e


def site_task(site: SiteConfig | Path, task: Callable[[SiteConfig], T]) -> T:
    """`task(config)` for a site, given its config or the path to load it from (a failure to load is
    `site-not-configured`); anything `task` raises is `site-failed`."""
    with failing_as(FailureCode.NOT_CONFIGURED):
        cfg = site if isinstance(site, SiteConfig) else load_site_config(site)
    with failing_as(FailureCode.SITE_FAILED):
        return task(cfg)


def code_in(reason: str) -> str:
    """The failure code in an error text received from a site (the Flower reason wraps it), else `unrecognised`:
    the coordinator records no more of a site's error than the code."""
    found = re.findall("|".join(re.escape(c.value) for c in FailureCode), str(reason)[:4096])
    return found[-1] if found else "unrecognised"
