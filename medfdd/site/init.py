"""`medfdd site init`: a site's config and labels.csv from the consortium agreement and a folder-per-class export.

The export is one folder per agreed class, named exactly as the class, holding that class's scans at any depth::

    DATA/<class>/<scan>                  PNG, NIfTI or DICOM files
    DATA/<class>/<patient>/<scan>        the folder directly below the class folder names the patient
    DATA/<class>/[<patient>/]<series>/   3D consortia: a folder of single-frame DICOM slices is one scan (a series)

Patient ids (`--patient-id auto`): a DICOM scan's PatientID (its first slice's for a series) when set, else the name of
the folder directly below the class folder when the scan lies inside one (and is not that folder itself), else none
(the scan is then its own unit of the train / audit split). They stay at the site, in labels.csv.

Hidden entries (names starting with `.`), DICOMDIR indexes and symlinked folders (never followed) are skipped and
listed; any other file that is no scan is refused, or skipped and listed with `--skip-unknown`. Nothing is dropped
without being reported.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from rich.console import Console
from rich.table import Table

from medfdd.config import (
    DEFAULT_PAID_STEPS,
    SCHEMA_FILE,
    Agreement,
    SiteConfig,
    dump_config,
    hybrid_finetune_share,
    load_site_config,
    parse_config,
    schema_text,
)
from medfdd.data.load import detect_format
from medfdd.data.quarantine import RecordRejected
from medfdd.errors import ConfigError, ExportError, OutputExistsError
from medfdd.io import atomic_write_text

MANIFEST = "labels.csv"
FORMATS = ("auto", "dicom", "nifti", "png")
PATIENT_ID_RULES = ("auto", "folder", "none")
SKIPPED_NAMES = {"DICOMDIR"}  # DICOM media index: no image
AGREED_KEYS = ("data.classes", "data.spatial_size", "data.channels", "data.intensity", "data.orientation",
               "data.spacing", "privacy.dp", "privacy.epsilon", "privacy.delta", "privacy.unit", "privacy.rounds",
               "privacy.finetune_rounds", "distill.ipc")
SHOWN = 20  # skipped or refused paths printed before "... and N more"


@dataclass(frozen=True)
class Scan:
    path: str  # POSIX, relative to the data root (a folder for a DICOM series)
    label: str
    patient_id: str  # "" when none
    fmt: str
    patient_from: str  # dicom | folder | none


@dataclass
class InitResult:
    """What `init_site` wrote and found (paths absolute)."""

    config: Path
    manifest: Path
    schema: Path
    site_id: str
    scans_per_class: dict[str, int]
    patients: int
    formats: dict[str, int]
    patient_id_from: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    missing_classes: list[str] = field(default_factory=list)


def _listing(paths: list[str]) -> str:
    more = f" ... and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    return ", ".join(paths[:SHOWN]) + more


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "NumberOfFrames"])
    except Exception:  # an unreadable header: `site check` quarantines the scan with the reason
        return None


def _frames(ds: pydicom.Dataset | None) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1) if ds is not None else 1
    except (TypeError, ValueError):
        return 1


def _patient(ds: pydicom.Dataset | None, rel: tuple[str, ...], rule: str) -> tuple[str, str]:
    """(patient id, where it came from) of a scan at `rel` (its parts below the data root, class folder first)."""
    if rule == "none":
        return "", "none"
    pid = str(ds.get("PatientID", "") or "").strip() if ds is not None and rule == "auto" else ""
    if pid:
        return pid, "dicom"
    if len(rel) > 2:  # <class>/<patient>/.../<scan>
        return rel[1], "folder"
    return "", "none"


def _file_format(path: Path, fmt: str) -> str | None:
    """The file's format (None: no scan), checked against a format the operator fixed."""
    try:
        found = detect_format(path)
    except (RecordRejected, OSError):
        # a fixed format is trusted for files without a suffix (DICOM exports often have none), where nothing tells
        return fmt if fmt != "auto" and not path.suffix else None
    return found if fmt in ("auto", found) else None


