"""Choosing `medfdd demo`'s Fashion-MNIST setting: the demo's pipeline approximated in memory (one process, one
thread, no files), so a setting costs a minute or two of CPU instead of a whole demo.

The split is `medfdd prepare`'s (`cap_per_class` to --mpc records per class, then Dirichlet alpha over the sites,
seed 0); each site keeps a random 80 % as its training records (the demo splits by patient); images are scaled by
1/255 (the demo's min-max per image). Each site distills with DP distribution matching at epsilon 1 (the site
default's DP record count sets the sample rate, `common.honest_plan`), the coordinator's merge combines the offers,
and the global ConvNet-3 trains on the merged set; the baselines are `medfdd.baselines`' local-only, centralized and
DP-FedAvg on the same training records. A draw d seeds site i's distillation with 1000 d + i (new noise).

Run: `nice -n 10 .venv/bin/python benchmarks/demo_setting.py --mpc 1000 --local --fedavg 10:0.2:256 --draws 0 1 2`
(prints; the numbers behind the demo's setting are in benchmarks/results/demo_setting_selection.md).
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
from common import honest_plan  # noqa: E402

from medfdd.baselines import SiteRecords, centralized, fedavg, local_only  # noqa: E402
from medfdd.config import CoordinatorConfig, DistillConfig  # noqa: E402
from medfdd.coordinator.merge import merge  # noqa: E402
from medfdd.coordinator.validate import AcceptedOffer  # noqa: E402
from medfdd.distill.base import PrivacyPlan  # noqa: E402
from medfdd.distill.distribution_matching import DistributionMatching  # noqa: E402
from medfdd.prepare.partition import dirichlet_partition  # noqa: E402
from medfdd.prepare.sources import cap_per_class, load_source  # noqa: E402
from medfdd.training import TrainSettings, evaluate, train_classifier  # noqa: E402

K = 10


def scaled(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [0, 1], upsampled to 16 a side as the demo's configs ask."""
    x = torch.as_tensor((images / 255.0).astype(np.float32)[:, None])
    if x.shape[-1] < 16:
        x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear")
    return x.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="fashion-mnist")
    ap.add_argument("--mpc", type=int, default=1000, help="training records per class over all sites")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, nargs="+", default=[0])
    ap.add_argument("--iters", type=int, default=20, help="paid DP steps")
    ap.add_argument("--batch", type=int, default=128, help="expected real records per paid step")
    ap.add_argument("--inner", type=int, default=20, help="synthetic updates per paid statistic")
    ap.add_argument("--dlr", type=float, default=3.0, help="synthetic image learning rate")
    ap.add_argument("--dwidth", type=int, default=32, help="matching network width")
    ap.add_argument("--alloc", default="evidence")
    ap.add_argument("--merge", default="evidence")
    ap.add_argument("--epochs", type=int, default=100, help="global model epochs")
    ap.add_argument("--width", type=int, default=32, help="global model (and baselines') width")
    ap.add_argument("--eps", type=float, default=1.0)
    ap.add_argument("--local", action="store_true", help="also the local-only baseline")
    ap.add_argument("--central", action="store_true", help="also the centralized baseline")
    ap.add_argument("--fedavg", nargs="*", default=None, help="DP-FedAvg settings rounds:lr:batch ...")
    ap.add_argument("--base-epochs", type=int, default=15, help="local-only and centralized epochs")
    a = ap.parse_args()
    torch.set_num_threads(1)
    src = cap_per_class(load_source(a.source, seed=a.seed), a.mpc, a.seed)
    x = scaled(src.train_images)
    part = dirichlet_partition(src.train_labels, n_sites=a.sites, alpha=a.alpha, seed=a.seed, n_classes=K,
                               min_per_site=10)
    rng = np.random.default_rng(a.seed)
    sites = []
    for i, idx in enumerate(part.site_indices):
        idx = rng.permutation(idx)
        n_train = len(idx) - math.ceil(0.2 * len(idx))
        sites.append(SiteRecords(f"s{i}", x[idx[:n_train]], src.train_labels[idx[:n_train]]))
    test = (scaled(src.test_images), src.test_labels)
    print("site training sizes", [len(s.y) for s in sites], "test", len(test[1]), flush=True)
    base = TrainSettings(epochs=a.base_epochs, width=a.width)
    if a.local:
        t = time.process_time()
        r = local_only(sites, test, K, base, seed=0)
        print("local-only", round(r["accuracy"], 4), r["per_site"], f"cpu {time.process_time() - t:.0f}s", flush=True)
    if a.central:
        t = time.process_time()
        r = centralized(sites, test, K, base, seed=0)
        print("centralized", round(r["accuracy"], 4), f"cpu {time.process_time() - t:.0f}s", flush=True)
    for spec in a.fedavg or []:
        rounds, lr, batch = spec.split(":")
        t = time.process_time()
        r = fedavg(sites, test, K, rounds=int(rounds), lr=float(lr), batch_size=int(batch), width=a.width,
                   epsilon=a.eps, seed=0)
        print("dp-fedavg", spec, round(r["accuracy"], 4), f"cpu {time.process_time() - t:.0f}s", flush=True)
    accs = []
    for draw in a.draws:
        t = time.process_time()
        offers = []
        for i, s in enumerate(sites):
            sigma, q, _ = honest_plan(n=len(s.y), batch=a.batch, epsilon=a.eps, delta=1e-5, steps_per_round=a.iters,
                                      rounds=1, seed=1000 * draw + i)
            dcfg = DistillConfig(ipc=10, iterations=a.iters, batch_size=a.batch, inner_steps=a.inner, lr=a.dlr,
                                 width=a.dwidth, allocation=a.alloc)
            d = DistributionMatching(dcfg, PrivacyPlan(True, sigma, q, a.iters, 1.0), num_classes=K,
                                     image_shape=tuple(s.x.shape[1:]), seed=1000 * draw + i, round_=1,
                                     device=torch.device("cpu"))
            st = d.run(torch.as_tensor(s.x), torch.as_tensor(s.y))
            xs, ys = st.result().cpu().numpy(), st.labels.cpu().numpy()
            offers.append(AcceptedOffer(s.site_id, xs, ys, {"class_evidence": d.class_evidence(st)},
                                        xs.nbytes + ys.nbytes))
        m = merge(offers, CoordinatorConfig(sites=[Path("x.yaml")], output=Path("x"), merge=a.merge), num_classes=K,
                  seed=draw + 1)
        distill_s = time.process_time() - t
        model = train_classifier(m.images, m.labels, K, TrainSettings(epochs=a.epochs, width=a.width), seed=draw + 1,
                                 weights=m.training_weights)
        accs.append(evaluate(model, *test, K)["accuracy"])
        print(f"draw {draw}: global {accs[-1]:.4f} (distill cpu {distill_s:.0f}s, total cpu "
              f"{time.process_time() - t:.0f}s)", flush=True)
    sd = np.std(accs, ddof=1) if len(accs) > 1 else 0.0
    print("global mean", round(float(np.mean(accs)), 4), "sd", round(float(sd), 4), json.dumps(vars(a)), flush=True)


if __name__ == "__main__":
    main()
