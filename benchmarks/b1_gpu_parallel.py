"""B1 central on one GPU, as several processes at once, sized to finish before a deadline (benchmarks/gpu_b1.sh).

The ConvNet-3 of B1 is far too small to fill an H100 from one Python process (the run is bound by kernel launches),
so every configuration (IPC x epsilon) runs in its own process. Each worker:

1. waits until every worker has loaded its data, then times a few DP steps and evaluation epochs of its
   configuration while the others do the same (contended speed),
2. writes that to a sync folder and waits for the other workers (or up to --sync-wait seconds),
3. picks, for its IPC, the largest (DP steps, evaluation epochs) pair of LADDER that fits before the deadline, from
   the slowest worker of that IPC and the latest sync time (so every epsilon of one IPC gets the same pair),
4. runs benchmarks/b1_central.run_one and appends its row to a shared JSONL (one write per row).

`merge` turns the JSONL (and the isolated profile of `b1_central.py --profile`) into the usual results JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from b1_central import SCALES, load_data, make_distiller, run_one, sync, time_iterations  # noqa: E402
from common import peak_memory_mb, write_result  # noqa: E402

from medfdd.training import TrainSettings, evaluate, pick_device, train_classifier  # noqa: E402

# (DP steps, evaluation epochs), most wanted first: the published GPU scale, then cheaper fallbacks.
LADDER = ((2000, 1000), (1500, 1000), (1000, 1000), (1000, 500), (750, 500), (500, 500), (500, 300), (300, 300),
          (200, 300), (200, 200), (100, 100))


def _eps_key(eps: float) -> str:
    return "inf" if not math.isfinite(eps) else f"{eps:g}"


def contended_speed(x, y, xt, yt, *, ipc: int, eps: float, scale: dict, method: str, device, seed: int,
                    steps: int, epochs: int) -> dict:
    """Seconds per DP step and per evaluation epoch (+ one test evaluation) of this configuration, right now."""
    xd, yd = torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)
    distiller, *_ = make_distiller(n=len(x), image_shape=tuple(x.shape[1:]), ipc=ipc, eps=eps, scale=scale,
                                   method=method, device=device, seed=seed)
    s_it = time_iterations(distiller, xd, yd, steps)
    rng = np.random.default_rng(0)
    images = rng.random((10 * ipc, *x.shape[1:]), dtype=np.float32)
    labels = np.repeat(np.arange(10), ipc)
    train_classifier(images, labels, 10, TrainSettings(epochs=2), seed=0, device=device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    model = train_classifier(images, labels, 10, TrainSettings(epochs=epochs), seed=0, device=device)
    sync(device)
    t1 = time.perf_counter()
    evaluate(model, xt, yt, 10)
    t2 = time.perf_counter()
    return {"s_it": s_it, "s_epoch": (t1 - t0) / epochs, "s_test": t2 - t1}


def choose(speeds: list[dict], budget_s: float, evals: int, ladder=LADDER) -> tuple[int, int, float]:
    """First LADDER pair whose predicted time (slowest worker) fits the budget; the last pair if none does."""
    s_it = max(s["s_it"] for s in speeds)
    s_ep = max(s["s_epoch"] for s in speeds)
    s_test = max(s["s_test"] for s in speeds)
    for steps, epochs in ladder:
        predicted = steps * s_it + evals * (epochs * s_ep + s_test)
        if predicted <= budget_s:
            return steps, epochs, predicted
    steps, epochs = ladder[-1]
    return steps, epochs, steps * s_it + evals * (epochs * s_ep + s_test)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    device = pick_device()
    x, y, xt, yt = load_data(args.data_dir)
    scale = dict(SCALES["gpu"])
    if args.batch_per_class:
        scale["batch_per_class"] = args.batch_per_class
    scale["schedule"] = args.schedule
    tag = f"ipc{args.ipc}_eps{_eps_key(args.eps)}" + ("" if args.schedule == "decoupled" else f"_{args.schedule}")
    sync_dir = Path(args.sync_dir)
    sync_dir.mkdir(parents=True, exist_ok=True)
    # Start barrier: probe only once every worker is loaded, so the probe sees the full contention (without it, the
    # 2026-11-27 H100 run probed 0.04-0.10 s per DP step and then ran at 0.19 s, and IPC 50 missed the deadline).
    (sync_dir / f"{tag}.ready").touch()
    give_up = time.time() + args.sync_wait
    while len(list(sync_dir.glob("*.ready"))) < args.workers and time.time() < give_up:
        time.sleep(0.2)
    speed = contended_speed(x, y, xt, yt, ipc=args.ipc, eps=args.eps, scale=scale, method=args.method,
                            device=device, seed=args.seed, steps=args.probe_steps, epochs=args.probe_epochs)
    speed.update(ipc=args.ipc, eps=_eps_key(args.eps), written_at=time.time())
    tmp = sync_dir / f".{tag}.tmp"
    tmp.write_text(json.dumps(speed))
    tmp.rename(sync_dir / f"{tag}.json")
    print(f"[{tag}] contended speed {json.dumps(speed)}", flush=True)
    give_up = time.time() + args.sync_wait
    while len(list(sync_dir.glob("*.json"))) < args.workers and time.time() < give_up:
        time.sleep(0.5)
    all_speeds = [json.loads(p.read_text()) for p in sorted(sync_dir.glob("*.json"))]
    mine = [s for s in all_speeds if s["ipc"] == args.ipc]  # every schedule of an IPC gets the same sizes
    t_ref = max(s["written_at"] for s in all_speeds)
    budget = args.margin * (args.deadline - t_ref)
    steps, epochs, predicted = choose(mine, budget, args.evals, args.ladder or LADDER)
    print(f"[{tag}] budget {budget:.0f} s -> {steps} DP steps, {epochs} evaluation epochs "
          f"(predicted {predicted:.0f} s)", flush=True)
    scale.update(iterations=steps, eval_epochs=epochs)
    row = run_one(x, y, xt, yt, ipc=args.ipc, eps=args.eps, scale=scale, evals=args.evals, method=args.method,
                  device=device, seed=args.seed)
    row.update(parallel_workers=args.workers, contended_probe=speed, predicted_seconds=predicted,
               worker_wall_seconds=time.time() - speed["written_at"], process_peak_rss_mb=peak_memory_mb())
    line = (json.dumps(row) + "\n").encode()
    fd = os.open(args.jsonl, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    print(f"[{tag}] done: accuracy {100 * row['accuracy_mean']:.1f} +- {100 * row['accuracy_sd']:.1f} %", flush=True)


def merge(args) -> None:
    rows = []
    if Path(args.jsonl).is_file():
        rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
    order = {"1": 0, "10": 1, "inf": 2}
    rows.sort(key=lambda r: (r.get("schedule") != "decoupled", r["ipc"],
                             order.get(_eps_key(math.inf if r["epsilon"] == "inf" else r["epsilon"]), 9)))
    profile = json.loads(Path(args.profile).read_text()) if args.profile and Path(args.profile).is_file() else None

    def uniform(key):
        values = {r[key] for r in rows}
        return values.pop() if len(values) == 1 else "per row"

    payload = {"dataset": "fashion-mnist (Debian dataset-fashion-mnist)", "partition": "central", "scale": "gpu",
               "iterations": uniform("iterations") if rows else None,
               "batch_per_class": uniform("batch_per_class") if rows else None,
               "eval_epochs": uniform("eval_epochs") if rows else None,
               "parallel_workers": args.workers, "rows": rows,
               "peak_memory_mb": max((r["process_peak_rss_mb"] for r in rows), default=None),
               "gpu_peak_memory_mb": max((r["gpu_peak_memory_mb"] or 0 for r in rows), default=None),
               "isolated_profile": profile["rows"] if profile else None}
    if rows and args.phase_seconds:
        payload["parallel_phase_seconds"] = args.phase_seconds
        payload["aggregate_distill_tflops"] = sum(r["flops_per_iteration"] * r["iterations"] for r in rows) / \
            args.phase_seconds / 1e12
    out = write_result(args.name, payload, out_dir=Path(args.out_dir))
    print(f"wrote {out} ({len(rows)} rows)")


def summary(path: str) -> None:
    """A short table of a merged result (the end of the device's output)."""
    r = json.loads(Path(path).read_text())

    def f(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(r["machine"])
    for p in r.get("isolated_profile") or []:
        frac = p["fraction_of_peak"]
        print(f"alone ipc {p['ipc']:>2}: {f(p['seconds_per_iteration'] * 1e3, '.1f')} ms/it, "
              f"{p['flops_per_iteration'] / 1e9:.0f} GFLOP/it, {f(p['tflops_achieved'], '.1f')} TFLOP/s = "
              f"{f(frac and 100 * frac, '.2f')} % of {p['peak_bf16_dense_tflops']}, "
              f"{f(p['gpu_peak_memory_mb'], '.0f')} MB")
    for x in r["rows"]:
        print(f"{x.get('schedule', '?'):>11} ipc {x['ipc']:>2} eps {x['epsilon']!s:>4}: {100 * x['accuracy_mean']:.1f} +- "
              f"{100 * x['accuracy_sd']:.1f} % T={x['iterations']} E={x['eval_epochs']} "
              f"{x['seconds_per_iteration'] * 1e3:.1f} ms/it {f(x['tflops_achieved'], '.1f')} TFLOP/s "
              f"{f(x['gpu_peak_memory_mb'], '.0f')} MB, eval {x['eval_seconds_each']:.0f} s each")
    print("aggregate distill TFLOP/s", r.get("aggregate_distill_tflops"), "parallel phase s",
          r.get("parallel_phase_seconds"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--ipc", type=int, required=True)
    w.add_argument("--eps", type=float, required=True)
    w.add_argument("--deadline", type=float, required=True, help="Unix time by which the row must be written")
    w.add_argument("--margin", type=float, default=0.7, help="plan to use this fraction of the time left")
    w.add_argument("--workers", type=int, required=True)
    w.add_argument("--sync-dir", required=True)
    w.add_argument("--sync-wait", type=float, default=120)
    w.add_argument("--jsonl", required=True)
    w.add_argument("--evals", type=int, default=3)
    w.add_argument("--probe-steps", type=int, default=10)
    w.add_argument("--probe-epochs", type=int, default=10)
    w.add_argument("--method", default="dm")
    w.add_argument("--schedule", choices=["decoupled", "interleaved"], default="decoupled")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--data-dir", default=None)
    w.add_argument("--batch-per-class", type=int, default=None, help="override the GPU scale's (tests)")
    w.add_argument("--ladder", type=lambda v: tuple(tuple(int(a) for a in p.split("x")) for p in v.split(",")),
                   default=None, help="STEPSxEPOCHS,... instead of LADDER (tests)")
    m = sub.add_parser("merge")
    m.add_argument("--jsonl", required=True)
    m.add_argument("--profile", default=None)
    m.add_argument("--out-dir", required=True)
    m.add_argument("--name", default="b1_central_gpu")
    m.add_argument("--workers", type=int, default=9)
    m.add_argument("--phase-seconds", type=float, default=None)
    sub.add_parser("summary").add_argument("path")
    args = ap.parse_args()
    {"worker": worker, "merge": merge, "summary": lambda a: summary(a.path)}[args.cmd](args)


if __name__ == "__main__":
    main()
