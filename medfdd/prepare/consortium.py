"""`medfdd prepare`: materialise a non-IID consortium of hospital folders from a labelled source.

Layout written under ``out``::

    out/
      hospital-a/ labels.csv images/<patient>/img<k>.dcm | .nii.gz | series<k>/slice_0000.dcm ...
      hospital-b/ ...
      test/       labels.csv images/...             the coordinator's test split, same format
      site_configs/hospital-a.yaml ... coordinator.yaml
      partition.json                               site x class table; also marks `out` as a medfdd consortium

``labels.csv`` has the columns ``path,label,patient_id``: path relative to the site folder, label = class name,
patient ids generated (``P<site letters>-<6 digits>``, ``PTEST-<6 digits>`` for the test split) with 1-3 images per
patient, so that a patient-level train/holdout split differs from a per-image one.

File conventions (arrays are row-major; see `medfdd.prepare.writers`):

- DICOM: 2D grayscale and RGB images are one Secondary Capture file each (RGB as PhotometricInterpretation RGB);
  3D volumes are a series folder with one file per slice (the manifest path is the folder).
- NIfTI (``.nii.gz``): 2D images are stored (x, y) = (W, H); volumes (x, y, z) = (W, H, D); RGB images are stored
  (W, H, 1, 3) - a singleton z and the colour channel last, the layout MONAI's NibabelReader reads as channel-last.

Everything is a function of ``seed``: the same arguments write byte-identical files, labels.csv and configs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medfdd.config import (
    DEFAULT_PAID_STEPS,
    DEFAULT_ROUNDS,
    HYBRID_FINETUNE_ROUNDS,
    HYBRID_GLOBAL_WIDTH,
    MODES,
    CoordinatorConfig,
    SiteConfig,
    dump_config,
    hybrid_finetune_share,
    load_coordinator_config,
    load_site_config,
    load_yaml,
    parse_config,
    recommended_mode,
)
from medfdd.errors import MedfddError
from medfdd.io import atomic_write_text
from medfdd.prepare.partition import Partition, dirichlet_partition
from medfdd.prepare.sources import SOURCES, LabelledSource, cap_per_class, load_source
from medfdd.prepare.writers import write_dicom, write_dicom_series, write_nifti

CONSORTIUM_KIND = "medfdd-consortium"
MARKER = "partition.json"
MANIFEST = "labels.csv"
HOLDOUT_FRACTION = 0.2
DEFAULT_MIN_PER_SITE = 10
FORMATS = ("dicom", "nifti", "mixed")
def site_format(fmt: str, i: int) -> str:
    """The file format of site i: `mixed` alternates DICOM and NIfTI (hospitals export differently); the test split
    of a mixed consortium is DICOM."""
    return ("dicom", "nifti")[i % 2] if fmt == "mixed" else fmt
_ENTRY = re.compile(r"^(hospital-[a-z]+|test|site_configs|partition\.json)$")


class PrepareError(MedfddError):
    """`medfdd prepare` was given arguments it cannot honour (bad flag value, unsupported image layout)."""


class OutputNotEmptyError(MedfddError):
    """`--out` holds files that are not an earlier medfdd consortium; nothing is overwritten."""


@dataclass(frozen=True)
class PrepareResult:
    """What `prepare_consortium` wrote (absolute paths) and the partition it used."""

    out: Path
    source: str
    fmt: str
    site_ids: list[str]
    site_dirs: list[Path]
    site_configs: list[Path]
    coordinator_config: Path
    test_dir: Path
    partition_json: Path
    partition: Partition
    classes: list[str]
    spatial_size: list[int]
    channels: int
    n_train: int
    n_test: int
    test_counts: np.ndarray  # per class

    def site_counts(self, site_id: str) -> dict[str, int]:
        """Class name -> number of records the partition gave `site_id`."""
        row = self.partition.table[self.site_ids.index(site_id)]
        return {c: int(v) for c, v in zip(self.classes, row, strict=True)}

    def override(self, *, site: dict[str, Any] | None = None, coordinator: dict[str, Any] | None = None) -> None:
        """Change keys of the written configs: a mapping updates that section (``{"distill": {"ipc": 5}}``), any
        other value replaces the key. Each config is validated before it is rewritten (atomically)."""
        edits = [(p, SiteConfig, site) for p in self.site_configs] + [(self.coordinator_config, CoordinatorConfig,
                                                                        coordinator)]
        for path, model, changes in edits:
            if not changes:
                continue
            data = load_yaml(path)
            for key, value in changes.items():
                if isinstance(value, dict) and isinstance(data.get(key), dict):
                    data[key].update(value)
                else:
                    data[key] = value
            parse_config(data, model, str(path), path.parent)
            atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------------------------------------------------ naming


def site_letters(i: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa', ... (spreadsheet-column style)."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return s


def site_id(i: int) -> str:
    return f"hospital-{site_letters(i)}"


# --------------------------------------------------------------------------------------------------------- selection


# ----------------------------------------------------------------------------------------------------------- writing


def _group_patients(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Consecutive (start, stop) runs of 1-3 records, one run per patient."""
    runs, start = [], 0
    while start < n:
        stop = min(n, start + int(rng.integers(1, 4)))
        runs.append((start, stop))
        start = stop
    return runs


