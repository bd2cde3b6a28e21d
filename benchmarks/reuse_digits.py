"""Does reusing a paid noisy statistic buy accuracy at equal epsilon? (issue: decouple privacy cost from optimisation)

Three digits hospitals from `medfdd prepare` (alpha 0.5, seed 0), DP-DM at epsilon 1 per site; the same total of
synthetic updates (steps x inner_steps = 100) spent as many paid steps or as few paid steps reused many times.
Accuracy of ConvNet-3 trained on the merged synthetic sets, on the consortium's test split (mean over trainings).
Run: `.venv/bin/python benchmarks/reuse_digits.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_memory_mb, write_result  # noqa: E402

from medfdd.artifacts import load_synthetic  # noqa: E402
from medfdd.config import load_site_config  # noqa: E402
from medfdd.data.site_data import load_site_data  # noqa: E402
from medfdd.prepare.consortium import prepare_consortium  # noqa: E402
from medfdd.site.distill import distill_site  # noqa: E402
from medfdd.training import TrainSettings, evaluate, train_classifier  # noqa: E402

PLANS = [(100, 1), (30, 3), (10, 10), (5, 20)]  # (paid steps, updates per paid statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--evals", type=int, default=3)
    args = ap.parse_args()
    quiet = Console(quiet=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        res = prepare_consortium(source="digits", out=Path(tmp) / "c", sites=3, alpha=0.5, fmt="dicom", seed=0,
                                 epsilon=args.epsilon, delta=1e-5, ipc=10, iterations=10, rounds=1, method="dm", dp=True,
                                 console=quiet)
        test_cfg = yaml.safe_load(res.site_configs[0].read_text())
        test_cfg["data"].update(root=str(res.test_dir), holdout_fraction=0.0)
        test_cfg["output"] = str(Path(tmp) / "test-out")
        (Path(tmp) / "test.yaml").write_text(yaml.safe_dump(test_cfg))
        test = load_site_data(load_site_config(Path(tmp) / "test.yaml"))
        for steps, inner in PLANS:
            images, labels, t0 = [], [], time.perf_counter()
            for path in res.site_configs:
                cfg = yaml.safe_load(path.read_text())
                cfg["distill"].update(iterations=steps, inner_steps=inner, lr=1.0, width=32)
                cfg["data"]["root"] = str(res.out / cfg["site_id"])
                cfg["output"] = str(Path(tmp) / f"runs-{steps}-{inner}" / cfg["site_id"])
                p = Path(tmp) / f"{cfg['site_id']}-{steps}-{inner}.yaml"
                p.write_text(yaml.safe_dump(cfg))
                distill_site(load_site_config(p), console=quiet)
                syn = load_synthetic(load_site_config(p).output_dir)
                images.append(syn.images)
                labels.append(syn.labels)
            seconds = time.perf_counter() - t0
            x, y = np.concatenate(images), np.concatenate(labels)
            accs = [evaluate(train_classifier(x, y, 10, TrainSettings(epochs=200, width=64), seed=s), test.images,
                             test.labels, 10)["accuracy"] for s in range(args.evals)]
            row = {"paid_steps": steps, "inner_steps": inner, "epsilon_per_site": args.epsilon,
                   "accuracy_mean": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)),
                   "accuracies": accs, "distill_seconds_3_sites": seconds}
            rows.append(row)
            print(row, flush=True)
    print(write_result("reuse_digits", {"dataset": "sklearn digits via medfdd prepare (3 sites, alpha 0.5, seed 0)",
                                        "rows": rows, "peak_memory_mb": peak_memory_mb()}))


if __name__ == "__main__":
    main()