def scan_export(root: Path, agreement: Agreement, *, fmt: str = "auto", patient_id: str = "auto",
                skip_unknown: bool = False, allow_missing_classes: bool = False,
                manifest: str = MANIFEST) -> tuple[list[Scan], list[dict[str, str]], list[str]]:
    """Walk DATA/<class>/... into manifest rows; -> (scans, skipped entries with the reason, classes without scans).

    Refuses (ExportError) a folder that is no agreed class, an agreed class without scans (unless
    `allow_missing_classes`), files that are no scan of `fmt` (unless `skip_unknown`) and, in a 3D consortium, a
    series folder that holds anything besides its slices.
    """
    root = root.resolve()
    volumes = len(agreement.spatial_size) == 3
    skipped: list[dict[str, str]] = []
    unknown: list[str] = []
    strangers: list[str] = []
    scans: list[Scan] = []

    def skip(rel: str, why: str) -> None:
        skipped.append({"path": rel, "reason": why})

    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            skip(entry.name, "hidden")
        elif entry.is_dir() and entry.name not in agreement.classes:
            strangers.append(entry.name)
        elif not entry.is_dir() and entry.name != manifest:
            unknown.append(entry.name)  # a file outside every class folder
    if strangers:
        raise ExportError(f"--data {root}", f"folder(s) {strangers} are not classes of the agreement "
                          f"{agreement.classes}", "rename each class folder to its agreed class name exactly, or move "
                          "the folder out of the export")

    for label in agreement.classes:
        folder = root / label
        if not folder.is_dir():
            continue
        for here, dirs, files in os.walk(folder):
            here_p = Path(here)
            rel_here = here_p.relative_to(root).parts
            for d in sorted(dirs):
                if d.startswith("."):
                    skip("/".join((*rel_here, d)), "hidden")
                elif (here_p / d).is_symlink():
                    skip("/".join((*rel_here, d)), "symlinked folder (not followed)")
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here_p / d).is_symlink())
            slices: list[tuple[str, pydicom.Dataset | None]] = []
            others: list[str] = []  # what else the folder holds (hidden files aside): never part of a series
            for name in sorted(files):
                rel = "/".join((*rel_here, name))
                if name.startswith("."):
                    skip(rel, "hidden")
                    continue
                if name.upper() in SKIPPED_NAMES:
                    skip(rel, "DICOM media index (no image)")
                    others.append(name)
                    continue
                kind = _file_format(here_p / name, fmt)
                if kind is None:
                    unknown.append(rel)
                    others.append(name)
                    continue
                ds = _dicom_header(here_p / name) if kind == "dicom" else None
                if volumes and kind == "dicom" and _frames(ds) == 1:
                    slices.append((name, ds))
                    continue
                others.append(name)
                pid, source = _patient(ds, (*rel_here, name), patient_id)
                scans.append(Scan(rel, label, pid, kind, source))
            if slices:  # a series folder: one scan, the folder
                if others or dirs or here_p == folder:
                    where = "/".join(rel_here)
                    raise ExportError(f"{root / where}", f"holds {len(slices)} single-frame DICOM slice(s) (a series) "
                                      + ("directly in the class folder" if here_p == folder else
                                         f"next to {sorted(others + dirs)[:5]}"),
                                      "put each series in its own folder (slices only), e.g. <class>/<patient>/<series>/")
                pid, source = _patient(slices[0][1], rel_here, patient_id)  # <class>/<series>: no patient folder
                scans.append(Scan("/".join(rel_here), label, pid, "dicom", source))

    if unknown and not skip_unknown:
        what = "neither PNG, NIfTI nor DICOM" if fmt == "auto" else f"not {fmt} files"
        raise ExportError(f"--data {root}", f"{len(unknown)} file(s) are {what} or lie outside every class folder: "
                          f"{_listing(unknown)}", "move them out of the export, or pass --skip-unknown to skip them "
                          "(each is listed)" + ("" if fmt == "auto" else ", or use --format auto"))
    skipped += [{"path": u, "reason": "unknown format or outside every class folder"} for u in unknown]
    counts = Counter(s.label for s in scans)
    missing = [c for c in agreement.classes if counts[c] == 0]
    if missing and not allow_missing_classes:
        raise ExportError(f"--data {root}", f"agreed class(es) {missing} have no folder or no scans",
                          "export their scans into DATA/<class>/, or pass --allow-missing-classes if this site has "
                          "none of them (the classes stay in the config: their indices are consortium-wide)")
    return scans, skipped, missing


def _relative(path: Path, start: Path) -> str:
    """`path` relative to `start` (POSIX), or absolute where no relative path exists."""
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive
        return str(path.resolve())


def site_config_data(agreement: Agreement, site_id: str, *, data_root: str, output: str, fmt: str) -> dict:
    """A site config mapping: the agreed keys from `agreement`, the site's own ones as given or at their defaults."""
    budget = agreement.sites[site_id]
    return {
        "site_id": site_id,
        "data": {"root": data_root, "manifest": MANIFEST, "format": fmt, "classes": agreement.classes,
                 "spatial_size": agreement.spatial_size, "channels": agreement.channels,
                 "intensity": agreement.intensity.model_dump(mode="json"), "orientation": agreement.orientation,
                 "spacing": agreement.spacing},
        "privacy": {"dp": budget.dp, "epsilon": budget.epsilon, "delta": budget.delta, "unit": budget.unit,
                    "rounds": agreement.rounds, "finetune_rounds": agreement.finetune_rounds,
                    "finetune_share": hybrid_finetune_share(budget.epsilon) if agreement.finetune_rounds else 0.0},
        "distill": {"ipc": agreement.ipc, "iterations": math.ceil(DEFAULT_PAID_STEPS / agreement.rounds)},
        "output": output,
    }


def _header(site_id: str, agreement_path: Path) -> str:
    return (f"# yaml-language-server: $schema={SCHEMA_FILE.format(kind='site')}\n"
            f"# Site config of {site_id}, written by `medfdd site init` from {agreement_path.name}.\n"
            f"# Agreed with the consortium (keep as written): {', '.join(AGREED_KEYS[:6])},\n"
            f"#   {', '.join(AGREED_KEYS[6:])}.\n"
            "# Every other key is this site's choice, shown at its default (docs/configuration.md).\n")