def _write_image(site_dir: Path, k: int, image: np.ndarray, *, fmt: str, rgb: bool, patient_id: str,
                 rng: np.random.Generator) -> str:
    """Write a patient's k-th record; returns its manifest path (POSIX, relative to the site folder)."""
    rel_stem = f"images/{patient_id}/img{k}"
    if fmt == "dicom":
        if image.ndim == 3 and not rgb:  # volume -> one file per slice in a series folder
            rel = f"images/{patient_id}/series{k}"
            write_dicom_series(site_dir / rel, image, patient_id=patient_id, rng=rng)
            return rel
        rel = rel_stem + ".dcm"
        write_dicom(site_dir / rel, image, patient_id=patient_id, rng=rng)
        return rel
    rel = rel_stem + ".nii.gz"
    write_nifti(site_dir / rel, image, rgb=rgb)
    return rel


def _write_split(folder: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], *, fmt: str, rgb: bool,
                 prefix: str, rng: np.random.Generator, progress: Progress, task: Any) -> list[tuple[str, str, str]]:
    """Write `images` (in a seeded order, grouped into patients) under `folder` plus its labels.csv."""
    order = rng.permutation(len(labels))
    runs = _group_patients(len(order), rng)
    numbers = rng.choice(900_000, size=len(runs), replace=False) + 100_000
    rows: list[tuple[str, str, str]] = []
    for (start, stop), number in zip(runs, numbers, strict=True):
        pid = f"{prefix}-{int(number):06d}"
        for k, rec in enumerate(order[start:stop], start=1):
            rel = _write_image(folder, k, images[rec], fmt=fmt, rgb=rgb, patient_id=pid, rng=rng)
            rows.append((rel, classes[int(labels[rec])], pid))
            progress.advance(task)
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["path", "label", "patient_id"])
    w.writerows(rows)
    atomic_write_text(folder / MANIFEST, text.getvalue())
    return rows


# ------------------------------------------------------------------------------------------------------- out folder


