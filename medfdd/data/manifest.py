"""labels.csv -> manifest entries, with every unusable row quarantined.

Columns: path,label[,patient_id]. Paths are relative to the data root and must stay inside it: absolute paths,
`..` components and symlinks that resolve outside the root are refused.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from medfdd.data.quarantine import QuarantineEntry, Reason
from medfdd.errors import ManifestError

REQUIRED = ("path", "label")
OPTIONAL = ("patient_id",)


@dataclass(frozen=True)
class ManifestEntry:
    row: int  # line number in labels.csv (header = 1)
    path: str  # as written
    file: Path  # resolved, inside the root (a folder for a DICOM series)
    label: int  # class index
    patient_id: str | None


def _read_rows(manifest: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    if not manifest.is_file():
        raise ManifestError(str(manifest), "manifest not found", "create labels.csv with columns path,label[,patient_id]"
                            " under data.root, or set data.manifest")
    raw = manifest.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(str(manifest), f"not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start})",
                            "re-save the manifest as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ManifestError(str(manifest), "manifest is empty", "add the header line path,label[,patient_id]") from None
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ManifestError(str(manifest), f"missing column(s) {missing} (header is {header})",
                            "the header must be path,label[,patient_id]")
    extra = [c for c in header if c not in REQUIRED + OPTIONAL]
    if extra:
        raise ManifestError(str(manifest), f"unknown column(s) {extra}",
                            "remove them: only path,label[,patient_id] are read (extra columns may carry PHI)")
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise ManifestError(str(manifest), f"repeated column(s) {dup}", "keep each column once")
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue  # blank line
        rows.append((reader.line_num, values))
    return header, rows


def resolve_inside(root: Path, rel: str) -> Path | str:
    """The resolved path of `rel` under `root`, or a string saying why it is refused."""
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return "absolute paths are not allowed"
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        return "'..' is not allowed in paths"
    try:
        resolved = (root / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long for the file system
        return f"cannot be resolved ({type(e).__name__}: {e})"
    if not resolved.is_relative_to(root):
        return f"resolves outside the data root (through a symlink) to {resolved}"
    return resolved


def read_manifest(root: Path, manifest_name: str, classes: list[str]) -> tuple[list[ManifestEntry], list[QuarantineEntry]]:
    """Parse and check the manifest; rows that cannot be used become quarantine entries (typed, with a fix)."""
    root = Path(root).resolve()
    manifest = root / manifest_name
    header, rows = _read_rows(manifest)
    col = {name: header.index(name) for name in header}
    class_index = {c: i for i, c in enumerate(classes)}
    entries: list[ManifestEntry] = []
    bad: list[QuarantineEntry] = []
    # (patient id, file) -> (first row, its label): rows are compared only within one patient (or the pool of rows
    # without an id), so one patient's rows never decide another's (`site_data.load_site_data`)
    first_row_of: dict[tuple[str | None, Path], tuple[int, str]] = {}
    conflicted: set[tuple[str | None, Path]] = set()  # files listed twice by one patient under two labels

    for line, values in rows:
        values = values + [""] * (len(header) - len(values))
        path = values[col["path"]].strip()
        label = values[col["label"]].strip()
        pid = values[col["patient_id"]].strip() if "patient_id" in col else ""
        if len(values) > len(header):
            bad.append(QuarantineEntry(line, path, Reason.UNREADABLE, f"{len(values)} fields for {len(header)} columns",
                                       "quote fields that contain commas"))
            continue
        if not path:
            bad.append(QuarantineEntry(line, path, Reason.EMPTY_PATH, "the path field is empty", "fill in the path"))
            continue
        if "\0" in path:
            bad.append(QuarantineEntry(line, path, Reason.UNREADABLE, "the path holds a NUL character",
                                       "correct the path in the manifest (an export or encoding fault)"))
            continue
        where = resolve_inside(root, path)
        if isinstance(where, str):
            bad.append(QuarantineEntry(line, path, Reason.OUTSIDE_ROOT, where,
                                       f"copy the file under {root} and list it relative to that folder"))
            continue
        if label not in class_index:
            bad.append(QuarantineEntry(line, path, Reason.UNKNOWN_LABEL, f"label {label!r} is not one of {classes}",
                                       "correct the label or add the class to data.classes (consortium-wide)"))
            continue
        try:
            exists = where.exists()
        except OSError as e:
            bad.append(QuarantineEntry(line, path, Reason.UNREADABLE, f"{type(e).__name__}: {e}",
                                       "make the file readable by the site runner's user"))
            continue
        if not exists:
            bad.append(QuarantineEntry(line, path, Reason.MISSING_FILE, f"{where} does not exist",
                                       "restore the file or remove its row"))
            continue
        key = (pid or None, where)
        if key in first_row_of:
            first, first_label = first_row_of[key]
            if first_label != label:
                conflicted.add(key)
            detail = f"same file as row {first}" + ("" if first_label == label else
                                                     f" with a different label ({first_label!r} vs {label!r})")
            bad.append(QuarantineEntry(line, path, Reason.DUPLICATE_ROW, detail, "list each file once"))
            continue
        first_row_of[key] = (line, label)
        entries.append(ManifestEntry(line, path, where, class_index[label], pid or None))

    # a file listed with two different labels: the first row is ambiguous too
    if conflicted:
        keep = []
        for e in entries:
            if (e.patient_id, e.file) in conflicted:
                bad.append(QuarantineEntry(e.row, e.path, Reason.DUPLICATE_ROW,
                                           "listed again later with a different label",
                                           "keep one row with the correct label"))
            else:
                keep.append(e)
        entries = keep
    return entries, sorted(bad, key=lambda q: q.row)
