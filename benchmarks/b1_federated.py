"""B1 federated + B2 communication: Fashion-MNIST over K sites (Dirichlet alpha, seed 0), DP distribution matching at
each site (IPC per site, epsilon per site over all rounds), merged by the coordinator's own merge and trained as the
global ConvNet-3; rounds > 1 match against the broadcast global model (FedDM-style). Baselines on the same split:
centralized, local-only, random real subset, FedAvg and DP-FedAvg (Opacus DP-SGD at the same per-site epsilon).

The sites run in memory (the same Distiller, merge and training code as `medfdd coordinator run`; no DICOM files),
so the benchmark measures the method, not file loading (see loading.py for that).
CPU-scale default: all 60k training records split over the sites and the product's defaults (the site and
coordinator configs' defaults: 3 rounds of 34 paid DP steps, 128 expected real records per class per step, 20
synthetic updates per paid statistic, evidence allocation and merge, each round's global model on every round's
merged set), evaluation 300 epochs; the GPU scale uses the published settings. Each setting can be overridden (the
result file records what ran; older files name their settings).
Run: `.venv/bin/python benchmarks/b1_federated.py [--eps 1 10 inf] [--rounds 1 3] [--baselines]`.
A run longer than one sitting (3 rounds at CPU scale take about 3 h per configuration on one AVX2 core): pass
`--save-merged DIR` and, after an interruption, the same command with `--resume` continues from the last site offer.
`--factor F` (b6_factorised): each site stores ipc slots per class of f x f tiles and offers their ipc * f^2 decoded
images per class; bytes up count the stored slots, rounds > 1 warm-start from them; sigma, q, steps do not depend on f.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from b6_factorised import FactorisedDM  # noqa: E402
from common import COUNT_NOISE, RESULTS, honest_plan, peak_memory_mb, write_result  # noqa: E402

from medfdd.artifacts import load_model, save_model  # noqa: E402
from medfdd.baselines import SiteRecords, centralized, fedavg, local_only, random_subset  # noqa: E402
from medfdd.config import CoordinatorConfig, DistillConfig  # noqa: E402
from medfdd.coordinator.merge import MergedSet, merge, union_of_rounds  # noqa: E402
from medfdd.coordinator.validate import AcceptedOffer  # noqa: E402
from medfdd.distill.base import PrivacyPlan, WarmStart  # noqa: E402
from medfdd.io import atomic_save_npz  # noqa: E402
from medfdd.prepare.partition import dirichlet_partition  # noqa: E402
from medfdd.prepare.sources import cap_per_class, load_fashion_mnist  # noqa: E402
from medfdd.training import TrainSettings, evaluate, pick_device, train_classifier  # noqa: E402
from privacy.accounting import epsilon_for  # noqa: E402

SCALES = {
    "cpu": {"max_per_class": None, "iterations": DistillConfig().iterations,
            "batch_per_class": DistillConfig().batch_per_class,
            "inner_steps": DistillConfig().updates_per_statistic, "eval_epochs": 300,
            "full_epochs": 5},
    "gpu": {"max_per_class": None, "iterations": 1000, "batch_per_class": 256, "eval_epochs": 1000, "full_epochs": 30},
}
DELTA = 1e-5
K = 10
BASELINES = ("centralized", "local-only", "subset", "fedavg")


FIRST_EXTRA_SEED = 100  # evaluation trainings after a run's first use seeds 100, 101, ...


def test_split(full) -> tuple[np.ndarray, np.ndarray]:
    """The 10k Fashion-MNIST test split as the global model sees it (float32 [N, 1, 28, 28] in [0, 1])."""
    return (full.test_images / 255.0).astype(np.float32)[:, None], full.test_labels


def fashion_sites(*, n_sites: int, alpha: float, seed: int, max_per_class: int | None = None
                  ) -> tuple[list[SiteRecords], tuple[np.ndarray, np.ndarray]]:
    """The B1 federated split: Fashion-MNIST's training records over `n_sites` sites by Dirichlet(alpha), and the 10k
    test split."""
    full = load_fashion_mnist()
    src = cap_per_class(full, max_per_class, seed)  # the training pool; the test split stays 10k
    x = (src.train_images / 255.0).astype(np.float32)[:, None]
    part = dirichlet_partition(src.train_labels, n_sites=n_sites, alpha=alpha, seed=seed, n_classes=K)
    sites = [SiteRecords(f"site-{i}", x[idx], src.train_labels[idx]) for i, idx in enumerate(part.site_indices)]
    return sites, test_split(full)


def read_offer(path: Path) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray, np.ndarray] | None:
    """A site offer saved by an earlier run (images, labels, meta, stored slots, their labels; the slots are the
    images unless `--factor` > 1 saved them), or None when it is missing or torn (a run killed while writing it before
    the writes were atomic): then the site round is recomputed, with the same seeds the same release."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["images"], f["labels"]
            slots = (f["slots"], f["slot_labels"]) if "slots" in f.files else (x, y)
            return x, y, {"class_evidence": f["class_evidence"].tolist()}, *slots
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        print(f"recomputing {path.name}: unreadable ({type(e).__name__})", flush=True)
        return None


