"""The audit out of core: peak memory and seconds of the audit's attacks against the number of records at the site.

One memory-mapped .npy of N preprocessed records (2 classes, 1 x S x S float32, the form `load_site_data` returns a
site's records in) is written once. For each size, a fresh child process runs what `medfdd audit` runs per site on
its pool (the site's records): the loss attack on a model, DCR against a released set, LiRA shadow pipelines (each
distills half the pool and trains a model, then every record is scored) and the one-run canary audit (64 canaries),
with the pool given either as a `RecordView` of the memory map (how the audit reads it now: by index, a batch at a
time) or as one in-memory array (how it read it before: `data.images[pool]`). Same seeds, same scores; only the
memory differs. Peak RSS per child (`ru_maxrss`). glibc's dynamic mmap threshold lets the peak of a run that reuses
large activation buffers wander by tens of MiB from one run to the next (measured: the loss attack alone peaked at
774-805 MiB for 3k-50k records, not in order of size); `--mmap-threshold` (default 64 KiB, both modes alike) fixes
it so that the curve shows what the records cost (0: glibc's default).
Run: `PYTHONPATH=. .venv/bin/python benchmarks/audit_scale.py [--sizes 1000 5000 20000 50000] [--spatial 64]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODES = ("streamed (RecordView)", "in memory (array)")


def write_records(path: Path, n: int, spatial: int) -> None:
    """n records of two classes (a brighter left half for class 1), written a block at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 1, spatial, spatial))
    rng = np.random.default_rng(0)
    for start in range(0, n, 4096):
        block = rng.random((min(4096, n - start), 1, spatial, spatial), dtype=np.float32) * 0.8
        block[(np.arange(start, start + len(block)) % 2 == 1), :, :, : spatial // 2] += 0.2
        out[start:start + len(block)] = block
    out.flush()
    del out


def child(path: str, n: int, mode: str, shadows: int) -> None:
    """In a fresh process: the audit's attacks on the first n records; print one JSON line."""
    import torch

    from medfdd.config import DistillConfig
    from medfdd.data.records import RecordView
    from medfdd.training import TrainSettings, train_classifier
    from privacy.audit.attacks import dcr_attack, loss_attack, run_shadows
    from privacy.audit.canary import canary_audit
    from privacy.audit.pipeline import PipelineSettings

    torch.set_num_threads(1)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    images = np.load(path, mmap_mode="r")
    pool = np.arange(n)
    y = (pool % 2).astype(np.int64)
    x = RecordView(images, pool) if mode == MODES[0] else np.array(images[pool])
    settings = PipelineSettings(DistillConfig(ipc=10, iterations=3, batch_per_class=128, width=32),
                                TrainSettings(epochs=2, width=32), 2, 1.0, 1e-5)
    t = time.perf_counter()
    model = train_classifier(np.array(images[:200]), y[:200], 2, TrainSettings(epochs=1, width=32), seed=0)
    seconds = {}
    s = time.perf_counter()
    loss_attack(model, x, y)
    seconds["loss"] = time.perf_counter() - s
    s = time.perf_counter()
    dcr_attack(np.array(images[:20]) * 0.5, x)
    seconds["dcr"] = time.perf_counter() - s
    s = time.perf_counter()
    run_shadows(x, y, settings, n_shadows=shadows, seed=1, targets=("global_model", "synthetic"))
    seconds["lira_shadows"] = time.perf_counter() - s
    s = time.perf_counter()
    train, canaries = pool[:-64], pool[-64:]
    if mode == MODES[0]:
        canary_audit(RecordView(images, train), y[train], RecordView(images, canaries), y[canaries], settings,
                     target="global_model", kind="holdout", seed=2, delta=1e-5, confidence=0.95)
    else:
        canary_audit(np.array(images[train]), y[train], np.array(images[canaries]), y[canaries], settings,
                     target="global_model", kind="holdout", seed=2, delta=1e-5, confidence=0.95)
    seconds["canary"] = time.perf_counter() - s
    print(json.dumps({"seconds": seconds, "total_s": time.perf_counter() - t, "shadows": shadows,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_imports_mb": rss0}))


def run_child(path: Path, n: int, mode: str, shadows: int, mmap_threshold: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run([sys.executable, str(HERE / "audit_scale.py"), "--child", str(path), "--n", str(n),
                          "--mode", mode, "--shadows", str(shadows)], env=env, cwd=HERE.parent,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 50000])
    ap.add_argument("--spatial", type=int, default=64)
    ap.add_argument("--shadows", type=int, default=2, help="LiRA shadow pipelines per child")
    ap.add_argument("--name", default="audit_scale")
    ap.add_argument("--workdir", type=Path, help="keep the records file here (reused by a later run)")
    ap.add_argument("--note", default="")
    ap.add_argument("--mmap-threshold", type=int, default=65536, help="glibc MALLOC_MMAP_THRESHOLD_ of the children "
                    "(bytes; 0 = glibc's dynamic default)")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.n, args.mode, args.shadows)
    sys.path.insert(0, str(HERE))
    from common import RESULTS, write_result
    from plots import size_figure

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"records_{max(args.sizes)}_{args.spatial}.npy"
        if not path.is_file():
            write_records(path, max(args.sizes), args.spatial)
        for n in sorted(args.sizes):
            for mode in MODES:
                row = {"records": n, "mode": mode, **run_child(path, n, mode, args.shadows, args.mmap_threshold)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_result(args.name, {"rows": rows, "spatial": args.spatial, "mmap_threshold": args.mmap_threshold,
                                         "note": args.note, "complete": False})
    measured = [r for r in rows if "peak_rss_mb" in r]
    size_figure(RESULTS / f"{args.name}.png", "records at the site",
                {m: [(r["records"], r["peak_rss_mb"]) for r in measured if r["mode"] == m] for m in MODES},
                {m: [(r["records"], r["total_s"]) for r in measured if r["mode"] == m] for m in MODES},
                seconds_title="seconds of the audit's attacks", memory_title="peak memory of the audit",
                seconds_label="seconds")
    out = write_result(args.name, {"rows": rows, "spatial": args.spatial, "mmap_threshold": args.mmap_threshold,
                                   "note": args.note, "complete": True})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
