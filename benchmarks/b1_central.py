"""B1 central: one site holds all of Fashion-MNIST's 60k training images; DP distribution matching at IPC 1/10/50
and epsilon {1, 10, inf}; accuracy of ConvNet-3 trained from scratch on the synthetic set (mean +- sd over >= 3
evaluation trainings) on the official 10k test split. See shared/BENCHMARKS.md.

CPU-scale (default): 200 DP steps, real batch 64 per class (Poisson, expected 640), 5 synthetic updates per paid
statistic (decoupled schedule), evaluation 300 epochs.
GPU-scale (--scale gpu): the published settings (real batch 256 per class, 1000+ steps, 1000 evaluation epochs).
`--schedule interleaved` is the ablation: the same paid statistics and updates, each statistic used right away.
Run: `.venv/bin/python benchmarks/b1_central.py [--ipc 1 10 50] [--eps 1 10 inf] [--scale cpu|gpu]`.

Every row also records the cost (B2): seconds per DP iteration (timed with CUDA synchronisation on a GPU), peak
memory (GPU: torch.cuda.max_memory_allocated of that configuration), and the convolution/matmul FLOPs of one
representative iteration (forward + backward, torch.utils.flop_counter) divided by the measured seconds: the achieved
TFLOP/s, next to the card's dense bf16 peak. `--profile N` times N iterations per IPC alone (no evaluation).
The imports stay light (no site runner, MONAI or DICOM readers) so the script runs on a bare GPU machine with only
pydantic and opacus carried as wheels; see benchmarks/gpu_b1.sh.
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).parent))
from common import COUNT_NOISE, RESULTS, honest_plan, peak_memory_mb, write_result  # noqa: E402

from medfdd.config import DistillConfig  # noqa: E402
from medfdd.distill import create_distiller  # noqa: E402
from medfdd.distill.base import Distiller, PrivacyPlan  # noqa: E402
from medfdd.prepare.sources import cap_per_class, load_fashion_mnist  # noqa: E402
from medfdd.training import TrainSettings, evaluate, pick_device, train_classifier  # noqa: E402
from privacy.accounting import epsilon_for  # noqa: E402

SCALES = {
    "cpu": {"iterations": 200, "batch_per_class": 64, "eval_epochs": 300, "inner_steps": 5, "schedule": "decoupled"},
    "gpu": {"iterations": 2000, "batch_per_class": 256, "eval_epochs": 1000, "inner_steps": 5,
            "schedule": "decoupled"},
}
DELTA = 1e-5

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s: the physical ceiling we compare with.
BF16_DENSE_PEAK_TFLOPS = (("GH200", 989.4), ("H200", 989.4), ("H100 PCIE", 756.0), ("H100 NVL", 835.0),
                          ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))


def bf16_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    return next((peak for key, peak in BF16_DENSE_PEAK_TFLOPS if key in name), None)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def make_distiller(*, n: int, image_shape: tuple, ipc: int, eps: float, scale: dict, method: str, device,
                   seed: int, count_noise: float | None = COUNT_NOISE) -> tuple[Distiller, float, float, float, int]:
    """(distiller, sigma, accounted epsilon incl. the record count, sample rate, steps) for one configuration."""
    steps = scale["iterations"]
    batch = scale["batch_per_class"] * 10
    dp = math.isfinite(eps)
    sigma, q, prior = honest_plan(n=n, batch=batch, epsilon=eps, delta=DELTA, steps_per_round=steps, rounds=1,
                                  seed=seed, count_noise=count_noise)
    spent = epsilon_for([*prior, (sigma, q, steps)], delta=DELTA) if dp else math.inf
    cfg = DistillConfig(method=method, ipc=ipc, iterations=steps, batch_size=batch,
                        inner_steps=scale.get("inner_steps", 1), schedule=scale.get("schedule", "decoupled"),
                        networks_per_update=scale.get("networks_per_update", 1),
                        allocation="uniform")  # ipc per class, as the published methods it is compared with
    distiller = create_distiller(cfg, PrivacyPlan(dp, sigma, q, steps, cfg.clip_norm), num_classes=10,
                                 image_shape=image_shape, seed=seed, device=device)
    return distiller, sigma, spent, q, steps


class _FlopCount(TorchDispatchMode):
    """torch.utils.flop_counter's per-op formulas (convolution, matmul and their backward) without
    FlopCounterMode's module tracker, whose hooks fail under torch.autograd.grad on a leaf (the synthetic images)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def iteration_flops(distiller: Distiller, x: torch.Tensor, y: torch.Tensor, t: int = 0) -> int:
    """Convolution/matmul FLOPs of one DP step (real embedding, synthetic forward and backward), on a throwaway
    state; x, y already on the distiller's device."""
    state = distiller.init_state()
    with _FlopCount() as counter:
        distiller.step(state, x, y, t)
    return int(counter.flops)


