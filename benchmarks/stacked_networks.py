"""B7 stacked matching networks: a decoupled DP-DM run at G banked statistics per synthetic update
(`distill.networks_per_update`), the G random ConvNet-3s of an update evaluated as one grouped network.

For each G, one whole decoupled run on a Fashion-MNIST site of `--site` records (IPC 10, the default width-128
network, `--batch-per-class` expected real records per class per paid step, `--inner` network evaluations per paid
statistic, so iterations x inner / G updates; the bank evaluates G paid steps' networks together too): seconds per
paid step split into the bank (the paid statistics) and the updates, seconds per network evaluation, and TFLOP/s from the convolution/matmul FLOPs counted on a short run
(`b1_central._FlopCount`). Every G evaluates the same networks on the same paid bank: only the grouping changes.
Accuracy at a given G: `b1_central.py --networks-per-update G` (fewer, averaged updates on the same bank).
Run: `PYTHONPATH=. .venv/bin/python benchmarks/stacked_networks.py [--g 1 2 4 8] [--site 12000] [--steps 10]`
(CPU: a few minutes at 10 paid steps; the GPU target is 1,000 paid steps at 256 per class in <= 10 s).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from b1_central import _FlopCount, bf16_peak_tflops, load_data, make_distiller, sync  # noqa: E402
from common import RESULTS, peak_memory_mb, write_result  # noqa: E402

from medfdd.nets import records_per_chunk  # noqa: E402
from medfdd.training import pick_device  # noqa: E402


def timed_run(x, y, *, g: int, steps: int, batch_per_class: int, inner: int, device, seed: int) -> dict:
    """One decoupled run at G statistics per update: bank and update seconds, FLOPs per paid step."""
    scale = {"iterations": steps, "batch_per_class": batch_per_class, "inner_steps": inner, "schedule": "decoupled",
             "networks_per_update": g}

    def make(n_steps: int):
        return make_distiller(n=len(x), image_shape=tuple(x.shape[1:]), ipc=10, eps=1.0,
                              scale={**scale, "iterations": n_steps}, method="dm", device=device, seed=seed)[0]

    counted_steps = g // math.gcd(g, inner)  # a whole number of updates: no update evaluates extra networks
    with _FlopCount() as counter:
        make(counted_steps).run(x, y)
    flops_per_step = counter.flops / counted_steps
    distiller = make(steps)
    marks: list[float] = []
    sync(device)
    t0 = time.perf_counter()
    distiller.run(x, y, on_step=lambda state, loss: marks.append(time.perf_counter()) if state.iteration == steps
                  else None)
    sync(device)
    total = time.perf_counter() - t0
    bank_s = marks[0] - t0 if marks else float("nan")
    evaluations = steps * inner
    peak = bf16_peak_tflops(device)
    achieved = flops_per_step * steps / total / 1e12
    images = 10 * distiller.cfg.ipc
    chunked = records_per_chunk(tuple(x.shape[1:]), distiller.cfg.width * g, backward=True) < images
    return {"networks_per_update": g, "paid_steps": steps, "updates": distiller.updates,
            "chunked_updates": chunked,  # G networks' activations over the activation budget: DM's chunked path,
            # which embeds twice (features without a graph, then each chunk with one)
            "network_evaluations": evaluations, "seconds": total, "seconds_per_paid_step": total / steps,
            "bank_seconds": bank_s, "update_seconds": total - bank_s,
            "seconds_per_network_evaluation": (total - bank_s) / evaluations, "flops_per_paid_step": flops_per_step,
            "tflops_achieved": achieved, "fraction_of_bf16_peak": achieved / peak if peak else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--g", type=int, nargs="+", default=[1, 2, 4, 8], help="statistics per synthetic update")
    ap.add_argument("--site", type=int, default=12000, help="records of the site (a seeded Fashion-MNIST subset)")
    ap.add_argument("--steps", type=int, default=10, help="paid DP steps of each timed run")
    ap.add_argument("--batch-per-class", type=int, default=256)
    ap.add_argument("--inner", type=int, default=20, help="network evaluations per paid statistic")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--note", default="", help="what the machine was doing meanwhile")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y, _, _ = load_data(None)
    pick = np.random.default_rng(args.seed).permutation(len(x))[:args.site]
    device = pick_device()
    xd, yd = torch.as_tensor(x[pick]).to(device), torch.as_tensor(y[pick]).to(device)
    rows = []
    for g in args.g:
        row = timed_run(xd, yd, g=g, steps=args.steps, batch_per_class=args.batch_per_class, inner=args.inner,
                        device=device, seed=args.seed)
        print(json.dumps(row), flush=True)
        rows.append(row)
    name = args.name or f"stacked_networks_{device.type}"
    out = write_result(name, {"site_records": args.site, "ipc": 10, "width": 128, "batch_per_class":
                              args.batch_per_class, "inner": args.inner, "threads": torch.get_num_threads(),
                              "rows": rows, "peak_memory_mb": peak_memory_mb(), "note": args.note},
                       out_dir=args.out_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
