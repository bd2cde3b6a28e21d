"""Each hospital's own model on small sites: the global model, it fine-tuned at the site, and local-only, per site.

Two small digits consortia: the demo's split (3 sites, mixed DICOM/NIfTI, `medfdd demo`'s distillation and training
settings) and a 4-site split (`medfdd prepare --source digits --sites 4`, same settings). For each noise draw the
consortium is prepared afresh under a new folder (same seed: the same split; new site output folders: new secret
noise keys), the coordinator runs in-process once (epsilon 1 per site), and every site then fine-tunes the global
model with each candidate recipe on its training patients only (`medfdd.site.evaluate.recipe_settings`: train_classifier
at the global model's width). The local-only model (the same recipes from scratch, same seed) does not depend on the
draw, so it is trained once per site, with a longer-trained one (`LOCAL_REFERENCE`) as a reference. Everything is
scored on each site's audit holdout. The recipes are fixed in advance (nothing at a site looks at its holdout); the
holdout numbers recorded here are what decided `SiteEvaluateConfig`'s defaults (fine-tuning: Yosinski et al. 2014).

Run (niced, about a quarter of an hour on 2 busy cores):
`nice -n 10 .venv/bin/python benchmarks/site_finetune.py --out /tmp/site_finetune --draws 3`
writes benchmarks/results/site_finetune_digits.json and the note site_finetune_digits.md from it (`--note-only`
rewrites the note from the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result  # noqa: E402

from medfdd.artifacts import load_model  # noqa: E402
from medfdd.config import SiteEvaluateConfig, load_coordinator_config, load_site_config  # noqa: E402
from medfdd.data.site_data import load_site_data  # noqa: E402
from medfdd.demo import DEMO_TRAIN_WIDTH, SMALL_SITE_DISTILL  # noqa: E402
from medfdd.federation.inprocess import run_inprocess  # noqa: E402
from medfdd.prepare.consortium import prepare_consortium  # noqa: E402
from medfdd.site.evaluate import recipe_settings  # noqa: E402
from medfdd.training import evaluate, train_classifier  # noqa: E402

CONSORTIA = {"demo3": {"sites": 3, "fmt": "mixed"}, "digits4": {"sites": 4, "fmt": "dicom"}}
# candidate recipes for both site models (fine-tuned from the global model / local-only from scratch)
# single-draw looks on the demo split also tried 10 epochs (lr 0.01) and 30 epochs at lr 0.001 (both well below, the
# latter far below) and 30 epochs at lr 0.01 (batch 64 or 32: ties with local-only at one site), dropped
# (site_finetune_digits_pass1.json: the first two of these on 3 other draws)
RECIPES = {"e50_lr0.003": {"epochs": 50, "lr": 0.003}, "e50_lr0.01": {"epochs": 50, "lr": 0.01},
           "e100_lr0.003": {"epochs": 100, "lr": 0.003}}
LOCAL_REFERENCE = {"e100_lr0.01": {"epochs": 100, "lr": 0.01}}


def one_draw(out: Path, name: str, draw: int, *, seed: int, iterations: int, train_epochs: int,
             cache: Path, local: dict) -> dict:
    """One noise draw: the coordinator's run, then per site the global model and each recipe's fine-tuned model on
    the holdout; `local` (site -> recipe -> holdout accuracy of local-only) is filled on the first draw."""
    from rich.console import Console

    quiet = Console(quiet=True)
    spec = CONSORTIA[name]
    res = prepare_consortium(source="digits", out=out / name / f"draw{draw}", sites=spec["sites"], alpha=0.5,
                             fmt=spec["fmt"], seed=seed, epsilon=1.0, delta=1e-5, ipc=10, iterations=iterations,
                             rounds=1, method="dm", dp=True, console=quiet)
    res.override(site={"distill": {**SMALL_SITE_DISTILL, "iterations": iterations},
                       "data": {"cache_dir": str(cache)}, "evaluate": {"finetune": False}},
                 coordinator={"train": {"epochs": train_epochs, "width": DEMO_TRAIN_WIDTH}})
    t0 = time.perf_counter()
    run_dir = run_inprocess(load_coordinator_config(res.coordinator_config), console=quiet)
    run_seconds = time.perf_counter() - t0
    cfg = load_coordinator_config(res.coordinator_config)
    sites = {}
    for path in cfg.site_paths:
        site = load_site_config(path)
        data = load_site_data(site)
        train = np.union1d(data.train, data.unused)
        k = len(data.classes)
        glob = load_model(run_dir / "global_model.safetensors")
        hx, hy = data.images[data.holdout], data.labels[data.holdout]
        row = {"n_train": int(len(train)), "n_holdout": int(len(hx)),
               "train_classes": int(len(np.unique(data.labels[train]))),
               "global": evaluate(glob, hx, hy, k)["accuracy"], "fine_tuned": {}}
        for rname, recipe in RECIPES.items():
            t1 = time.perf_counter()
            m = train_classifier(data.images[train], data.labels[train], k,
                                 recipe_settings(SiteEvaluateConfig(**recipe), glob.arch), seed=site.seed, init=glob)
            row["fine_tuned"][rname] = evaluate(m, hx, hy, k)["accuracy"]
            row.setdefault("seconds", {})[rname] = time.perf_counter() - t1
        if site.site_id not in local:
            local[site.site_id] = {rname: evaluate(train_classifier(
                data.images[train], data.labels[train], k, recipe_settings(SiteEvaluateConfig(**recipe), glob.arch),
                seed=site.seed), hx, hy, k)["accuracy"] for rname, recipe in {**RECIPES, **LOCAL_REFERENCE}.items()}
        sites[site.site_id] = row
        print(name, draw, site.site_id, {k: v for k, v in row.items() if k != "seconds"}, local[site.site_id],
              flush=True)
    return {"run_seconds": run_seconds, "sites": sites}


def summarize(draws: dict, local: dict) -> dict:
    """Per consortium and recipe: each site's holdout accuracy (fine-tuned: mean, sd, min over draws), and whether
    fine-tuned beats local-only (same recipe; and the longer-trained reference) for every site in every draw."""
    out = {}
    for name, runs in draws.items():
        site_ids = list(runs[0]["sites"])
        gl = np.array([[r["sites"][s]["global"] for s in site_ids] for r in runs])
        per = {"global_mean": dict(zip(site_ids, gl.mean(0).round(4).tolist(), strict=True))}
        ref = np.array([local[name][s][next(iter(LOCAL_REFERENCE))] for s in site_ids])
        for rname in RECIPES:
            ft = np.array([[r["sites"][s]["fine_tuned"][rname] for s in site_ids] for r in runs])
            lo = np.array([local[name][s][rname] for s in site_ids])
            per[rname] = {"fine_tuned_mean": dict(zip(site_ids, ft.mean(0).round(4).tolist(), strict=True)),
                          "fine_tuned_sd": dict(zip(site_ids, ft.std(0).round(4).tolist(), strict=True)),
                          "fine_tuned_min": dict(zip(site_ids, ft.min(0).round(4).tolist(), strict=True)),
                          "local_only": dict(zip(site_ids, lo.round(4).tolist(), strict=True)),
                          "beats_local_only_every_site_every_draw": bool((ft > lo).all()),
                          "beats_local_reference_every_site_every_draw": bool((ft > ref).all()),
                          "beats_global_every_site_every_draw": bool((ft > gl).all())}
        out[name] = per
    return out


# how the default was chosen (site_finetune_digits.json), appended to that note
READING = """## Reading