def merged_accuracy(merged: MergedSet, test, *, epochs: int, seed: int, device) -> float:
    """Test accuracy of a global ConvNet-3 trained on a merged set (with its per-image weights)."""
    model = train_classifier(merged.images, merged.labels, K, TrainSettings(epochs=epochs), seed=seed, device=device,
                             weights=merged.training_weights)
    return evaluate(model, *test, K)["accuracy"]


def saved_tag(eps: float, rounds: int, factor: int = 1) -> str:
    """The name part of what `--save-merged` writes for one plan: `{site}_{tag}_r{r}.npz`, `merged_{tag}_r{r}.npz`,
    `global_{tag}_r{r}.safetensors` (factor 1 keeps the names of runs before `--factor`)."""
    return f"eps{eps:g}_rounds{rounds}" + (f"_f{factor}" if factor > 1 else "")


def federated_dm(sites: list[SiteRecords], test, *, ipc: int, eps: float, rounds: int, scale: dict, evals: int,
                 device, seed: int, merge_strategy: str = "concat", evidence_power: float = 2.0,
                 allocation: str = "evidence", save_merged: Path | None = None, resume: bool = False,
                 train_rounds: int = 0, count_noise: float | None = COUNT_NOISE, factor: int = 1) -> dict:
    """With `resume`, site offers and global models already in `save_merged` (from a run of the same settings cut
    off by a time limit) are read back instead of recomputed: every site round is a function of its seeds, its
    previous release and the broadcast model, so the run continues exactly where it stopped (no new noise drawn
    for a release already made). `factor` > 1: each site distils ipc slots per class of factor x factor tiles
    (b6_factorised.FactorisedDM) and offers the decoded images; the upload counted is the slots (decoding is public
    post-processing), the next round warm-starts from the slots, and the plan (sigma, q, steps, n) ignores factor."""
    dp = math.isfinite(eps)
    cfg = CoordinatorConfig(sites=[Path("x.yaml")], output=Path("x"), merge=merge_strategy,
                            evidence_power=evidence_power)
    global_model, per_round, bytes_up, spent, previous, merged_sets = None, [], 0, {}, {}, []
    charges: dict[str, list] = {}  # per site: every charge (sigma, q, steps) a default site's ledger would hold
    loaded = {"offers": 0, "models": 0}
    if save_merged is not None:
        save_merged.mkdir(parents=True, exist_ok=True)
    tag = saved_tag(eps, rounds, factor)
    t0 = time.perf_counter()
    for r in range(1, rounds + 1):
        offers = []
        for i, s in enumerate(sites):
            steps = scale["iterations"]
            batch = scale["batch_per_class"] * K
            sigma, q, prior = honest_plan(n=len(s.y), batch=batch, epsilon=eps, delta=DELTA, steps_per_round=steps,
                                          rounds=rounds, seed=seed + i, count_noise=count_noise)
            charges[s.site_id] = [*prior, *[(sigma, q, steps)] * r] if dp else []
            spent[s.site_id] = epsilon_for(charges[s.site_id], delta=DELTA) if dp else math.inf
            dcfg = DistillConfig(ipc=ipc, iterations=steps, batch_size=batch, inner_steps=scale.get("inner_steps"),
                                 allocation=allocation, **({"ema": scale["ema"]} if scale.get("ema") is not None else {}))
            offer_file = None if save_merged is None else save_merged / f"{s.site_id}_{tag}_r{r}.npz"
            saved = read_offer(offer_file) if resume else None
            if saved is not None:
                x, y, meta, slots, slot_labels = saved
                loaded["offers"] += 1
            else:
                plan = PrivacyPlan(dp, sigma, q, steps, dcfg.clip_norm)
                d = FactorisedDM(dcfg, plan, num_classes=K, image_shape=tuple(s.x.shape[1:]), seed=seed + i, round_=r,
                                 device=device, matching_net=global_model, factor=factor,
                                 start=previous.get(s.site_id) if dcfg.warm_start else None)
                assert d.plan == plan, "the privacy plan must not depend on --factor"
                st = d.run(torch.as_tensor(s.x), torch.as_tensor(s.y))
                slots, slot_labels = st.result().cpu().numpy(), st.labels.cpu().numpy()
                x, y = (t.cpu().numpy() for t in d.release(st))  # f = 1: the slots themselves
                meta = {"class_evidence": d.class_evidence(st)}  # what synthetic.json carries (released noisy counts)
                if offer_file is not None:  # the offer itself, for merge studies and resuming (np.load, no pickle)
                    atomic_save_npz(offer_file, images=x, labels=y,
                                    class_evidence=np.asarray(meta["class_evidence"], dtype=np.float64),
                                    **({"slots": slots, "slot_labels": slot_labels} if factor > 1 else {}))
            previous[s.site_id] = WarmStart(torch.as_tensor(slots), torch.as_tensor(slot_labels))  # next warm start
            stored = slots.nbytes + slot_labels.nbytes  # what the site uploads: the slots (decoding is public)
            offers.append(AcceptedOffer(s.site_id, x, y, meta, stored))
            bytes_up += stored
        merged = merge(offers, cfg, num_classes=K, seed=seed + r)
        merged_sets.append(merged)
        training = union_of_rounds(merged_sets[-train_rounds if train_rounds else 0:])  # as the coordinator's
        if save_merged is not None:  # for evaluation studies on the same merged set (np.load, no pickle)
            atomic_save_npz(save_merged / f"merged_{tag}_r{r}.npz", images=merged.images,
                            labels=merged.labels, weights=merged.weights)
        model_file = None if save_merged is None else save_merged / f"global_{tag}_r{r}.safetensors"
        if resume and model_file.is_file():
            global_model = load_model(model_file).to(device)
            loaded["models"] += 1
        else:
            global_model = train_classifier(training.images, training.labels, K,
                                            TrainSettings(epochs=scale["eval_epochs"]), seed=seed + r, device=device,
                                            weights=training.training_weights)
            if model_file is not None:
                save_model(model_file, global_model)
        per_round.append(evaluate(global_model, *test, K)["accuracy"])
        print(f"eps {eps:g} round {r}/{rounds}: accuracy {per_round[-1]:.4f} after {time.perf_counter() - t0:.0f} s",
              flush=True)  # a run cut off by a time limit still shows its finished rounds in the log
    distill_s = time.perf_counter() - t0
    accs = [per_round[-1]] + [merged_accuracy(training, test, epochs=scale["eval_epochs"], seed=FIRST_EXTRA_SEED + e,
                                              device=device) for e in range(evals - 1)]
    model_bytes = sum(p.numel() * p.element_size() for p in global_model.state_dict().values())
    merge_label = f"{cfg.merge} merge" + (f" ^{cfg.evidence_power:g}" if cfg.merge == "evidence" else "")
    alloc = ", evidence allocation" if dcfg.allocation == "evidence" else ""
    alloc += f", ema {dcfg.ema:g}" if dcfg.ema != DistillConfig.model_fields["ema"].default else ""
    if rounds > 1 and train_rounds != 1:
        alloc += f", global model on {'every round' if train_rounds == 0 else f'the last {train_rounds} rounds'}'s sets"
    alloc += f", factorised {factor}x{factor} slots" if factor > 1 else ""
    return {"method": f"dp-dm (ours, {dcfg.schedule}, {dcfg.updates_per_statistic} upd/stat, {merge_label}{alloc})",
            "allocation": dcfg.allocation, "merge": cfg.merge, "evidence_power": cfg.evidence_power, "ipc_per_site": ipc,
            "epsilon": "inf" if not dp else eps, "count_noise": count_noise if dp else None, "rounds": rounds, "dm_seed": seed, "train_rounds": train_rounds,
            "n_trained_on": int(len(training.labels)),
            "epsilon_spent_per_site": {k: ("inf" if math.isinf(v) else v) for k, v in spent.items()},
            "charges_per_site": charges,
            "accuracy_mean": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)) if evals > 1 else 0.0,
            "accuracies": accs, "accuracy_per_round": per_round, "seconds": distill_s,
            "bytes_up_total": bytes_up, "bytes_down_total": model_bytes * len(sites) * (rounds - 1),
            "n_merged": int(len(merged.labels)), "factor": factor,
            **({"resumed": {"offers_read_back": loaded["offers"], "global_models_read_back": loaded["models"],
                            "note": "seconds counts only the resumed process"}} if resume else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 10.0, math.inf])
    ap.add_argument("--rounds", type=int, nargs="+", default=[CoordinatorConfig.model_fields["rounds"].default])
    ap.add_argument("--scale", choices=SCALES, default="cpu")
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--baselines", nargs="*", choices=BASELINES, default=None,
                    help="also run these baselines (no name: all of centralized, local-only, subset, fedavg)")
    ap.add_argument("--baseline-eps", type=float, nargs="+", default=None,
                    help="FedAvg epsilons, inf = plain FedAvg (default: plain FedAvg and the finite --eps)")
    # FedAvg settings; several values per flag sweep their product (one row each; the comparison uses the best)
    ap.add_argument("--fedavg-rounds", type=int, nargs="+", default=[3])
    ap.add_argument("--fedavg-local-epochs", type=int, nargs="+", default=[1])
    ap.add_argument("--fedavg-lr", type=float, nargs="+", default=[0.01], help="local SGD learning rate (momentum 0.9)")
    ap.add_argument("--fedavg-batch", type=int, nargs="+", default=[64], help="local (expected, under DP) batch")
    ap.add_argument("--fedavg-clip", type=float, nargs="+", default=[1.0], help="DP-SGD per-example clipping norm")
    ap.add_argument("--fedavg-width", type=int, nargs="+", default=[128], help="ConvNet-3 width of the FedAvg model")
    ap.add_argument("--fedavg-seeds", type=int, nargs="+", default=[0], help="FedAvg training seeds (init, "
                    "sampling, DP noise; the partition stays --seed's): several give its spread at one setting")
    ap.add_argument("--skip-dm", action="store_true", help="run only the chosen --baselines, no DM rows "
                    "(e.g. --skip-dm --baselines fedavg: FedAvg and DP-FedAvg only)")
    ap.add_argument("--merge", choices=["concat", "balanced", "evidence"], default="evidence",
                    help="coordinator merge of the site sets (evidence: weight by the sites' released noisy counts)")
    ap.add_argument("--evidence-power", type=float, default=2.0)
    ap.add_argument("--allocation", choices=["uniform", "evidence"], default="evidence",
                    help="images per class at each site: ipc each, or shared by the noisy class counts")
    ap.add_argument("--factor", type=int, nargs="+", default=[1], help="b6_factorised slots of f x f tiles: each "
                    "site offers ipc * f^2 decoded images per class for the bytes of ipc (1 = plain DM)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-rounds", type=int, default=0, help="the coordinator's `train_rounds`: each round's "
                    "global model trains on the merged sets of the last N rounds (0 = all so far; post-processing)")
    ap.add_argument("--dm-seed", type=int, default=None, help="seed of the private distillation (site init and DP "
                    "noise use dm-seed + site index, merge and global training dm-seed + round; default --seed; the "
                    "partition stays --seed's): a second draw on the same split, e.g. 1000, gives medfdd's spread over "
                    "noise draws (keep it clear of 0-9 and 100+, the default run's and the evaluations' seeds)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--iterations", type=int, help="override the scale's DP steps per round")
    ap.add_argument("--batch-per-class", type=int, help="override the scale's expected real records per class per step")
    ap.add_argument("--inner-steps", type=int, help="synthetic updates per paid statistic (default: the config's)")
    ap.add_argument("--ema", type=float, help="moving-average decay of the released images (default: the config's)")
    ap.add_argument("--eval-epochs", type=int, help="override the scale's evaluation epochs")
    ap.add_argument("--max-per-class", type=int, help="override the scale's training images per class (0 = all)")
    ap.add_argument("--count-noise", type=float, default=COUNT_NOISE, help="std of each site's DP record count its "
                    "sample rate is derived from (the site default; 0 = n declared public, the pre-2026-12-06 runs)")
    ap.add_argument("--save-merged", type=Path,
                    help="also write each round's site offers, merged set (npz) and global model (safetensors) "
                         "into this folder")
    ap.add_argument("--resume", action="store_true",
                    help="continue a run cut off by a time limit: read back the site offers and global models it "
                         "left in --save-merged (same arguments) instead of recomputing them")
    ap.add_argument("--finalize", metavar="WHY", help="write the result file from the rows an interrupted run left in "
                    "NAME.partial.jsonl (same split arguments), WHY saying what did not run; runs nothing (set MEDFDD_COMMIT to the commit the run started from)")
    args = ap.parse_args()
    if args.resume and args.save_merged is None:
        ap.error("--resume reads back what an earlier run wrote: pass the same --save-merged folder")
    scale = dict(SCALES[args.scale])
    for key in ("iterations", "batch_per_class", "eval_epochs", "max_per_class", "inner_steps", "ema"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key)
    if scale["max_per_class"] == 0:
        scale["max_per_class"] = None
    sites, test = fashion_sites(n_sites=args.sites, alpha=args.alpha, seed=args.seed,
                                max_per_class=scale["max_per_class"])
    device = pick_device()
    name = args.name or f"b1_federated_{args.scale}_alpha{args.alpha:g}"
    out_dir = args.out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f"{name}.partial.jsonl"
    rows = []
    if args.finalize:
        rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]

    def keep(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(partial, "a") as f:
            f.write(json.dumps(row) + "\n")

    for rounds, factor in itertools.product([] if args.skip_dm or args.finalize else args.rounds, args.factor):
        for eps in args.eps:
            keep(federated_dm(sites, test, ipc=args.ipc, eps=eps, rounds=rounds, scale=scale, evals=args.evals,
                              device=device, seed=args.seed if args.dm_seed is None else args.dm_seed,
                              merge_strategy=args.merge,
                              evidence_power=args.evidence_power, allocation=args.allocation,
                              save_merged=args.save_merged, resume=args.resume, train_rounds=args.train_rounds,
                              count_noise=args.count_noise or None, factor=factor))
    chosen_baselines = set() if args.baselines is None else set(args.baselines or BASELINES)
    if args.finalize:
        chosen_baselines = set()
    settings = TrainSettings(epochs=scale["eval_epochs"])
    full = TrainSettings(epochs=scale["full_epochs"], batch_size=256)
    if "centralized" in chosen_baselines:
        t = time.perf_counter()
        keep({"method": "centralized (all records, non-private)", **_acc(centralized(sites, test, K, full, seed=0)),
              "seconds": time.perf_counter() - t})
    if "local-only" in chosen_baselines:
        t = time.perf_counter()
        keep({"method": "local-only (mean over sites, non-private)", **_acc(local_only(sites, test, K, full, seed=0)),
              "seconds": time.perf_counter() - t})
    if "subset" in chosen_baselines:
        t = time.perf_counter()
        keep({"method": f"random real subset ipc {args.ipc}/site (non-private)",
              **_acc(random_subset(sites, test, K, settings, ipc=args.ipc, seed=0)), "seconds": time.perf_counter() - t})
    if "fedavg" in chosen_baselines:
        chosen = args.baseline_eps or [math.inf] + [e for e in args.eps if math.isfinite(e)]
        grid = itertools.product(args.fedavg_rounds, args.fedavg_local_epochs, args.fedavg_lr, args.fedavg_batch,
                                 args.fedavg_clip, args.fedavg_width, [e if math.isfinite(e) else None for e in chosen],
                                 args.fedavg_seeds)
        for rounds, epochs, lr, batch, clip, width, eps, fed_seed in grid:
            fed = {"local_epochs": epochs, "lr": lr, "batch_size": batch, "clip": clip, "width": width}
            t = time.perf_counter()
            res = fedavg(sites, test, K, rounds=rounds, epsilon=eps, seed=fed_seed, **fed)
            keep({"method": "FedAvg" if eps is None else "DP-FedAvg (Opacus DP-SGD)", "epsilon": eps or "inf",
                  "rounds": rounds, "fedavg_settings": fed, "fedavg_seed": fed_seed,
                  "noise_multiplier": res["noise_multiplier"],
                  **_acc(res), "accuracy_per_round": res["accuracy_per_round"],
                  "bytes_up_total": res["bytes_up_total"], "bytes_down_total": res["bytes_down_total"],
                  "model_bytes": res["model_bytes"], "seconds": time.perf_counter() - t})
    out = write_result(name, {"dataset": "fashion-mnist (Debian dataset-fashion-mnist)",
                              "partition": {"sites": args.sites, "alpha": args.alpha, "seed": args.seed,
                                            "site_totals": [len(s.y) for s in sites]},
                              "scale": args.scale, **scale, "delta": DELTA, "rows": rows,
                              **({"unfinished": args.finalize} if args.finalize else {}),
                              "peak_memory_mb": None if args.finalize else peak_memory_mb(),
                              "gpu_peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20
                              if torch.cuda.is_available() else None}, out_dir)
    partial.unlink(missing_ok=True)
    print(f"wrote {out}")


def _acc(m: dict) -> dict:
    return {"accuracy_mean": m["accuracy"], "accuracy_sd": 0.0,
            **({"per_site": m["per_site"]} if "per_site" in m else {})}


if __name__ == "__main__":
    main()