def _earlier_entries(out: Path) -> list[str]:
    """What an earlier `prepare` wrote into `out` ([] if `out` is new or empty); refuses any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise OutputNotEmptyError(f"--out {out}", "exists and is not a folder", "choose a new folder for --out")
    if not out.exists() or not any(out.iterdir()):
        return []
    fix = "choose a new or empty folder for --out (nothing was changed)"
    marker = out / MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        info = None
    if not isinstance(info, dict) or info.get("kind") != CONSORTIUM_KIND or not isinstance(info.get("entries"), list):
        raise OutputNotEmptyError(f"--out {out}", "is not empty and is not an earlier medfdd consortium "
                                                  f"(no {MARKER} written by `medfdd prepare`)", fix)
    bad = [e for e in info["entries"] if not isinstance(e, str) or not _ENTRY.match(e)]
    if bad:
        raise OutputNotEmptyError(str(marker), f"lists unexpected entries {bad}", fix)
    return list(info["entries"])


def _remove_entries(out: Path, entries: list[str]) -> None:
    """Remove only what the earlier `prepare` wrote; runs/ and anything else in `out` stay."""
    for name in entries:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------- checking


def _check_flags(*, source: str, sites: int, alpha: float, fmt: str, seed: int, npz: Path | None, epsilon: float,
                 delta: float, ipc: int, iterations: int, rounds: int, method: str, mode: str, dp: bool,
                 max_per_class: int | None) -> None:
    def bad(flag: str, value: object, constraint: str, fix: str) -> PrepareError:
        return PrepareError(f"{flag} {value}", constraint, fix)

    if source not in SOURCES:
        raise bad("--source", source, f"unknown source; expected one of {', '.join(SOURCES)}", "pick a listed source")
    if fmt not in FORMATS:
        raise bad("--format", fmt, f"expected one of {', '.join(FORMATS)}", "use --format dicom, nifti or mixed")
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise bad("--sites", sites, "must be a positive integer", "use --sites 2 or more")
    if not (math.isfinite(alpha) and alpha > 0):
        raise bad("--alpha", alpha, "must be a finite number > 0", "use e.g. 0.1 (very non-IID) .. 100 (almost IID)")
    if seed < 0:
        raise bad("--seed", seed, "must be >= 0", "use a non-negative seed")
    if not (epsilon > 0 and not math.isnan(epsilon)):
        raise bad("--epsilon", epsilon, "must be > 0", "use e.g. --epsilon 1.0")
    if not 0 < delta < 1:
        raise bad("--delta", delta, "must be in (0, 1) (and below 1/n for n records per site)", "use e.g. 1e-5")
    if not 1 <= ipc <= 1000:
        raise bad("--ipc", ipc, "must be in 1..1000", "use e.g. --ipc 10")
    if rounds < 1:
        raise bad("--rounds", rounds, "must be >= 1", "use e.g. --rounds 3")
    if mode not in MODES:
        raise bad("--mode", mode, f"expected one of {', '.join(MODES)}", "use --mode auto")
    if mode == "hybrid" and not dp:
        raise bad("--mode", mode, "hybrid mode fine-tunes under DP", "drop --no-dp, or use --mode one-shot")
    if iterations < rounds:
        raise bad("--iterations", iterations, f"must be at least one paid step per round (--rounds {rounds})",
                  f"use e.g. --iterations {DEFAULT_PAID_STEPS}")
    if method not in ("dm", "gm"):
        raise bad("--method", method, "expected dm or gm", "use --method dm (distribution matching) or gm")
    if max_per_class is not None and max_per_class < 1:
        raise bad("--max-per-class", max_per_class, "must be >= 1", "leave it out to use every image")
    if npz is not None and source != "medmnist":
        raise bad("--npz", npz, f"only used with --source medmnist, not {source}", "drop --npz or use --source medmnist")


def _check_layout(src: LabelledSource) -> None:
    if src.rgb and src.train_images.dtype != np.uint8:
        raise PrepareError(f"source '{src.name}'", f"RGB images must be uint8, got {src.train_images.dtype}",
                           "convert the RGB images to uint8")
    if src.rgb and src.train_images.shape[1] == 3:
        raise PrepareError(f"source '{src.name}'", f"RGB images of height 3 ({src.train_images.shape[1:]}) are "
                                                   "ambiguous with 3-frame volumes", "use images at least 4 pixels high")


def _table(partition: Partition, site_ids: list[str], classes: list[str], test_counts: np.ndarray, title: str,
           width: int) -> Table:
    """Sites as rows and classes as columns; transposed (classes as rows) when the classes would not fit `width`."""
    rows = {sid: [int(v) for v in row] for sid, row in zip(site_ids, partition.table, strict=True)}
    totals = {"all sites": [int(v) for v in partition.class_totals], "test": [int(v) for v in test_counts]}
    cell = max(len(str(int(test_counts.sum()) + int(partition.table.sum()))), *(len(c) for c in classes), 5)
    t = Table(title=title)
    if 14 + (len(classes) + 1) * (cell + 3) <= width:
        t.add_column("site", style="bold", no_wrap=True)
        for c in classes:
            t.add_column(c, justify="right", no_wrap=True)
        t.add_column("total", justify="right", style="bold", no_wrap=True)
        for sid, counts in rows.items():
            t.add_row(sid, *map(str, counts), str(sum(counts)))
        t.add_section()
        for name, counts in totals.items():
            t.add_row(name, *map(str, counts), str(sum(counts)), style="bold" if name == "all sites" else "dim")
        return t
    t.add_column("class", style="bold", no_wrap=True)
    for sid in rows:
        t.add_column(sid, justify="right", no_wrap=True)
    t.add_column("all sites", justify="right", style="bold", no_wrap=True)
    t.add_column("test", justify="right", style="dim", no_wrap=True)
    for j, c in enumerate(classes):
        t.add_row(c, *[str(counts[j]) for counts in rows.values()], *[str(v[j]) for v in totals.values()])
    t.add_section()
    t.add_row("total", *[str(sum(v)) for v in rows.values()], *[str(sum(v)) for v in totals.values()], style="bold")
    return t


# -------------------------------------------------------------------------------------------------------------- main


MIN_MODEL_SIZE = 16  # ConvNet-3 pools three times: below 16 pixels a side the last maps carry no layout


def model_spatial_size(source_size: list[int]) -> list[int]:
    """The configs' spatial_size: the source size, upsampled (by the loader) to at least MIN_MODEL_SIZE a side."""
    return [max(int(s), MIN_MODEL_SIZE) for s in source_size]


