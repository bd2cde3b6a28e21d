"""`medfdd site check`: load every scan, report counts, write quarantine.json and split.json (both stay at the site)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from medfdd import __version__
from medfdd.config import DistillConfig, SiteConfig
from medfdd.data.site_data import SiteData, load_site_data
from medfdd.errors import NoUsableDataError
from medfdd.io import atomic_write_json


@dataclass
class CheckReport:
    site_id: str
    n_rows: int
    n_used: int
    n_quarantined: int
    class_counts: dict[str, int]  # usable records per class
    train_counts: dict[str, int]
    holdout_counts: dict[str, int]
    by_reason: dict[str, int]
    shapes: dict[str, int]  # "format/modality shape" -> count
    warnings: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)  # settings measured better for a site of this size
    quarantine_path: Path | None = None
    n_unused: int = 0  # usable scans left out by `privacy.unit: patient` (further scans of a training patient)


def _site_warnings(cfg: SiteConfig, data: SiteData) -> list[str]:
    out = []
    counts, trained = data.class_counts(), data.class_counts(data.train)
    empty = [c for c, k in counts.items() if k == 0]
    if empty:
        out.append(f"no usable record for class(es) {empty}: this site contributes nothing for them")
    held = [c for c, k in counts.items() if k > 0 and trained[c] == 0]
    if held:
        out.append(f"every usable record of class(es) {held} is in the audit holdout ({cfg.data.split} split): this "
                   "site trains on nothing for them. Lower data.holdout_fraction, or use data.split: stratified "
                   "(exact per-class fractions, but it reshuffles patients when the manifest grows)")
    if sum(1 for k in counts.values() if k > 0) == 1:
        out.append("only one class at this site: fine for a consortium, but local-only models are meaningless")
    n_train = len(data.train)
    per_patient = Counter(data.patient_ids[i] for i in data.train.tolist() if data.patient_ids[i] is not None)
    several = {p: k for p, k in per_patient.items() if k > 1}
    if cfg.privacy.dp and cfg.privacy.unit == "scan" and several:
        out.append(f"privacy.unit = scan: epsilon protects each scan, and {len(several)} training patient(s) have "
                   f"several scans (up to {max(several.values())}); such a patient is protected only as a group of "
                   "scans (up to that many times epsilon). Set privacy.unit: patient to protect every patient at "
                   "epsilon (one scan per training patient)")
    if data.shared_content:
        rows = "; ".join(", ".join(map(str, g)) for g in data.shared_content[:10])
        more = f" and {len(data.shared_content) - 10} more" if len(data.shared_content) > 10 else ""
        out.append(f"{len(data.shared_content)} scan(s) appear under more than one patient (or both with and without "
                   f"a patient id): manifest rows {rows}{more}. Duplicates are only removed within one patient, so "
                   "that the records of one patient never depend on another's: each copy is used as its own record, "
                   f"and such a scan is protected only as a group of up to {max(map(len, data.shared_content))} "
                   "records. If it is one scan exported twice, keep one row, under the right patient id")
    if cfg.privacy.dp and n_train and cfg.privacy.delta >= 1.0 / n_train:
        out.append(f"privacy.delta = {cfg.privacy.delta:g} is not below 1/n = 1/{n_train}: "
                   "use a delta well below 1/n (e.g. 1e-5) or distillation will refuse to run")
    return out


LARGE_SITE_PER_CLASS = 1000  # median training records per present class from which the large-site settings help
LARGE_SITE_BATCH_PER_CLASS = DistillConfig.model_fields["batch_per_class"].default  # the default is the large-site one
LARGE_SITE_INNER_STEPS = 10


def settings_hints(cfg: SiteConfig, train_counts: dict[str, int]) -> list[str]:
    """Where a config overrides the defaults with settings measured worse on sites with thousands of records per
    class (federated Fashion-MNIST at epsilon 1, docs/benchmarks.md). Advice only: the config is never changed."""
    d, present = cfg.distill, sorted(k for k in train_counts.values() if k > 0)
    if not cfg.privacy.dp or d.method != "dm" or d.schedule != "decoupled" or not present:
        return []
    median = present[len(present) // 2]
    if median < LARGE_SITE_PER_CLASS:
        return []
    k, out = len(train_counts), []
    if (batch := d.expected_batch(k)) < LARGE_SITE_BATCH_PER_CLASS * k:
        out.append(f"distill.batch_size = {batch} samples about {batch / k:.0f} records per class per "
                   f"step while this site holds about {median} per class: try batch_size: "
                   f"{LARGE_SITE_BATCH_PER_CLASS * k} (sigma is recalibrated, the noise per class mean stays about "
                   "the same and its sampling noise falls; +2.3 points measured at epsilon 1)")
    if d.updates_per_statistic < LARGE_SITE_INNER_STEPS:
        out.append(f"distill.inner_steps = {d.updates_per_statistic}: try {LARGE_SITE_INNER_STEPS} (more synthetic "
                   "updates per paid statistic are post-processing and cost no privacy)")
    if d.allocation == "uniform":
        out.append("distill.allocation = uniform: try evidence (images go to the classes this site holds many "
                   "records of)")
    return out


def check_report(cfg: SiteConfig, data: SiteData) -> CheckReport:
    reasons = Counter(str(q.reason) for q in data.quarantine)
    shapes = Counter(f"{i.format}/{i.modality} {'x'.join(map(str, i.original_shape))}" for i in data.infos)
    train_counts = data.class_counts(data.train)
    return CheckReport(
        site_id=cfg.site_id, n_rows=data.n_rows, n_used=len(data.labels), n_quarantined=len(data.quarantine),
        class_counts=data.class_counts(), train_counts=train_counts,
        holdout_counts=data.class_counts(data.holdout), by_reason=dict(sorted(reasons.items())),
        shapes=dict(shapes.most_common()), warnings=_site_warnings(cfg, data),
        hints=settings_hints(cfg, train_counts), n_unused=len(data.unused))


def write_site_reports(cfg: SiteConfig, data: SiteData, report: CheckReport) -> Path:
    """quarantine.json (every unusable row and why) and split.json (manifest rows per side, and the training
    patients' scans left out by `privacy.unit: patient`), atomically."""
    out = cfg.output_dir
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = atomic_write_json(out / "quarantine.json", {
        "site_id": cfg.site_id, "manifest": str(cfg.data_root / cfg.data.manifest), "created": stamp,
        "medfdd_version": __version__, "rows": report.n_rows, "used": report.n_used,
        "quarantined": report.n_quarantined, "by_reason": report.by_reason,
        "entries": [q.to_json() for q in data.quarantine], "warnings": report.warnings})
    atomic_write_json(out / "split.json", {
        "site_id": cfg.site_id, "seed": cfg.seed, "holdout_fraction": cfg.data.holdout_fraction,
        "split": cfg.data.split, "created": stamp, "privacy_unit": cfg.privacy.unit,
        "train_rows": data.rows[data.train].tolist(), "holdout_rows": data.rows[data.holdout].tolist(),
        "unused_rows": data.rows[data.unused].tolist()})
    return path


def _print_summary(console: Console, r: CheckReport) -> None:
    t = Table(title=f"{r.site_id}: usable records per class")
    for col in ("class", "usable", "train", "audit-holdout"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for c, k in r.class_counts.items():
        t.add_row(c, str(k), str(r.train_counts[c]), str(r.holdout_counts[c]))
    t.add_row("[bold]total", f"[bold]{r.n_used}", str(sum(r.train_counts.values())),
              str(sum(r.holdout_counts.values())))
    console.print(t)
    s = Table(title="manifest rows by status")
    s.add_column("status")
    s.add_column("rows", justify="right")
    s.add_row("used", str(r.n_used - r.n_unused))
    if r.n_unused:
        s.add_row("left out: further scans of a training patient (privacy.unit patient)", str(r.n_unused))
    for reason, k in r.by_reason.items():
        s.add_row(f"quarantined: {reason}", str(k))
    s.add_row("[bold]total", f"[bold]{r.n_rows}")
    console.print(s)
    if r.shapes:
        m = Table(title="formats / modalities / original shapes seen")
        m.add_column("format/modality shape")
        m.add_column("count", justify="right")
        for k, v in list(r.shapes.items())[:15]:
            m.add_row(k, str(v))
        console.print(m)
    for w in r.warnings:
        console.print(f"[yellow]warning[/]: {w}")
    for h in r.hints:
        console.print(f"[cyan]hint[/]: {h} (README: Large sites)")


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def load_with_progress(cfg: SiteConfig, console: Console) -> SiteData:
    with progress_bar(console) as bar:
        task = bar.add_task(f"{cfg.site_id}: loading scans", total=None)
        data = load_site_data(cfg, on_record=lambda done, total: bar.update(task, completed=done, total=total))
    return data


def check_site(cfg: SiteConfig, console: Console | None = None) -> CheckReport:
    """Validate a site's data end to end. Raises NoUsableDataError (after writing quarantine.json) if none is usable."""
    console = console or Console()
    data = load_with_progress(cfg, console)
    report = check_report(cfg, data)
    report.quarantine_path = write_site_reports(cfg, data, report)
    _print_summary(console, report)
    console.print(f"quarantine report: {report.quarantine_path}  (cache: {data.cache_hits} hits, "
                  f"{data.cache_misses} misses)")
    if report.n_used == 0:
        raise NoUsableDataError(str(cfg.data_root / cfg.data.manifest),
                                f"none of the {report.n_rows} manifest rows is usable (see {report.quarantine_path})",
                                "fix the reasons listed in quarantine.json")
    return report
