"""B2 parallel decoding: scans/s through `load_site_data` (cache off) with 1 vs 2 (or more) decoding workers.

Cases (as `loading.py`): 28x28 DICOM and 512x512 CT DICOM resized to 128x128 with a CT window. Per run: the wall
time of the whole load, the start-up (until the first row is done: with workers, spawning them and importing torch
and MONAI in each) and the steady rate after it. Every run checks that the arrays equal the 1-worker run's.
Run: `PYTHONPATH=. .venv/bin/python benchmarks/decoding_workers.py [--n 1500] [--workers 1 2]` (a couple of minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result  # noqa: E402
from loading import make_site  # noqa: E402

import medfdd  # noqa: E402
from medfdd.config import load_site_config  # noqa: E402
from medfdd.data.site_data import load_site_data  # noqa: E402

if Path(medfdd.__file__).resolve().parents[1] != Path(__file__).resolve().parents[1]:
    sys.exit(f"medfdd is imported from {medfdd.__file__}, not this checkout: run with PYTHONPATH=<this checkout>")


def timed(cfg_path: Path, workers: int) -> tuple[dict, np.ndarray]:
    cfg = load_site_config(cfg_path)
    cfg = cfg.model_copy(update={"workers": workers})
    done: list[float] = []
    t0 = time.perf_counter()
    data = load_site_data(cfg, on_record=lambda i, n: done.append(time.perf_counter()))
    total = time.perf_counter() - t0
    n = len(data.labels)
    steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else float("nan")
    return {"workers": workers, "scans": n, "seconds": total, "per_s": n / total, "startup_s": done[0] - t0,
            "steady_per_s": steady}, data.images


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.4), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        sub = sorted((r for r in rows if r["case"] == case), key=lambda r: r["workers"])
        w = [r["workers"] for r in sub]
        ax.plot(w, [r["per_s"] for r in sub], "o-", label="whole load (incl. start-up)")
        ax.plot(w, [r["steady_per_s"] for r in sub], "s--", label="after the first scan")
        ax.set_xticks(w)
        ax.set_xlabel("decoding workers")
        ax.set_ylabel("scans / s")
        ax.set_title(f"{case} ({sub[0]['scans']} scans)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1500, help="scans of the 28x28 case (the CT case uses n/10)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--note", default="shared 2-core machine (a long benchmark and another helper ran beside it): "
                    "absolute rates are low and noisy; compare workers within one case")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n in (("dicom28", args.n), ("ct512", max(20, args.n // 10))):
            no_cache, _ = make_site(Path(tmp), kind, n, rng)
            reference = None
            for workers in args.workers:
                row, images = timed(no_cache, workers)
                reference = images if reference is None else reference
                row.update(case=kind, identical_to_first=bool(np.array_equal(images, reference)))
                rows.append(row)
                print(f"{kind:8s} workers={workers}  {row['per_s']:7.1f} scans/s in {row['seconds']:6.1f} s "
                      f"(start-up {row['startup_s']:5.1f} s, then {row['steady_per_s']:7.1f}/s)  "
                      f"identical={row['identical_to_first']}", flush=True)
    figure(rows, RESULTS / "decoding_workers.png")
    out = write_result("decoding_workers", {"rows": rows, "note": args.note})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