def prepare_consortium(
    *,
    source: str,
    out: Path | str,
    sites: int,
    alpha: float,
    fmt: str,
    seed: int,
    npz: Path | str | None = None,
    epsilon: float,
    delta: float,
    ipc: int,
    iterations: int = DEFAULT_PAID_STEPS,
    rounds: int = DEFAULT_ROUNDS,
    method: str,
    dp: bool,
    mode: str = "auto",
    max_per_class: int | None = None,
    console: Console | None = None,
    search_dirs: list[Path | str] | None = None,
    min_per_site: int = DEFAULT_MIN_PER_SITE,
) -> PrepareResult:
    """Write a consortium (site folders, test split, site and coordinator configs, partition.json) under `out`.

    `iterations` paid DP steps per site over `rounds` rounds are split evenly (rounded up) into each site's
    `distill.iterations`; every other setting is the configs' default, except in hybrid mode (`mode`, or `auto`:
    `recommended_mode`), which adds the recommended hybrid plan (`privacy.finetune_share` and `finetune_rounds`, the
    coordinator's `finetune.rounds` and `train.width`). `search_dirs` overrides where the fashion-mnist
    idx files are looked for; `min_per_site` is the fewest training records any site may receive (the Dirichlet
    draw is repeated until it holds).
    """
    console = console or Console()
    out = Path(out)
    npz = Path(npz) if npz is not None else None
    _check_flags(source=source, sites=sites, alpha=alpha, fmt=fmt, seed=seed, npz=npz, epsilon=epsilon, delta=delta,
                 ipc=ipc, iterations=iterations, rounds=rounds, method=method, mode=mode, dp=dp,
                 max_per_class=max_per_class)

    # Everything that can fail on the inputs happens before `out` is touched.
    earlier = _earlier_entries(out)
    src = cap_per_class(load_source(source, seed=seed, npz=npz, search_dirs=search_dirs), max_per_class, seed)
    _check_layout(src)
    classes, k = list(src.classes), src.n_classes
    partition = dirichlet_partition(src.train_labels, n_sites=sites, alpha=alpha, seed=seed, n_classes=k,
                                    min_per_site=min_per_site)
    site_ids = [site_id(i) for i in range(sites)]
    test_counts = np.bincount(src.test_labels, minlength=k).astype(np.int64)

    n_fit = [int(total) - math.ceil(HOLDOUT_FRACTION * int(total)) for total in partition.site_totals]
    if mode == "auto":
        mode = recommended_mode(epsilon=epsilon, alpha=alpha, dp=dp, site_records=n_fit)
    hybrid = mode == "hybrid"
    cfg_dir = out / "site_configs"
    model_size = model_spatial_size(src.spatial_size)
    site_cfgs: list[SiteConfig] = []
    for i, sid in enumerate(site_ids):
        data = {
            "site_id": sid,
            "data": {"root": f"../{sid}", "manifest": MANIFEST, "format": site_format(fmt, i), "classes": classes,
                     "spatial_size": model_size, "channels": src.channels, "intensity": {"mode": "minmax"},
                     "holdout_fraction": HOLDOUT_FRACTION},
            "privacy": {"dp": dp, "epsilon": epsilon, "delta": delta, "accountant": "rdp", "rounds": rounds,
                        **({"finetune_share": hybrid_finetune_share(epsilon),
                            "finetune_rounds": HYBRID_FINETUNE_ROUNDS} if hybrid else {})},
            "distill": {"method": method, "ipc": ipc, "iterations": math.ceil(iterations / rounds)},
            "output": f"../runs/{sid}",
            "device": "auto",
            "seed": seed,
        }
        site_cfgs.append(parse_config(data, SiteConfig, f"generated site config {sid}", cfg_dir))
    coord_cfg = parse_config({
        "sites": [f"{sid}.yaml" for sid in site_ids],
        "consortium": {"classes": classes, "spatial_size": model_size, "channels": src.channels, "ipc": ipc,
                       "sites": {sid: {"dp": dp, "epsilon": epsilon, "delta": delta} for sid in site_ids}},
        "rounds": rounds,
        **({"finetune": {"rounds": HYBRID_FINETUNE_ROUNDS}, "train": {"width": HYBRID_GLOBAL_WIDTH}} if hybrid else {}),
        "test": {"root": "../test", "manifest": MANIFEST, "format": site_format(fmt, 0)},
        "output": "../runs/coordinator",
        "seed": seed,
    }, CoordinatorConfig, "generated coordinator config", cfg_dir)

    title = (f"{src.name}: {len(src.train_labels)} training records over {sites} sites, Dirichlet alpha={alpha:g}, "
             f"seed {seed}; {mode} mode" + (f" ({HYBRID_FINETUNE_ROUNDS} DP fine-tuning rounds after the distillation)"
                                            if hybrid else ""))
    console.print(_table(partition, site_ids, classes, test_counts, title, console.width))
    for sid, n in zip(site_ids, n_fit, strict=True):
        if dp and n > 0 and delta >= 1.0 / n:
            console.print(f"[yellow]warning[/]: {sid} trains on about {n} records; --delta {delta:g} is not "
                          f"below 1/n = {1.0 / n:.2g} (use a smaller --delta)")

    _remove_entries(out, earlier)
    out.mkdir(parents=True, exist_ok=True)
    entries = [*site_ids, "test", "site_configs", MARKER]
    info: dict[str, Any] = {"kind": CONSORTIUM_KIND, "version": 1, "complete": False, "entries": entries}
    atomic_write_text(out / MARKER, json.dumps(info, indent=2) + "\n")  # marks `out` before any file

    site_dirs = [out / sid for sid in site_ids]
    test_dir = out / "test"
    n_total = len(src.train_labels) + len(src.test_labels)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"writing {fmt.upper()} files", total=n_total)
        for s, (sid, folder) in enumerate(zip(site_ids, site_dirs, strict=True)):
            progress.update(task, description=f"writing {sid}")
            folder.mkdir(parents=True, exist_ok=True)
            idx = partition.site_indices[s]
            _write_split(folder, src.train_images[idx], src.train_labels[idx], classes, fmt=site_format(fmt, s),
                         rgb=src.rgb,
                         prefix=f"P{site_letters(s).upper()}", rng=np.random.default_rng([seed, 100 + s]),
                         progress=progress, task=task)
        progress.update(task, description="writing test split")
        test_dir.mkdir(parents=True, exist_ok=True)
        _write_split(test_dir, src.test_images, src.test_labels, classes, fmt=site_format(fmt, 0), rgb=src.rgb,
                     prefix="PTEST",
                     rng=np.random.default_rng([seed, 99]), progress=progress, task=task)
        progress.update(task, description="done")

    cfg_dir.mkdir(parents=True, exist_ok=True)
    site_paths = []
    for sid, cfg in zip(site_ids, site_cfgs, strict=True):
        path = cfg_dir / f"{sid}.yaml"
        atomic_write_text(path, dump_config(cfg))
        loaded = load_site_config(path)  # validate what was written
        if loaded.data_root != (out / sid).resolve():
            raise PrepareError(str(path), f"data.root resolves to {loaded.data_root}", "report this as a bug")
        site_paths.append(path)
    coord_path = cfg_dir / "coordinator.yaml"
    atomic_write_text(coord_path, dump_config(coord_cfg))
    load_coordinator_config(coord_path)

    info.update({
        "complete": True,
        "source": src.name,
        "npz": npz.name if npz is not None else None,
        "format": fmt,
        "seed": seed,
        "alpha": alpha,
        "mode": mode,
        "max_per_class": max_per_class,
        "classes": classes,
        "spatial_size": src.spatial_size,
        "channels": src.channels,
        "site_ids": site_ids,
        "n_train": int(len(src.train_labels)),
        "n_test": int(len(src.test_labels)),
        "partition": partition.as_dict(site_ids, classes),
        "test": {**{c: int(v) for c, v in zip(classes, test_counts, strict=True)}, "total": int(test_counts.sum())},
    })
    atomic_write_text(out / MARKER, json.dumps(info, indent=2) + "\n")

    console.print(f"wrote {sites} site folders, the test split and configs under [bold]{out}[/]; next: "
                  f"[bold]medfdd site check {cfg_dir / site_paths[0].name}[/]")
    return PrepareResult(out=out.resolve(), source=src.name, fmt=fmt, site_ids=site_ids,
                         site_dirs=[d.resolve() for d in site_dirs], site_configs=[p.resolve() for p in site_paths],
                         coordinator_config=coord_path.resolve(), test_dir=test_dir.resolve(),
                         partition_json=(out / MARKER).resolve(), partition=partition, classes=classes,
                         spatial_size=src.spatial_size, channels=src.channels, n_train=int(len(src.train_labels)),
                         n_test=int(len(src.test_labels)), test_counts=test_counts)


def prepare_from_args(args: Any, console: Console | None = None) -> PrepareResult:
    """Run `prepare_consortium` from the parsed `medfdd prepare` arguments."""
    return prepare_consortium(
        source=args.source, out=args.out, sites=args.sites, alpha=args.alpha, fmt=args.fmt, seed=args.seed,
        npz=args.npz, epsilon=args.epsilon, delta=args.delta, ipc=args.ipc, iterations=args.iterations,
        rounds=args.rounds, method=args.method, dp=not args.no_dp, mode=getattr(args, "mode", "auto"),
        max_per_class=getattr(args, "max_per_class", None), console=console)
