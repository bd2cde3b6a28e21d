"""3D sites at 64^3 (or `--spatial 128 --spacing 1.5`) on real anatomy: peak memory and seconds per paid step of
`site distill` against the number of volumes (issue 40, item 3).

The volumes are built from a real MRI that ships offline, nilearn's MNI152 T1 template (2 mm; the `dev` extra
installs nilearn). Each volume is the template under a random head pose (rotation up to 8 degrees about a random axis,
shift up to 6 mm, scale 0.95-1.05), resampled onto a 2.5 mm scanner grid of 72 x 88 x 72 voxels, with a random
intensity scale and gamma and Gaussian noise, stored as NIfTI in RAS or (every other volume) LPS voxel order with
the matching affine (uncompressed `.nii`). Class `lesion` adds one hyperintense Gaussian blob (sigma 4 mm) centred on a random voxel inside
the brain mask; class `healthy` has none: telling them apart needs the anatomy (a bright spot in the scalp or a
ventricle's edge is not a lesion). The site loads them with MONAI (`Orientation` to RAS, `Spacing` to 3 mm,
`fit: crop_or_pad` to 64^3), so its synthetic NIfTI has 3 mm voxels.

Every size runs `distill_site` (DP, a few paid steps) in a fresh child process (`site_scale.py --child`), which
reports its peak RSS and the seconds per paid step (the distiller's run divided by the paid steps: with the
decoupled schedule this includes the synthetic updates); all sizes share one preprocessing cache, filled first.
Run: `PYTHONPATH=. .venv/bin/python benchmarks/volumes_3d.py [--sizes 100 500 2000] [--workdir DIR]`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
GRID_SHAPE, GRID_MM = (72, 88, 72), 2.5  # the "scanner" grid the volumes are stored on
CLASSES = ["healthy", "lesion"]
DISTILL = {"method": "dm", "ipc": 4, "width": 32, "batch_size": 32, "inner_steps": 1, "allocation": "uniform",
           "checkpoint_every": 1000}


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k  # Rodrigues


def make_volume(template: np.ndarray, brain: np.ndarray, t_affine: np.ndarray, lesion: bool,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scan: (int16 array in NIfTI (x, y, z) order, its affine)."""
    from scipy.ndimage import affine_transform

    grid = np.diag([GRID_MM, GRID_MM, GRID_MM, 1.0])
    grid[:3, 3] = -GRID_MM * (np.asarray(GRID_SHAPE) - 1) / 2 + np.array([0.0, -18.0, 18.0])  # the head's centre
    pose = np.eye(4)
    pose[:3, :3] = _rotation(rng, 8.0) * rng.uniform(0.95, 1.05)
    pose[:3, 3] = rng.uniform(-6, 6, 3)
    m = np.linalg.inv(t_affine) @ pose @ grid  # scanner voxel -> template voxel
    vol = affine_transform(template, m[:3, :3], m[:3, 3], output_shape=GRID_SHAPE, order=1)
    if lesion:  # centred on a brain voxel of the template, drawn where the pose puts it
        c = (np.linalg.inv(m) @ [*brain[rng.integers(len(brain))], 1.0])[:3]
        lo = np.clip(np.floor(c - 6).astype(int), 0, None)
        hi = np.minimum(np.ceil(c + 7).astype(int), GRID_SHAPE)
        box = np.indices(tuple(hi - lo), dtype=np.float32) + lo.reshape(3, 1, 1, 1)
        d2 = ((box - c.reshape(3, 1, 1, 1).astype(np.float32)) ** 2).sum(0) * GRID_MM ** 2
        vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += rng.uniform(0.35, 0.6) * np.exp(-d2 / (2 * 4.0 ** 2))
    vol = np.clip(vol, 0, None) ** rng.uniform(0.8, 1.25) * rng.uniform(0.7, 1.3)
    vol = vol + rng.normal(0, rng.uniform(0.02, 0.05), GRID_SHAPE)
    data = np.clip(vol * 1000, -32768, 32767).astype(np.int16)
    if rng.random() < 0.5:  # stored LPS: the same anatomy, x and y reversed, affine to match
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = np.asarray(GRID_SHAPE[:2]) - 1
        return np.ascontiguousarray(data[::-1, ::-1]), grid @ flip
    return data, grid


