"""B5: which training recipe gives the coordinator the best global model from the SAME merged DP synthetic set.

Reads the site offers a `b1_federated.py --save-merged DIR` run wrote (`site-*_{tag}_r{r}.npz`), merges each round
with the coordinator's own `merge` (as b1_federated.py does: seed 0 + round, evidence merge ^2 by default), trains
on the union of the chosen rounds (`union_of_rounds`, the product's `train_rounds 0`), and evaluates each recipe
variant over `--evals` training seeds on the Fashion-MNIST test split. Variants (`--variants`, in that order):
named presets (`VARIANTS`) or `key=value,...` over `Recipe`'s fields. Derived rows cost no extra training: the
softmax ensemble of k models of a variant (`--ensemble-k`; mean +- sd over disjoint groups of k seeds, and the
mean over every k-subset), and SWA, the average of the weights over the last quarter of the epochs.

Everything here runs after the sites' DP releases, so any recipe is post-processing (Dwork & Roth 2014, Prop. 2.1):
no extra privacy cost. Each training's test softmax is cached (`--cache`), so a cut-off run resumes and a later run
with more `--evals` or variants only trains what is missing; the result is rewritten after every training (partial
results say which trainings are missing).
Run: `.venv/bin/python benchmarks/b5_recipe.py DIR --tag eps1_rounds3 --rounds 1 --name b5_recipe_r1
[--variants baseline w64 ...] [--evals 5] [--reuse-global] [--report-only]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from b1_federated import FIRST_EXTRA_SEED, K, test_split  # noqa: E402
from b1_merge_study import load_offers  # noqa: E402
from common import peak_memory_mb, write_result  # noqa: E402

from medfdd.artifacts import load_model  # noqa: E402
from medfdd.augment import FAMILIES, augment  # noqa: E402
from medfdd.config import CoordinatorConfig  # noqa: E402
from medfdd.coordinator.merge import MergedSet, load_merged, merge, union_of_rounds  # noqa: E402
from medfdd.nets import convnet_for  # noqa: E402
from medfdd.prepare.sources import load_fashion_mnist  # noqa: E402
from medfdd.training import TrainSettings, pick_device, predict_proba  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """The global model's training. Defaults: the product's `TrainSettings` (SGD momentum 0.9, wd 5e-4, lr / 10 at
    half the epochs, DSA augmentation)."""
    width: int = TrainSettings.width
    epochs: int = TrainSettings.epochs
    lr: float = TrainSettings.lr
    batch_size: int = TrainSettings.batch_size
    schedule: str = "step"  # step: / 10 at half (the product); cosine: cosine annealing to 0
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(a, a) mixing of pairs in each batch (Zhang et al., ICLR 2018); 0: off
    kd: float = 0.0  # weight of the teacher's soft labels (the baseline ensemble on the clean images; Hinton 2015)


VARIANTS = {
    "baseline": Recipe(),
    "w64": Recipe(width=64),
    "w256": Recipe(width=256),
    "cos300": Recipe(schedule="cosine"),
    "e600": Recipe(epochs=600),
    "e600cos": Recipe(epochs=600, schedule="cosine"),
    "e1000cos": Recipe(epochs=1000, schedule="cosine"),
    "ls0.1": Recipe(label_smoothing=0.1),
    "mixup0.2": Recipe(mixup=0.2),
    "kd0.5": Recipe(kd=0.5),
}
SWA_FRACTION = 0.25  # SWA rows: the weights averaged over the last quarter of the epochs (Izmailov et al., UAI 2018)


def parse_variant(spec: str) -> Recipe:
    if spec in VARIANTS:
        return VARIANTS[spec]
    fields = {f.name: f.type for f in dataclasses.fields(Recipe)}
    try:
        kv = dict(part.split("=", 1) for part in spec.split(","))
        return Recipe(**{k: (str if fields[k] == "str" else float if fields[k] == "float" else int)(v)
                         for k, v in kv.items()})
    except (KeyError, ValueError):
        raise SystemExit(f"--variants {spec!r}: a preset ({', '.join(VARIANTS)}) or key=value,... over "
                         f"{', '.join(fields)}") from None


def train_recipe(merged: MergedSet, recipe: Recipe, *, seed: int, device: torch.device,
                 soft: np.ndarray | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """`medfdd.training.train_classifier` with the recipe's changes (with the defaults it draws the same random
    stream and gives the same model). Returns (final model, SWA model). `soft`: teacher probabilities per image."""
    x = torch.as_tensor(merged.images, dtype=torch.float32, device=device)
    y = torch.as_tensor(merged.labels, dtype=torch.long, device=device)
    tw = merged.training_weights
    w = torch.ones(len(y), device=device) if tw is None else torch.as_tensor(tw, dtype=torch.float32, device=device)
    target = F.one_hot(y, K).float()
    if soft is not None:
        target = (1 - recipe.kd) * target + recipe.kd * torch.as_tensor(soft, dtype=torch.float32, device=device)
    model = convnet_for(tuple(x.shape[1:]), K, width=recipe.width, seed=seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=5e-4)
    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[recipe.epochs // 2], gamma=0.1)
             if recipe.schedule == "step" else torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.epochs))
    swa = torch.optim.swa_utils.AveragedModel(model)  # no batch statistics (instance norm): no BN update needed
    swa_from = recipe.epochs - max(1, round(SWA_FRACTION * recipe.epochs))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x), generator=g).to(device)
        for start in range(0, len(x), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            xb, tb, wb = augment(x[idx], g, FAMILIES), target[idx], w[idx]
            if recipe.label_smoothing:
                tb = (1 - recipe.label_smoothing) * tb + recipe.label_smoothing / K
            if recipe.mixup:
                lam = float(np.random.default_rng([seed, epoch, start]).beta(recipe.mixup, recipe.mixup))
                perm = torch.randperm(len(idx), generator=g).to(device)
                xb, tb = lam * xb + (1 - lam) * xb[perm], lam * tb + (1 - lam) * tb[perm]
                wb = lam * wb + (1 - lam) * wb[perm]
            per = -(tb * F.log_softmax(model(xb), dim=1)).sum(1)
            loss = (wb * per).sum() / wb.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if epoch >= swa_from:
            swa.update_parameters(model)
    return model.eval(), swa.module.eval()


def training_set(folder: Path, tag: str, rounds: list[int], strategy: str, power: float) -> MergedSet:
    """The union of the rounds' merges, as b1_federated.py builds it (round r merged with seed 0 + r), checked
    against the merged set that run saved when it is there."""
    cfg = CoordinatorConfig(sites=[Path("x.yaml")], output=Path("x"), merge=strategy, evidence_power=power)
    sets = []
    for r in rounds:
        m = merge(load_offers(folder, f"{tag}_r{r}"), cfg, num_classes=K, seed=r)
        saved = folder / f"merged_{tag}_r{r}.npz"
        if saved.is_file():
            s = load_merged(saved)
            if not (np.array_equal(s.images, m.images) and np.array_equal(s.labels, m.labels)
                    and np.allclose(s.weights, m.weights)):
                raise SystemExit(f"{saved}: differs from the merge of the offers (--merge / --evidence-power?)")
        sets.append(m)
    return union_of_rounds(sets)


def ensemble_rows(name: str, probas: list[np.ndarray], labels: np.ndarray, ks: list[int]) -> list[dict]:
    rows = []
    for k in ks:
        if len(probas) < k:
            continue
        acc = lambda group: float((np.mean([probas[i] for i in group], 0).argmax(1) == labels).mean())  # noqa: E731
        disjoint = [acc(range(i, i + k)) for i in range(0, len(probas) - k + 1, k)]
        subsets = [acc(c) for c in itertools.combinations(range(len(probas)), k)]
        rows.append({"variant": f"{name} ensemble k={k}", "models": k, "accuracy_mean": float(np.mean(disjoint)),
                     "accuracy_sd": float(np.std(disjoint, ddof=1)) if len(disjoint) > 1 else None,
                     "accuracies": disjoint, "groups": "disjoint groups of consecutive seeds",
                     "all_subsets_mean": float(np.mean(subsets)), "all_subsets_sd": float(np.std(subsets)),
                     "all_subsets": len(subsets)})
    return rows


def stats(name: str, recipe: Recipe | None, accs: list[float], seconds: list[float], seeds: list[int]) -> dict:
    return {"variant": name, **({"recipe": dataclasses.asdict(recipe)} if recipe else {}), "models": 1,
            "accuracy_mean": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1
            else None, "accuracies": accs, "seeds": seeds,
            "seconds_per_training": float(np.mean(seconds)) if seconds else None}


def fmt(r: dict) -> str:
    sd = "" if r["accuracy_sd"] is None else f" ± {100 * r['accuracy_sd']:.2f}"
    s, c = r.get("seconds_per_training"), r.get("cpu_seconds_per_training")
    extra = (f"; every {r['models']}-subset of the seeds: {100 * r['all_subsets_mean']:.2f} ± "
             f"{100 * r['all_subsets_sd']:.2f} ({r['all_subsets']}, overlapping)" if "all_subsets" in r else "")
    return (f"| {r['variant']} | {len(r['accuracies'])} | {100 * r['accuracy_mean']:.2f}{sd} | "
            f"{', '.join(f'{100 * a:.2f}' for a in r['accuracies'])}{extra} | {'' if s is None else f'{s:.0f}'}{'' if c is None else f' ({c:.0f} CPU)'} |")


def note(res: dict) -> str:
    lines = [f"# B5: the coordinator's training recipe on the same merged set ({res['training_set']})", "",
             f"Generated by `benchmarks/b5_recipe.py` (commit {res['commit']}, {res['machine']['cpu']}, "
             f"{'GPU ' + res['machine']['gpu'] if res['machine']['gpu'] else 'CPU'}). Offers: `{res['offers']}`, "
             f"{res['n_train']} merged images; test: Fashion-MNIST's 10k. Post-processing of the DP releases: "
             "no privacy cost.", "",
             "Ensemble rows average the softmax of k single models of the variant (no extra training): mean ± sd "
             "over disjoint groups of k consecutive seeds (no sd with one group), and the mean over every k-subset "
             "(overlapping, not independent). SWA rows: the same trainings' weights averaged over the last quarter "
             "of the epochs.", "",
             "| variant | n | test accuracy % (mean ± sd) | per model / group | s per training (wall, CPU) |", "|---|---|---|---|---|"]
    lines += [fmt(r) for r in res["rows"]]
    lines += [""] + [f"- {r['variant']}: two models disagree on {100 * r['pairwise_disagreement']:.1f} % of the test "
                     f"images; some model is right on {100 * r['oracle_any_correct']:.1f} % (an ensemble's ceiling)."
                     for r in res["rows"] if r.get("pairwise_disagreement") is not None]
    if res["missing"]:
        lines += ["", f"**Partial**: not trained (time ran out): {', '.join(res['missing'])}."]
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--tag", default="eps1_rounds3", help="saved offers site-*_{tag}_r{r}.npz")
    ap.add_argument("--rounds", type=int, nargs="+", default=[1], help="train on the union of these rounds' merges")
    ap.add_argument("--name", required=True)
    ap.add_argument("--variants", nargs="+", default=["baseline", "w64", "w256", "e600cos", "ls0.1", "mixup0.2"])
    ap.add_argument("--evals", type=int, default=3, help="training seeds per variant: round seed, 100, 101, ...")
    ap.add_argument("--ensemble-k", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--merge", default="evidence")
    ap.add_argument("--evidence-power", type=float, default=2.0)
    ap.add_argument("--reuse-global", action="store_true", help="baseline, round seed: the benchmark's own global "
                    "model (global_{tag}_r{last}.safetensors, same recipe, seed and set) instead of retraining it")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/b5_recipe_cache"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report-only", action="store_true", help="only rewrite the result from the cached trainings")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = training_set(args.folder, args.tag, args.rounds, args.merge, args.evidence_power)
    set_tag = f"{args.tag}_r{'+'.join(map(str, args.rounds))}_{args.merge}{args.evidence_power:g}"
    x_test, y_test = test_split(load_fashion_mnist())
    device = pick_device()
    seeds = [args.rounds[-1]] + [FIRST_EXTRA_SEED + e for e in range(args.evals - 1)]  # as b1_federated.py
    recipes = {v: parse_variant(v) for v in args.variants}
    args.cache.mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for v in args.variants for s in seeds]

    def cached(v: str, s: int) -> Path:
        return args.cache / f"{set_tag}_{v}_s{s}.npz"

    def report() -> Path:
        rows, missing, reused = [], [], []
        for v in args.variants:
            got = [(s, np.load(cached(v, s))) for s in seeds if cached(v, s).is_file()]
            missing += [f"{v} seed {s}" for s in seeds if not cached(v, s).is_file()]
            if not got:
                continue
            acc = lambda p: float((p.argmax(1) == y_test).mean())  # noqa: E731
            secs = [float(z["seconds"]) for _, z in got if float(z["seconds"]) > 0]
            reused += [f"{v} seed {s}: the benchmark's saved global model" for s, z in got if float(z["seconds"]) == 0]
            rows.append(stats(v, recipes[v], [acc(z["proba"]) for _, z in got], secs, [s for s, _ in got]))
            cpu = [float(z["cpu_seconds"]) for _, z in got if "cpu_seconds" in z]
            rows[-1]["cpu_seconds_per_training"] = float(np.mean(cpu)) if cpu else None
            preds = [z["proba"].argmax(1) for _, z in got]  # how much an ensemble of them can change
            pairs = [float((a != b).mean()) for a, b in itertools.combinations(preds, 2)]
            rows[-1]["pairwise_disagreement"] = float(np.mean(pairs)) if pairs else None
            rows[-1]["oracle_any_correct"] = float(np.mean(np.any([p == y_test for p in preds], 0)))
            rows += ensemble_rows(v, [z["proba"] for _, z in got], y_test, args.ensemble_k)
            swa = [(s, z) for s, z in got if "proba_swa" in z]
            if swa:
                rows.append(stats(f"{v} + SWA", None, [acc(z["proba_swa"]) for _, z in swa], [],
                                  [s for s, _ in swa]))
        res = {"dataset": "fashion-mnist (Debian dataset-fashion-mnist)", "training_set": set_tag,
               "offers": str(args.folder / f"site-*_{args.tag}_r{{{','.join(map(str, args.rounds))}}}.npz"),
               "n_train": int(len(train.labels)), "seeds": seeds, "device": str(device),
               "threads": torch.get_num_threads(), "reused_global_model": reused, "rows": rows, "missing": missing,
               "peak_memory_mb": peak_memory_mb(), "note": args.note}
        out = write_result(args.name, res)
        out.with_suffix(".md").write_text(note({**res, **json.loads(out.read_text())}))
        return out

    for v, s in todo:
        path = cached(v, s)
        if path.is_file() or args.report_only:
            continue
        t, cpu = time.perf_counter(), time.process_time()
        glob_file = args.folder / f"global_{args.tag}_r{args.rounds[-1]}.safetensors"
        if v == "baseline" and s == seeds[0] and args.reuse_global and glob_file.is_file():
            model = load_model(glob_file).to(device)
            np.savez(path, proba=predict_proba(model, x_test), proba_train=predict_proba(model, train.images),
                     seconds=0.0)
        else:
            soft = None
            if recipes[v].kd:
                teachers = [cached("baseline", ts) for ts in seeds if cached("baseline", ts).is_file()]
                if not teachers:
                    raise SystemExit(f"--variants {v}: needs baseline models first (list baseline before it)")
                soft = np.mean([np.load(p)["proba_train"] for p in teachers], 0)
            model, swa = train_recipe(train, recipes[v], seed=s, device=device, soft=soft)
            secs, cpu_secs = time.perf_counter() - t, time.process_time() - cpu
            np.savez(path, proba=predict_proba(model, x_test), proba_swa=predict_proba(swa, x_test),
                     proba_train=predict_proba(model, train.images), seconds=secs, cpu_seconds=cpu_secs)
        z = np.load(path)
        print(f"{v} seed {s}: accuracy {(z['proba'].argmax(1) == y_test).mean():.4f}"
              + (f", SWA {(z['proba_swa'].argmax(1) == y_test).mean():.4f}" if "proba_swa" in z else "")
              + f" in {time.perf_counter() - t:.0f} s", flush=True)
        out = report()
    out = report()
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
