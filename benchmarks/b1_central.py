"""B1 central: one site holds all of Fashion-MNIST's 60k training images; DP distribution matching at IPC 1/10/50
and epsilon {1, 10, inf}; accuracy of ConvNet-3 trained from scratch on the synthetic set (mean +- sd over >= 3
evaluation trainings) on the official 10k test split. See shared/BENCHMARKS.md.

CPU-scale (default): 200 DP steps, real batch 64 per class (Poisson, expected 640), evaluation 300 epochs.
GPU-scale (--scale gpu): the published settings (real batch 256 per class, 1000+ steps, 1000 evaluation epochs).
Run: `.venv/bin/python benchmarks/b1_central.py [--ipc 1 10 50] [--eps 1 10 inf] [--scale cpu|gpu]`.
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
from common import RESULTS, peak_memory_mb, write_result  # noqa: E402

from medfdd.config import DistillConfig  # noqa: E402
from medfdd.data.sources import load_fashion_mnist  # noqa: E402
from medfdd.distill.base import PrivacyPlan  # noqa: E402
from medfdd.distill.site import distiller_class  # noqa: E402
from medfdd.training import TrainSettings, evaluate, pick_device, train_classifier  # noqa: E402
from privacy.accounting import calibrate_noise, epsilon_for  # noqa: E402

SCALES = {
    "cpu": {"iterations": 200, "batch_per_class": 64, "eval_epochs": 300},
    "gpu": {"iterations": 2000, "batch_per_class": 256, "eval_epochs": 1000},
}
DELTA = 1e-5


def run_one(x, y, xt, yt, *, ipc: int, eps: float, scale: dict, evals: int, method: str, device, seed: int) -> dict:
    n = len(x)
    steps = scale["iterations"]
    batch = scale["batch_per_class"] * 10
    q = batch / n
    dp = math.isfinite(eps)
    sigma = calibrate_noise(epsilon=eps, delta=DELTA, sample_rate=q, steps=steps) if dp else 0.0
    spent = epsilon_for([(sigma, q, steps)], delta=DELTA) if dp else math.inf
    cfg = DistillConfig(method=method, ipc=ipc, iterations=steps, batch_size=batch)
    distiller = distiller_class(method)(cfg, PrivacyPlan(dp, sigma, q, steps, cfg.clip_norm), num_classes=10,
                                        image_shape=tuple(x.shape[1:]), seed=seed, device=device)
    t0 = time.perf_counter()
    state = distiller.run(torch.as_tensor(x), torch.as_tensor(y))
    distill_s = time.perf_counter() - t0
    images = state.images.detach().cpu().numpy()
    labels = state.labels.cpu().numpy()
    accs, t1 = [], time.perf_counter()
    for s in range(evals):
        model = train_classifier(images, labels, 10, TrainSettings(epochs=scale["eval_epochs"]), seed=s, device=device)
        accs.append(evaluate(model, xt, yt, 10)["accuracy"])
    row = {"method": method, "ipc": ipc, "epsilon": "inf" if not dp else eps, "epsilon_accounted":
           "inf" if not dp else spent, "delta": DELTA, "noise_multiplier": sigma, "sample_rate": q, "iterations": steps,
           "accuracy_mean": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)) if evals > 1 else 0.0,
           "accuracies": accs, "distill_seconds": distill_s, "seconds_per_iteration": distill_s / steps,
           "eval_seconds_each": (time.perf_counter() - t1) / evals, "lr": cfg.lr, "center": cfg.center}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 10.0, math.inf])
    ap.add_argument("--scale", choices=SCALES, default="cpu")
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--method", choices=["dm", "gm"], default="dm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="results file name (default b1_central_<scale>)")
    args = ap.parse_args()
    src = load_fashion_mnist()
    x = (src.train_images / 255.0).astype(np.float32)[:, None]
    xt = (src.test_images / 255.0).astype(np.float32)[:, None]
    device = pick_device()
    scale = SCALES[args.scale]
    rows = []
    name = args.name or f"b1_central_{args.scale}"
    partial = RESULTS / f"{name}.partial.jsonl"
    for ipc in args.ipc:
        for eps in args.eps:
            row = run_one(x, src.train_labels, xt, src.test_labels, ipc=ipc, eps=eps, scale=scale, evals=args.evals,
                          method=args.method, device=device, seed=args.seed)
            rows.append(row)
            with open(partial, "a") as f:
                f.write(json.dumps(row) + "\n")
    out = write_result(name, {"dataset": "fashion-mnist (Debian dataset-fashion-mnist)", "partition": "central",
                              "scale": args.scale, **scale, "rows": rows, "peak_memory_mb": peak_memory_mb()})
    partial.unlink(missing_ok=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