def write_site(base: Path, n: int, sizes: list[int], steps: int, spatial: int = 64, spacing: float = 3.0
               ) -> tuple[dict[int, Path], float]:
    """n volumes (kept when `base` already holds them) and one config per size; returns (configs, seconds)."""
    import nibabel as nib
    from nilearn import datasets

    root = base / "volumes"
    t = time.perf_counter()
    rows = [[f"{i // 500:02d}/{i:05d}.nii", CLASSES[i % 2], f"P{i}"] for i in range(n)]
    if not (root / rows[-1][0]).exists():
        tmpl = datasets.load_mni152_template(resolution=2)
        template = tmpl.get_fdata(dtype=np.float32)
        brain = np.argwhere(datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0.5)  # template voxels
        rng = np.random.default_rng(0)
        for rel, label, _ in rows:
            data, affine = make_volume(template, brain, tmpl.affine, label == "lesion", rng)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(root / rel))
    seconds = time.perf_counter() - t
    configs = {}
    for size in sizes:
        with open(root / f"labels_{size}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", "label", "patient_id"], *rows[:size]])
        cfg = {"site_id": f"mri-{size}", "data": {"root": str(root), "manifest": f"labels_{size}.csv",
               "classes": CLASSES, "spatial_size": [spatial] * 3, "orientation": "RAS", "spacing": [spacing] * 3,
               "fit": "crop_or_pad", "cache_dir": str(base / f"cache{spatial}")},
               "privacy": {"dp": True, "epsilon": 1.0, "delta": 1e-5, "rounds": 1},
               "distill": {**DISTILL, "iterations": steps},
               "output": str(base / f"out{spatial}-{size}"), "device": "cpu", "workers": 1}
        configs[size] = base / f"site{spatial}-{size}.yaml"
        configs[size].write_text(yaml.safe_dump(cfg))
    return configs, seconds


def check_release(out: Path) -> dict:
    """What the site's synthetic NIfTI says about itself (nibabel)."""
    import nibabel as nib

    img = nib.load(str(out / "synthetic.nii.gz"))
    a = img.affine[:3, :3]
    d = a / np.linalg.norm(a, axis=0)
    return {"shape": list(img.shape), "voxel_mm": [float(z) for z in img.header.get_zooms()[:3]],
            "axcodes": "".join(nib.aff2axcodes(img.affine)),
            "orthonormal": bool(np.allclose(d.T @ d, np.eye(3), atol=1e-6)), "sform_code": int(img.header["sform_code"])}


def figure(rows: list[dict], path: Path, spatial: int = 64) -> None:
    from plots import size_figure

    measured = [r for r in rows if "peak_rss_mb" in r]
    size_figure(path, f"{spatial}^3 volumes in the site",
                {"peak RSS": [(r["volumes"], r["peak_rss_mb"]) for r in measured],
                 "after imports": [(r["volumes"], r["rss_after_imports_mb"]) for r in measured]},
                {"site distill": [(r["volumes"], r["seconds_per_paid_step"]) for r in measured]},
                "time per paid step (2 shared cores)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000])
    ap.add_argument("--steps", type=int, default=4, help="paid steps per distillation")
    ap.add_argument("--spatial", type=int, default=64, help="the site's cube side in voxels (64: the curve; 128: real 3D)")
    ap.add_argument("--spacing", type=float, default=3.0, help="its voxel size in mm (64 x 3 mm = 128 x 1.5 mm)")
    ap.add_argument("--name", default="volumes_3d")
    ap.add_argument("--workdir", type=Path, help="keep the volumes and cache here (reused by a later run)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON and PNG go (default benchmarks/results)")
    ap.add_argument("--note", default="shared 2-core machine (a long benchmark and another helper ran beside it), "
                    "one thread per process: times are contended and noisy; peak RSS is per child process")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from common import RESULTS, write_result
    from site_scale import run_child

    from medfdd.config import load_site_config
    from medfdd.data.site_data import load_site_data

    out_dir = args.out_dir or RESULTS
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.workdir or Path(tmp)
        configs, write_s = write_site(base, max(args.sizes), sorted(args.sizes), args.steps, args.spatial,
                                      args.spacing)
        t = time.perf_counter()
        load_site_data(load_site_config(configs[max(args.sizes)]).model_copy(update={"workers": "auto"}))
        decode_s = time.perf_counter() - t
        print(f"wrote {max(args.sizes)} volumes in {write_s:.0f} s, decoded in {decode_s:.0f} s", flush=True)
        payload = {"distill": DISTILL, "steps": args.steps, "spatial_size": [args.spatial] * 3,
                   "spacing_mm": args.spacing,
                   "source": "nilearn MNI152 T1 2 mm template, random pose/intensity/noise, lesion vs healthy",
                   "write_seconds": write_s, "decode_seconds_all_workers_auto": decode_s, "note": args.note}
        for size in sorted(args.sizes):
            row = {"volumes": size, **run_child(HERE.parent, configs[size])}
            if "error" not in row:
                row["release"] = check_release(base / f"out{args.spatial}-{size}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_result(args.name, {**payload, "rows": rows, "complete": False}, out_dir=out_dir)
        ok = [r for r in rows if "peak_rss_mb" in r]
        if ok:
            rss = [r["peak_rss_mb"] for r in ok]
            payload["rss_spread"] = max(rss) / min(rss) - 1  # acceptance: within 0.2 across the sizes
    figure(rows, out_dir / f"{args.name}.png", args.spatial)
    print(f"wrote {write_result(args.name, {**payload, 'rows': rows, 'complete': True}, out_dir=out_dir)}")


if __name__ == "__main__":
    main()
