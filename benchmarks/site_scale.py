"""Out-of-core sites: peak memory and seconds per paid step of `site distill` against the number of scans.

One folder of 28x28 DICOM scans (2 classes) is written once; the site of size N lists its first N rows, and all
sizes share one preprocessing cache (`data.cache_dir`), so every scan is decoded once. Each size then runs
`distill_site` (DP, a few paid steps) in a fresh child process that reports its peak RSS (`ru_maxrss`), the seconds
its load took and the seconds per paid step (the distiller's run, divided by the paid steps: under the default
decoupled schedule this includes the synthetic updates). With
`--baseline DIR` the same children also run the code of another checkout (e.g. the main branch, in-memory arrays).
Run: `PYTHONPATH=. .venv/bin/python benchmarks/site_scale.py [--sizes 1000 2000 5000 10000] [--baseline /work/main]`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent


def write_site(base: Path, n: int, sizes: list[int], spatial: int, steps: int, codes: int,
               fmt: str = "dcm") -> dict[tuple, Path]:
    """Scans (kept when `base` already holds them: --workdir) and one config per (size, code) with its own output.
    `fmt` png writes the same pixels as 8-bit PNGs (about 50x faster to write than DICOM here: for 50,000 scans)."""
    from medfdd.prepare.writers import write_dicom, write_png

    rng = np.random.default_rng(0)
    root = base / "scans"
    rows = []
    written = (root / f"{(n - 1) // 1000:03d}/{n - 1:06d}.{fmt}").exists()
    for i in range(n):
        rel = f"{i // 1000:03d}/{i:06d}.{fmt}"
        label = "ab"[i % 2]
        if not written:
            pixels = rng.integers(0, 255, (28, 28), dtype=np.uint8)
            pixels[: 14 if label == "a" else 28, :14] //= 2  # a class signal
            if fmt == "png":
                write_png(root / rel, pixels)
            else:
                write_dicom(root / rel, pixels, patient_id=f"P{i}", rng=rng)
        rows.append([rel, label, f"P{i}"])
    configs = {}
    for size, code in ((size, code) for size in sizes for code in range(codes)):
        with open(root / f"labels_{size}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", "label", "patient_id"], *rows[:size]])
        cfg = {"site_id": f"scale-{size}", "data": {"root": str(root), "manifest": f"labels_{size}.csv",
               "classes": ["a", "b"], "spatial_size": [spatial, spatial], "cache_dir": str(base / "cache")},
               "privacy": {"dp": True, "epsilon": 1.0, "delta": 1e-5, "rounds": 1},
               "distill": {"method": "dm", "ipc": 10, "iterations": steps, "allocation": "uniform"},
               "output": str(base / f"out-{size}-{code}"), "device": "cpu"}
        configs[size, code] = base / f"site-{size}-{code}.yaml"
        configs[size, code].write_text(yaml.safe_dump(cfg))
    return configs


def child(config: str) -> None:
    """In a fresh process: `distill_site`, timing its load and its distiller's run; print one JSON line."""
    from rich.console import Console

    import medfdd.site.distill as site_distill
    from medfdd.config import load_site_config

    timed: dict = {}

    def load(*args, **kwargs):
        t = time.perf_counter()
        data = load_with_progress(*args, **kwargs)
        timed.update(load_s=time.perf_counter() - t, records_train=len(data.train))
        return data

    def create(*args, **kwargs):
        distiller = create_distiller(*args, **kwargs)
        run = distiller.run

        def timed_run(*a, **k):
            t = time.perf_counter()
            out = run(*a, **k)
            timed["run_s"] = time.perf_counter() - t
            return out

        distiller.run = timed_run
        return distiller

    load_with_progress, create_distiller = site_distill.load_with_progress, site_distill.create_distiller
    site_distill.load_with_progress, site_distill.create_distiller = load, create
    cfg = load_site_config(Path(config))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    site_distill.distill_site(cfg, console=Console(file=open(os.devnull, "w")))  # noqa: SIM115 - closed at exit
    print(json.dumps({**timed, "distill_site_s": time.perf_counter() - t0, "paid_steps": cfg.distill.iterations,
                      "seconds_per_paid_step": timed["run_s"] / cfg.distill.iterations,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_imports_mb": rss0}))


def run_child(code: Path, config: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(HERE / "site_scale.py"), "--child", str(config)], env=env, cwd=code,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def figure(rows: list[dict], path: Path) -> None:
    from plots import size_figure

    measured = [r for r in rows if "peak_rss_mb" in r]
    codes = sorted({r["code"] for r in measured})
    size_figure(path, "scans in the site",
                {c: [(r["scans"], r["peak_rss_mb"]) for r in measured if r["code"] == c] for c in codes},
                {c: [(r["scans"], r["seconds_per_paid_step"]) for r in measured if r["code"] == c] for c in codes})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    ap.add_argument("--spatial", type=int, default=64, help="preprocessed size (28x28 scans resized to it)")
    ap.add_argument("--steps", type=int, default=10, help="paid steps per distillation")
    ap.add_argument("--baseline", type=Path, help="another checkout to run the same children with")
    ap.add_argument("--name", default="site_scale")
    ap.add_argument("--workdir", type=Path, help="keep the scans and cache here (reused by a later run)")
    ap.add_argument("--format", choices=["dcm", "png"], default="dcm", help="file format of the generated scans")
    ap.add_argument("--note", default="shared 2-core machine (a long benchmark and another helper ran beside it): "
                    "times are noisy; peak RSS is per child process")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    sys.path.insert(0, str(HERE))
    from common import RESULTS, write_result

    import medfdd

    if Path(medfdd.__file__).resolve().parents[1] != HERE.parent:
        sys.exit(f"medfdd is imported from {medfdd.__file__}, not this checkout: run with PYTHONPATH=<this checkout>")
    from medfdd.config import load_site_config
    from medfdd.data.site_data import load_site_data

    codes = {"out-of-core (this commit)": HERE.parent}
    if args.baseline:
        codes[f"in-memory ({args.baseline})"] = args.baseline.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.workdir or Path(tmp)
        t = time.perf_counter()
        configs = write_site(base, max(args.sizes), sorted(args.sizes), args.spatial, args.steps, len(codes),
                             args.format)
        cfg = load_site_config(configs[max(args.sizes), 0])
        load_site_data(cfg.model_copy(update={"workers": "auto"}))  # fill the shared cache once
        print(f"wrote and decoded {max(args.sizes)} scans in {time.perf_counter() - t:.0f} s", flush=True)
        for size in sorted(args.sizes):
            for k, (code, path) in enumerate(codes.items()):
                row = {"scans": size, "code": code, **run_child(path, configs[size, k])}
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_result(args.name, {"rows": rows, "spatial": args.spatial, "steps": args.steps,
                                         "format": args.format, "note": args.note, "complete": False})
    figure(rows, RESULTS / f"{args.name}.png")
    out = write_result(args.name, {"rows": rows, "spatial": args.spatial, "steps": args.steps, "format": args.format,
                                   "note": args.note, "complete": True})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