def init_site(agreement: Agreement, *, agreement_path: Path, site_id: str, data: Path, out: Path,
              output: Path | None = None, fmt: str = "auto", patient_id: str = "auto", skip_unknown: bool = False,
              allow_missing_classes: bool = False, force: bool = False,
              console: Console | None = None) -> InitResult:
    """Write DATA/labels.csv, the site config `out` and its JSON Schema beside it; refuse before writing anything.

    `output` (the site's artifact folder) defaults to runs/<site_id> in the current folder; paths in the config are
    relative to the config file.
    """
    console = console or Console()
    if site_id not in agreement.sites:
        raise ConfigError(f"{agreement_path}: key 'sites'", f"site id {site_id!r} is not in the agreement "
                          f"({sorted(agreement.sites)})", "use the site id the coordinator registered for you, or "
                          "ask the coordinator to add your site to the consortium and publish the agreement again")
    if not data.is_dir():
        raise ExportError(f"--data {data}", "is not a folder", "pass the folder holding one sub-folder per class")
    if fmt not in FORMATS or patient_id not in PATIENT_ID_RULES:
        raise ConfigError("--format/--patient-id", f"{fmt!r}/{patient_id!r} is not one of {FORMATS}/"
                          f"{PATIENT_ID_RULES}", "pick a listed value")
    manifest = data / MANIFEST
    existing = [str(p) for p in (out, manifest) if p.exists()]
    if existing and not force:
        raise OutputExistsError(", ".join(existing), "already exist(s); nothing was written",
                                "pass --force to replace them (a site config you edited is lost), or choose --out")
    scans, skipped, missing = scan_export(data, agreement, fmt=fmt, patient_id=patient_id, skip_unknown=skip_unknown,
                                          allow_missing_classes=allow_missing_classes)
    output = output if output is not None else Path("runs") / site_id
    cfg_data = site_config_data(agreement, site_id, data_root=_relative(data, out.parent),
                                output=_relative(output, out.parent), fmt=fmt)
    cfg = parse_config(cfg_data, SiteConfig, f"site config for {site_id}", out.resolve().parent)

    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["path", "label", "patient_id"])
    w.writerows((s.path, s.label, s.patient_id) for s in scans)
    atomic_write_text(manifest, text.getvalue())
    schema = atomic_write_text(out.parent / SCHEMA_FILE.format(kind="site"), schema_text("site"))
    atomic_write_text(out, _header(site_id, agreement_path) + dump_config(cfg))
    written = load_site_config(out)  # what `site check` will read
    budget = agreement.sites[site_id]
    if (written.privacy.epsilon, written.privacy.delta, written.privacy.dp, written.privacy.unit) != (
            budget.epsilon, budget.delta, budget.dp, budget.unit) or written.data_root != data.resolve():
        raise ConfigError(str(out), "the written config does not hold the agreed budget or data root",
                          "report this as a bug")

    counts = Counter(s.label for s in scans)
    result = InitResult(
        config=out.resolve(), manifest=manifest.resolve(), schema=schema.resolve(), site_id=site_id,
        scans_per_class={c: counts[c] for c in agreement.classes},
        patients=len({s.patient_id for s in scans if s.patient_id}),
        formats=dict(Counter(s.fmt for s in scans)), patient_id_from=dict(Counter(s.patient_from for s in scans)),
        skipped=skipped, missing_classes=missing)
    _print(console, result, scans)
    return result


def _print(console: Console, r: InitResult, scans: list[Scan]) -> None:
    t = Table(title=f"{r.site_id}: {sum(r.scans_per_class.values())} scans of {r.patients} patients")
    t.add_column("class", style="bold")
    t.add_column("scans", justify="right")
    t.add_column("patients", justify="right")
    for c, n in r.scans_per_class.items():
        t.add_row(c, str(n), str(len({s.patient_id for s in scans if s.label == c and s.patient_id})))
    console.print(t)
    console.print(f"formats: {r.formats}; patient id from: {r.patient_id_from}", highlight=False)
    if r.patient_id_from.get("none"):
        console.print(f"[yellow]note[/]: {r.patient_id_from['none']} scan(s) have no patient id (each is its own unit "
                      "of the train / audit split; under privacy.unit: patient they are quarantined)", highlight=False)
    if r.patients == 1 and len(scans) > 1:
        console.print("[yellow]warning[/]: every scan has the same patient id (an anonymised PatientID?): the whole "
                      "site lands on one side of the split; use --patient-id folder or fill in labels.csv",
                      highlight=False)
    if r.missing_classes:
        console.print(f"[yellow]note[/]: no scans of {r.missing_classes} at this site", highlight=False)
    if r.skipped:
        console.print(f"skipped {len(r.skipped)} entr{'y' if len(r.skipped) == 1 else 'ies'}: "
                      + _listing([f"{s['path']} ({s['reason']})" for s in r.skipped]), highlight=False)
    console.print(f"wrote {r.manifest}, {r.config} and {r.schema.name}; next: [bold]medfdd site check {r.config}[/]",
                  highlight=False)
