"""Many sites: the coordinator's peak memory and seconds per round against the number of sites (5, 10, 20).

Only the coordinator's side is measured (the in-process engine's `CoordinatorRun`, which the Flower ServerApp drives
the same way). A digits consortium of the largest size is prepared once (16x16 DICOM, near-IID) and every site
distills its round-1 offer once, here. For each size K, a fresh child process opens a run over the first K sites,
receives their K offers (validated as over the network), merges, trains the global model, evaluates it on the
consortium's test split and writes the run directory; it reports its peak RSS (`ru_maxrss`), the RSS it had before the
round (imports, the opened run) and the round's seconds by phase (run.json). A linear fit of each against K is
written with the points. Run: `PYTHONPATH=. .venv/bin/python benchmarks/many_sites.py [--sites 5 10 20]`.
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
import yaml

HERE = Path(__file__).resolve().parent
DISTILL = {"iterations": 5, "inner_steps": 5, "batch_size": 256, "width": 16, "ipc": 10, "allocation": "uniform"}
TRAIN = {"epochs": 50, "width": 32, "batch_size": 256}


def child(coordinator_config: Path) -> dict:
    """One coordinator round over the sites' already distilled offers; what this process used."""
    from rich.console import Console

    from medfdd.artifacts import load_synthetic
    from medfdd.config import load_coordinator_config
    from medfdd.federation.inprocess import open_inprocess
    from medfdd.messages import SiteOffer, to_wire

    run = open_inprocess(load_coordinator_config(coordinator_config), console=Console(quiet=True))
    offers = []
    for sid, cfg in sorted(run.sites.items()):
        syn = load_synthetic(cfg.output_dir)
        offers.append(SiteOffer(site_id=sid, round=1, arrays={"images": to_wire(syn.images),
                                                              "labels": to_wire(syn.labels)}, meta=dict(syn.meta)))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    b = run.broadcast()
    for offer in offers:
        run.sent(offer.site_id, b.nbytes())
        run.receive(offer, sender=offer.site_id)
    h = run.finish_round()
    seconds = time.perf_counter() - t
    return {"sites": len(offers), "accepted": len(h["accepted"]), "n_merged": h["n_merged"],
            "seconds_round": round(seconds, 3), "seconds_by_phase": {k: round(v, 3) for k, v in h["seconds"].items()},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_round_mb": round(rss_before, 1), "accuracy": (h["metrics"] or {}).get("accuracy")}


def prepare(base: Path, n_sites: int) -> tuple[Path, list[Path]]:
    """The consortium (prepared and distilled once): coordinator.yaml and the site config paths."""
    from rich.console import Console

    from medfdd.config import load_coordinator_config, load_site_config
    from medfdd.messages import Broadcast
    from medfdd.prepare.consortium import prepare_consortium
    from medfdd.site.offer import make_offer

    res = prepare_consortium(source="digits", out=base, sites=n_sites, alpha=100.0, fmt="dicom", seed=0,
                             epsilon=1.0, delta=1e-5, ipc=DISTILL["ipc"], iterations=DISTILL["iterations"], rounds=1,
                             method="dm", dp=True, console=Console(quiet=True))
    for path in res.site_configs:
        cfg = yaml.safe_load(path.read_text())
        cfg["distill"].update(DISTILL)
        cfg["evaluate"] = {"finetune": False}
        cfg["device"] = "cpu"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    paths = load_coordinator_config(res.coordinator_config).site_paths
    for p in paths:
        make_offer(load_site_config(p), Broadcast(1, None), console=Console(quiet=True))
    return res.coordinator_config, paths


def fit(xs: list[int], ys: list[float]) -> dict:
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    pred = slope * np.asarray(xs, float) + intercept
    ss_res = float(np.sum((np.asarray(ys) - pred) ** 2))
    ss_tot = float(np.sum((np.asarray(ys) - np.mean(ys)) ** 2)) or 1.0
    return {"per_site": round(float(slope), 4), "intercept": round(float(intercept), 3),
            "r2": round(1 - ss_res / ss_tot, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    from common import write_result

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="many-sites-") as tmp:
        base = Path(tmp)
        coord, site_paths = prepare(base / "consortium", max(args.sites))
        doc = yaml.safe_load(coord.read_text())
        doc.pop("consortium", None)
        doc["train"].update(TRAIN)
        points = []
        for k in sorted(args.sites):
            cfg = coord.with_name(f"coordinator-{k}.yaml")
            cfg.write_text(yaml.safe_dump({**doc, "sites": [str(p) for p in site_paths[:k]],
                                           "output": f"../runs/coordinator-{k}"}, sort_keys=False))
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
            res = subprocess.run([sys.executable, __file__, "--child", str(cfg)], env=env, capture_output=True,
                                 text=True, check=True)
            points.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(points[-1], flush=True)
    ks = [p["sites"] for p in points]
    payload = {
        "what": "the coordinator's side of one in-process round (receive and validate K offers, merge, train the "
                "global model, evaluate, write the run directory) over offers the sites distilled beforehand",
        "engine": "inprocess (the Flower ServerApp drives the same CoordinatorRun)",
        "setup": {"source": "digits", "spatial_size": [16, 16], "ipc": DISTILL["ipc"], "train": TRAIN,
                  "threads": 1},
        "points": points,
        "fit_peak_rss_mb": fit(ks, [p["peak_rss_mb"] for p in points]),
        "fit_round_growth_mb": fit(ks, [p["peak_rss_mb"] - p["rss_before_round_mb"] for p in points]),
        "fit_seconds_round": fit(ks, [p["seconds_round"] for p in points]),
        "wall_s": round(time.perf_counter() - t0, 1)}
    print(write_result("many_sites", payload))


if __name__ == "__main__":
    main()