def time_iterations(distiller: Distiller, x: torch.Tensor, y: torch.Tensor, n: int, warmup: int = 3) -> float:
    """Seconds per DP step: mean over n steps after warm-up, synchronised before and after."""
    state = distiller.init_state()
    for t in range(warmup):
        distiller.step(state, x, y, t)
    sync(distiller.device)
    t0 = time.perf_counter()
    for t in range(warmup, warmup + n):
        distiller.step(state, x, y, t)
    sync(distiller.device)
    return (time.perf_counter() - t0) / n


def cost_fields(flops: int, s_per_it: float, device) -> dict:
    peak = bf16_peak_tflops(device)
    achieved = flops / s_per_it / 1e12 if s_per_it > 0 else float("nan")
    return {"flops_per_iteration": flops, "tflops_achieved": achieved, "peak_bf16_dense_tflops": peak,
            "fraction_of_peak": achieved / peak if peak else None}


def profile(x, y, *, ipcs, scale: dict, method: str, device, seed: int, n: int) -> list[dict]:
    """Each IPC alone: FLOPs of one iteration, seconds per iteration over n timed steps, GPU peak memory."""
    xd, yd = torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)
    rows = []
    for ipc in ipcs:
        reset_peak(device)
        distiller, sigma, _, q, _ = make_distiller(n=len(x), image_shape=tuple(x.shape[1:]), ipc=ipc, eps=1.0,
                                                   scale=scale, method=method, device=device, seed=seed)
        flops = iteration_flops(distiller, xd, yd)
        s_it = time_iterations(distiller, xd, yd, n)
        row = {"method": method, "ipc": ipc, "batch_per_class": scale["batch_per_class"], "sample_rate": q,
               "timed_iterations": n, "seconds_per_iteration": s_it, **cost_fields(flops, s_it, device),
               "gpu_peak_memory_mb": gpu_peak_mb(device)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def eval_accuracies(images, labels, xt, yt, *, evals: int, epochs: int, device) -> list[float]:
    """Test accuracy of `evals` ConvNet-3 trainings from scratch (seeds 0..evals-1) on (images, labels)."""
    accs = []
    for s in range(evals):
        model = train_classifier(images, labels, 10, TrainSettings(epochs=epochs), seed=s, device=device)
        accs.append(evaluate(model, xt, yt, 10)["accuracy"])
    return accs


def run_one(x, y, xt, yt, *, ipc: int, eps: float, scale: dict, evals: int, method: str, device, seed: int,
            count_noise: float | None = COUNT_NOISE) -> dict:
    reset_peak(device)
    distiller, sigma, spent, q, steps = make_distiller(n=len(x), image_shape=tuple(x.shape[1:]), ipc=ipc, eps=eps,
                                                       scale=scale, method=method, device=device, seed=seed,
                                                       count_noise=count_noise)
    dp = math.isfinite(eps)
    xd, yd = torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)
    flops = iteration_flops(distiller, xd, yd)  # one extra step on a throwaway state: no effect on the run
    sync(device)
    t0 = time.perf_counter()
    state = distiller.run(xd, yd)
    sync(device)
    distill_s = time.perf_counter() - t0
    images = state.result().cpu().numpy()
    labels = state.labels.cpu().numpy()
    t1 = time.perf_counter()
    accs = eval_accuracies(images, labels, xt, yt, evals=evals, epochs=scale["eval_epochs"], device=device)
    sync(device)
    row = {"method": method, "ipc": ipc, "epsilon": "inf" if not dp else eps, "epsilon_accounted":
           "inf" if not dp else spent, "count_noise": count_noise if dp else None, "delta": DELTA, "noise_multiplier": sigma, "sample_rate": q, "iterations": steps,
           "batch_per_class": scale["batch_per_class"], "eval_epochs": scale["eval_epochs"],
           "accuracy_mean": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)) if evals > 1 else 0.0,
           "accuracies": accs, "distill_seconds": distill_s, "seconds_per_iteration": distill_s / steps,
           "eval_seconds_each": (time.perf_counter() - t1) / evals, "lr": distiller.cfg.lr,
           "schedule": distiller.cfg.schedule, "inner_steps": distiller.cfg.updates_per_statistic,
           "networks_per_update": distiller.cfg.networks_per_update,
           "ema": distiller.cfg.ema if distiller.cfg.schedule == "decoupled" else None,
           "center": distiller.cfg.center, **cost_fields(flops, distill_s / steps, device),
           "gpu_peak_memory_mb": gpu_peak_mb(device)}
    print(json.dumps(row), flush=True)
    return row