The default is the recipe whose fine-tuned model is the most accurate over all sites and draws while its local-only
counterpart is trained about as well as local-only gets (within a point of the longer-trained reference): the fair
comparison. At 50 epochs and lr 0.003 fine-tuned wins more often only because local-only is under-trained there; at
lr 0.01 fine-tuning forgets the global start and ties local-only. No fixed recipe tried puts fine-tuned above
local-only at every hospital in every draw. With the default it is above at every demo site on average (not in the
draw whose global model scored 0.24 at hospital-a), but on the 4-site split it is level with or below local-only at
three of four sites: local-only there already reaches 0.93-1.00, and holdouts of 27-115 scans resolve 1-4 points.
Not yet tried: an inner validation split of the training scans (early stopping, or falling back to local-only when
the global start does not help there).
"""


def default_recipe() -> str:
    d = SiteEvaluateConfig()
    return f"e{d.epochs}_lr{d.lr:g} (batch {d.batch_size}, augmentation {d.augment})"


def note(result: dict) -> str:
    """The markdown note: per consortium, each site's holdout accuracy under every recipe."""
    st = result["settings"]
    ref = next(iter(result["settings"]["local_reference"]))
    lines = [f"# Each hospital's own model on small digits sites ({st['draws']} noise draws)", "",
             f"Produced by `benchmarks/site_finetune.py` (the JSON of the same name, commit {result['commit']}): "
             f"one coordinator run per draw (epsilon {st['epsilon_per_site']:g} per site, alpha {st['alpha']:g}, "
             f"split seed {st['seed']}, {st['iterations']} DP steps, the demo's distillation and global-model "
             f"settings), then at each site the global model fine-tuned on its training patients and a local-only "
             f"model from scratch with the same recipe (batch {st['recipe_fixed']['batch_size']}, "
             f"augmentation {st['recipe_fixed']['augment']}, the global model's width), all scored on the site's "
             "audit holdout. Fine-tuned: mean ± sd (min) over draws; local-only and its longer-trained reference "
             f"({ref}) do not depend on the draw.", "",
             f"The default recipe (`evaluate` in the site config): {default_recipe()}.", ""]
    for name, per in result["summary"].items():
        sites = list(per["global_mean"])
        first = result["draws"][name][0]["sites"]
        lines += [f"## {name}", "", "| site | train / holdout | global | " + " | ".join(
            f"{r}: fine-tuned | {r}: local-only" for r in st["recipes"]) + f" | local-only {ref} |",
            "|---" * (3 + 2 * len(st["recipes"]) + 1) + "|"]
        for sid in sites:
            cells = [sid, f"{first[sid]['n_train']} / {first[sid]['n_holdout']}", f"{per['global_mean'][sid]:.3f}"]
            for r in st["recipes"]:
                x = per[r]
                cells += [f"{x['fine_tuned_mean'][sid]:.3f} ± {x['fine_tuned_sd'][sid]:.3f} "
                          f"({x['fine_tuned_min'][sid]:.3f})", f"{x['local_only'][sid]:.3f}"]
            cells.append(f"{result['local_only'][name][sid][ref]:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {r}: fine-tuned above local-only (same recipe) at every site: mean over draws "
                         f"**{all(per[r]['fine_tuned_mean'][s] > per[r]['local_only'][s] for s in sites)}**, "
                         f"in every draw **{per[r]['beats_local_only_every_site_every_draw']}**; above the {ref} "
                         "reference in every draw: "
                         f"{per[r]['beats_local_reference_every_site_every_draw']}; above the global model: "
                         f"{per[r]['beats_global_every_site_every_draw']}" for r in st["recipes"]] + [""]
    lines += ["## All sites and draws", "", "| recipe | fine-tuned (mean) | local-only (mean) | above / tied / below |",
              "|---|---|---|---|"]
    for r in st["recipes"]:
        pairs = [(x["fine_tuned"][r], result["local_only"][n][sid][r]) for n, runs in result["draws"].items()
                 for run in runs for sid, x in run["sites"].items()]
        ft, lo = np.array(pairs).T
        lines.append(f"| {r} | {ft.mean():.3f} | {lo.mean():.3f} | {(ft > lo).sum()} / {(ft == lo).sum()} / "
                     f"{(ft < lo).sum()} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="scratch folder for the consortia")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="the split (the demo's is 0)")
    ap.add_argument("--iterations", type=int, default=10, help="DP steps per site (the demo's default)")
    ap.add_argument("--train-epochs", type=int, default=100, help="global-model epochs (the demo's default)")
    ap.add_argument("--consortia", nargs="+", default=list(CONSORTIA), choices=list(CONSORTIA))
    ap.add_argument("--name", default="site_finetune_digits")
    ap.add_argument("--note-only", action="store_true", help="rewrite the markdown note from the JSON")
    args = ap.parse_args()
    if not args.note_only:
        if args.out is None:
            ap.error("--out is required")
        torch.set_num_threads(1)
        cache = args.out / "preprocess-cache"
        local = {name: {} for name in args.consortia}
        draws = {name: [one_draw(args.out, name, d, seed=args.seed, iterations=args.iterations,
                                 train_epochs=args.train_epochs, cache=cache, local=local[name])
                        for d in range(args.draws)] for name in args.consortia}
        settings = {**vars(args), "out": str(args.out), "recipes": RECIPES, "local_reference": LOCAL_REFERENCE,
                    "recipe_fixed": {k: v for k, v in SiteEvaluateConfig().model_dump().items()
                                     if k not in ("epochs", "lr")}, "epsilon_per_site": 1.0, "alpha": 0.5}
        write_result(args.name, {"settings": settings, "summary": summarize(draws, local), "local_only": local,
                                 "draws": draws})
    path = RESULTS / f"{args.name}.md"
    path.write_text(note(json.loads((RESULTS / f"{args.name}.json").read_text()))
                    + ("\n" + READING if args.name == "site_finetune_digits" else ""))
    print(f"wrote {RESULTS / args.name}.json and .md")


if __name__ == "__main__":
    main()
