"""Quarantine: every manifest row not used, with a reason code, the detail and the fix (nothing is dropped silently)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum


class Reason(StrEnum):
    EMPTY_PATH = "empty_path"
    OUTSIDE_ROOT = "outside_root"
    MISSING_FILE = "missing_file"
    DUPLICATE_ROW = "duplicate_row"
    UNKNOWN_LABEL = "unknown_label"
    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"
    NOT_DICOM = "not_dicom"
    NO_PIXEL_DATA = "no_pixel_data"
    UNSUPPORTED_COMPRESSION = "unsupported_compression"
    CORRUPT_PIXEL_DATA = "corrupt_pixel_data"
    TOO_LARGE = "too_large"
    WRONG_DIMENSIONALITY = "wrong_dimensionality"
    NON_FINITE = "non_finite"
    CONSTANT_IMAGE = "constant_image"
    INCONSISTENT_SERIES = "inconsistent_series"
    NO_PATIENT_ID = "no_patient_id"


@dataclass(frozen=True)
class QuarantineEntry:
    row: int  # line number in labels.csv (the header is line 1)
    path: str  # as written in the manifest
    reason: Reason
    detail: str
    fix: str

    def to_json(self) -> dict:
        d = asdict(self)
        d["reason"] = str(self.reason)
        return d


class RecordRejected(Exception):
    """Raised while loading one record; the caller turns it into a QuarantineEntry for that row."""

    def __init__(self, reason: Reason, detail: str, fix: str):
        self.reason, self.detail, self.fix = reason, detail, fix
        super().__init__(f"{reason}: {detail}")


def as_rejection(err: Exception) -> RecordRejected:
    """What reading one record raised, as that row's rejection: an OSError (permission denied, I/O error, vanished
    file) is unreadable, anything else unexpected is reported with its type; one file never stops the site."""
    if isinstance(err, RecordRejected):
        return err
    if isinstance(err, OSError):
        return RecordRejected(Reason.UNREADABLE, f"{type(err).__name__}: {err}",
                              "make the file readable by the site runner's user")
    return RecordRejected(Reason.UNREADABLE, f"unexpected {type(err).__name__} while reading it: {err}"[:500],
                          "re-export the file; report it to the medfdd maintainers if it opens in other viewers")
