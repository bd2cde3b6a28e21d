"""B4 hybrid: a synthetic warm start, then DP-FedAvg fine-tuning, at one per-site epsilon (Fashion-MNIST, B1 split).

Each site calibrates its private distillation to (1 - share) x epsilon (record count included), the coordinator trains
the global model on the union of the merged synthetic sets (post-processing), then K rounds of DP-FedAvg (Opacus
DP-SGD, Poisson sampling, per-site clipping; FedAvg of McMahan et al. 2017 with DP-SGD of Abadi et al. 2016) start
from that model, with noise calibrated so that each site's charges (record count, distillation rounds, fine-tuning)
compose to epsilon under Opacus's RDP accountant (adaptive composition, Mironov 2017, Prop. 1).
share 0 is medfdd one-shot; DP-FedAvg from scratch is `b1_federated.py --skip-dm --baselines fedavg`.

Run: `.venv/bin/python benchmarks/b4_hybrid.py --eps 1 --share 0.5 --finetune-rounds 5 10 --save-merged DIR`
(a rerun with `--resume` reads the distilled offers and merged sets back from DIR instead of distilling again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).parent))
from b1_federated import DELTA, K, fashion_sites, federated_dm, saved_tag  # noqa: E402
from common import RESULTS, honest_plan, peak_memory_mb, write_result  # noqa: E402

from medfdd.baselines import fedavg  # noqa: E402
from medfdd.coordinator.merge import MergedSet, union_of_rounds  # noqa: E402
from medfdd.training import TrainSettings, evaluate, pick_device, train_classifier  # noqa: E402
from privacy.accounting import epsilon_for  # noqa: E402


def merged_rounds(folder: Path, eps: float, rounds: int, use: int | None = None) -> MergedSet:
    """The union of the first `use` (default all) rounds' merged sets that `federated_dm(save_merged=folder)` wrote
    for a plan of `rounds` rounds (np.load, no pickle)."""
    sets = []
    for r in range(1, (use or rounds) + 1):
        with np.load(folder / f"merged_{saved_tag(eps, rounds)}_r{r}.npz", allow_pickle=False) as f:
            sets.append(MergedSet(f["images"], f["labels"], f["weights"], sources=[]))
    return union_of_rounds(sets)


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors in a safetensors file (a model as broadcast, without the file's header)."""
    return sum(t.nbytes for t in load_file(path).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--dm-seed", type=int, default=None, help="noise draw of the distillation (default: --seed)")
    ap.add_argument("--eps", type=float, default=1.0, help="per-site budget over distillation and fine-tuning")
    ap.add_argument("--share", type=float, nargs="+", default=[0.5], help="fraction of epsilon kept for fine-tuning "
                    "(the distillation calibrates to (1 - share) x epsilon)")
    ap.add_argument("--distill-rounds", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=34, help="paid DP steps per distillation round")
    ap.add_argument("--batch-per-class", type=int, default=128)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--start-epochs", type=int, default=300, help="epochs of the warm-start training on the merged set")
    ap.add_argument("--width", type=int, default=32, help="ConvNet-3 width of the global model")
    ap.add_argument("--finetune-rounds", type=int, nargs="+", default=[5])
    ap.add_argument("--lr", type=float, default=0.2, help="DP-FedAvg local SGD learning rate (momentum 0.9)")
    ap.add_argument("--batch", type=int, default=256, help="DP-FedAvg expected local batch")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--save-merged", type=Path, help="where the distilled offers and merged sets go")
    ap.add_argument("--from-run", type=Path, help="instead of distilling: a `b1_federated.py --save-merged` folder of "
                    "a run at --eps planned over --from-rounds rounds (same split, --iterations, --batch-per-class, "
                    "--dm-seed); the warm start uses its first --use-rounds rounds, the rest of the budget fine-tunes")
    ap.add_argument("--from-rounds", type=int, default=3)
    ap.add_argument("--from-eps", type=float, default=None, help="the --from-run's per-site budget when it differs "
                    "from --eps (e.g. a warm start distilled for epsilon 1, fine-tuned up to a total of 10)")
    ap.add_argument("--use-rounds", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    sites, test = fashion_sites(n_sites=5, alpha=args.alpha, seed=args.seed)
    device = pick_device()
    dm_seed = args.seed if args.dm_seed is None else args.dm_seed
    scale = {"iterations": args.iterations, "batch_per_class": args.batch_per_class, "inner_steps": args.inner_steps,
             "eval_epochs": args.start_epochs}
    rows = []
    name = args.name or f"b4_hybrid_cpu_alpha{args.alpha:g}_eps{args.eps:g}"
    args.out_dir.mkdir(parents=True, exist_ok=True)  # the partial rows are appended there as they finish
    if args.from_run is not None:  # the earlier run's charges, recomputed as its sites planned them
        args.share = [None]
    elif args.save_merged is None:
        ap.error("pass --save-merged (distil here) or --from-run (reuse a b1_federated run's rounds)")
    for share in args.share:  # None: --from-run
        t0 = time.perf_counter()
        if args.from_run is not None:
            eps_distill = args.eps if args.from_eps is None else args.from_eps
            charges = {}
            for i, s in enumerate(sites):
                sigma, q, prior = honest_plan(n=len(s.y), batch=args.batch_per_class * K, epsilon=eps_distill,
                                              delta=DELTA, steps_per_round=args.iterations, rounds=args.from_rounds,
                                              seed=dm_seed + i)
                charges[s.site_id] = [*prior, *[(sigma, q, args.iterations)] * args.use_rounds]
            merged = merged_rounds(args.from_run, eps_distill, args.from_rounds, use=args.use_rounds)
            dm = {"method": f"b1_federated run {args.from_run.name}: rounds 1-{args.use_rounds} of {args.from_rounds}",
                  "rounds": args.use_rounds, "n_trained_on": int(len(merged.labels)), "dm_seed": dm_seed,
                  "accuracy_per_round": None, "charges_per_site": charges,
                  "bytes_up_total": int(merged.images.nbytes + merged.labels.nbytes),
                  "bytes_down_total": len(sites) * sum(  # the global models broadcast before rounds 2..use
                      tensor_bytes(args.from_run / f"global_{saved_tag(eps_distill, args.from_rounds)}_r{r}.safetensors")
                      for r in range(1, args.use_rounds))}
        else:
            eps_distill = args.eps * (1 - share)
            folder = args.save_merged / f"share{share:g}"
            dm = federated_dm(sites, test, ipc=10, eps=eps_distill, rounds=args.distill_rounds, scale=scale,
                              evals=1, device=device, seed=dm_seed, merge_strategy="evidence", save_merged=folder,
                              resume=args.resume)
            merged = merged_rounds(folder, eps_distill, args.distill_rounds)
        start = train_classifier(merged.images, merged.labels, K,
                                 TrainSettings(epochs=args.start_epochs, width=args.width), seed=dm_seed,
                                 device=device, weights=merged.training_weights)
        start_acc = evaluate(start, *test, K)["accuracy"]
        print(f"warm start from {dm['method']}: accuracy {start_acc:.4f}", flush=True)
        for k_rounds in args.finetune_rounds:
            ft = fedavg(sites, test, K, rounds=k_rounds, lr=args.lr, batch_size=args.batch, width=args.width,
                        epsilon=args.eps, delta=DELTA, clip=args.clip, seed=dm_seed, start=start,
                        already_spent=dm["charges_per_site"])
            row = {"method": "hybrid (DP-DM warm start + DP-FedAvg)", "epsilon": args.eps, "share_finetune": share,
                   "epsilon_distill_target": eps_distill, "epsilon_distill_spent": {
                       sid: epsilon_for(c, delta=DELTA) for sid, c in dm["charges_per_site"].items()}, "distill": {k: dm[k] for k in (
                       "method", "rounds", "accuracy_per_round", "n_trained_on", "bytes_up_total", "dm_seed")},
                   "warm_start_accuracy": start_acc, "finetune_rounds": k_rounds,
                   "fedavg_settings": {"lr": args.lr, "batch_size": args.batch, "clip": args.clip, "width": args.width},
                   "accuracy_mean": ft["accuracy"], "accuracy_per_round": ft["accuracy_per_round"],
                   "epsilon_per_site": ft["epsilon_per_site"], "noise_multiplier": ft["noise_multiplier"],
                   "bytes_up_total": dm["bytes_up_total"] + ft["bytes_up_total"],
                   "bytes_down_total": dm["bytes_down_total"] + ft["bytes_down_total"],
                   "bytes_down_distill": dm["bytes_down_total"], "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out_dir / f"{name}.partial.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    out = write_result(name, {"dataset": "fashion-mnist (Debian dataset-fashion-mnist)",
                              "partition": {"sites": 5, "alpha": args.alpha, "seed": args.seed,
                                            "site_totals": [len(s.y) for s in sites]},
                              "delta": DELTA, "rows": rows, "peak_memory_mb": peak_memory_mb()}, out_dir=args.out_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
