"""B2 data loading: scans/s through MONAI (read + validate + preprocess), with and without the preprocessing cache.

Cases: 28x28 DICOM (MNIST-sized), 28x28 NIfTI, and 512x512 CT DICOM (int16 with RescaleSlope/Intercept) resized
to 128x128 with a CT window. Each case is measured three ways: cache off, cache on and cold (decode + write the
cache), cache on and warm (every entry hit). Run: `.venv/bin/python benchmarks/loading.py [--n N]`.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_memory_mb, write_result  # noqa: E402

from medfdd.config import load_site_config  # noqa: E402
from medfdd.data.site_data import load_site_data  # noqa: E402
from medfdd.prepare.writers import write_dicom, write_nifti  # noqa: E402


def make_site(base: Path, kind: str, n: int, rng: np.random.Generator) -> tuple[Path, Path]:
    root = base / kind
    rows = []
    for i in range(n):
        label = "ab"[i % 2]
        if kind == "dicom28":
            rel = f"{i:05d}.dcm"
            write_dicom(root / rel, rng.integers(0, 255, (28, 28), dtype=np.uint8), patient_id=f"P{i}", rng=rng)
        elif kind == "nifti28":
            rel = f"{i:05d}.nii.gz"
            write_nifti(root / rel, rng.integers(0, 255, (28, 28), dtype=np.uint8))
        else:
            rel = f"{i:05d}.dcm"
            hu = rng.integers(0, 3000, (512, 512), dtype=np.int16)
            write_dicom(root / rel, hu, patient_id=f"P{i}", rng=rng, modality="CT", rescale=(1.0, -1024.0))
        rows.append([rel, label, f"P{i}"])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "patient_id"], *rows])
    spatial = [128, 128] if kind == "ct512" else [28, 28]
    intensity = {"mode": "ct_window", "center": 40, "width": 400} if kind == "ct512" else {"mode": "minmax"}
    cfgs = []
    for cache in (False, True):
        cfg = {"site_id": f"bench-{kind}", "data": {"root": str(root), "classes": ["a", "b"], "spatial_size": spatial,
               "intensity": intensity, "cache": cache}, "output": str(base / f"out-{kind}-{cache}")}
        p = base / f"{kind}-{cache}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        cfgs.append(p)
    return cfgs[0], cfgs[1]


def timed(cfg_path: Path) -> tuple[float, int]:
    cfg = load_site_config(cfg_path)
    t0 = time.perf_counter()
    data = load_site_data(cfg)
    return time.perf_counter() - t0, len(data.labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1000, help="scans per 28x28 case (the CT case uses n/5)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n in (("dicom28", args.n), ("nifti28", args.n), ("ct512", max(20, args.n // 5))):
            no_cache, with_cache = make_site(Path(tmp), kind, n, rng)
            t_off, used = timed(no_cache)
            t_cold, _ = timed(with_cache)
            t_warm, _ = timed(with_cache)
            row = {"case": kind, "scans": used, "no_cache_per_s": used / t_off, "cache_cold_per_s": used / t_cold,
                   "cache_warm_per_s": used / t_warm, "warm_speedup": t_off / t_warm}
            rows.append(row)
            print(f"{kind:8s} n={used:5d}  no cache {row['no_cache_per_s']:8.1f}/s  cold {row['cache_cold_per_s']:8.1f}/s"
                  f"  warm {row['cache_warm_per_s']:8.1f}/s  (x{row['warm_speedup']:.1f})", flush=True)
    out = write_result("loading", {"rows": rows, "peak_memory_mb": peak_memory_mb()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