def load_data(data_dir: str | None, max_per_class: int | None = None, seed: int = 0):
    """Fashion-MNIST as float32 [N, 1, 28, 28] in [0, 1] (train, labels, test, labels); `max_per_class`: at most
    that many training images per class (`cap_per_class`, seeded), the 10k test split always whole."""
    src = load_fashion_mnist(search_dirs=[data_dir] if data_dir else None)
    train = cap_per_class(src, max_per_class, seed)
    x = (train.train_images / 255.0).astype(np.float32)[:, None]
    xt = (src.test_images / 255.0).astype(np.float32)[:, None]
    return x, train.train_labels, xt, src.test_labels


def scale_from(args) -> dict:
    scale = dict(SCALES[args.scale])
    for key in ("iterations", "batch_per_class", "eval_epochs", "inner_steps", "schedule", "networks_per_update"):
        if getattr(args, key, None) is not None:  # scripts that reuse this parser's scales may lack some options
            scale[key] = getattr(args, key)
    return scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 10.0, math.inf])
    ap.add_argument("--scale", choices=SCALES, default="cpu")
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--method", choices=["dm", "gm"], default="dm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="results file name (default b1_central_<scale>)")
    ap.add_argument("--iterations", type=int, default=None, help="override the scale's DP steps")
    ap.add_argument("--batch-per-class", type=int, default=None, help="override the scale's real batch per class")
    ap.add_argument("--eval-epochs", type=int, default=None, help="override the scale's evaluation epochs")
    ap.add_argument("--inner-steps", type=int, default=None, help="override the synthetic updates per statistic")
    ap.add_argument("--schedule", choices=["decoupled", "interleaved"], default=None, help="override the schedule")
    ap.add_argument("--networks-per-update", type=int, default=None, help="banked statistics matched per synthetic "
                    "update (decoupled; stacked_networks.py times it)")
    ap.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON (and partial JSONL) go")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="only time N DP steps per IPC (FLOPs, s/iteration, peak memory); no evaluation")
    ap.add_argument("--count-noise", type=float, default=COUNT_NOISE, help="std of the DP record count the sample "
                    "rate is derived from (the site default; 0 = n declared public, the pre-2026-12-06 benchmarks)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y, xt, yt = load_data(args.data_dir)
    device = pick_device()
    scale = scale_from(args)
    name = args.name or f"b1_central_{args.scale}" + ("_profile" if args.profile else "")
    meta = {"dataset": "fashion-mnist (Debian dataset-fashion-mnist)", "partition": "central", "scale": args.scale,
              **scale}
    if args.profile:
        rows = profile(x, y, ipcs=args.ipc, scale=scale, method=args.method, device=device, seed=args.seed,
                       n=args.profile)
        out = write_result(name, {**meta, "rows": rows, "peak_memory_mb": peak_memory_mb()}, out_dir=args.out_dir)
        print(f"wrote {out}")
        return
    rows = []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    partial = args.out_dir / f"{name}.partial.jsonl"
    for ipc in args.ipc:
        for eps in args.eps:
            row = run_one(x, y, xt, yt, ipc=ipc, eps=eps, scale=scale, evals=args.evals, method=args.method,
                          device=device, seed=args.seed, count_noise=args.count_noise or None)
            rows.append(row)
            with open(partial, "a") as f:
                f.write(json.dumps(row) + "\n")
    out = write_result(name, {**meta, "rows": rows, "peak_memory_mb": peak_memory_mb()}, out_dir=args.out_dir)
    partial.unlink(missing_ok=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
