"""A site evaluates the consortium's global model on its own scans (`medfdd site evaluate`).

Before a hospital relies on the global model it wants to know how it does on *its* patients, whose distribution may
differ from the coordinator's test split. The site loads its records as `site check` does, refuses a model that is
not the agreed architecture or holds NaN/Inf (`artifacts.load_agreed_model`), and scores two groups separately:
its audit holdout (patients no part of the pipeline ever used: the honest estimate) and its training patients (who
reached the model only through the site's DP synthetic set). A training-patient accuracy well above the holdout's
would hint at memorisation (`medfdd audit` measures it properly). The metrics are computed from real records
without DP, so `output/evaluation.json` and `output/evaluation.png` stay at the site: nothing here is sent anywhere.

With `evaluate.finetune` (the default) the site also trains its own two models on its training patients only, with
one fixed recipe (`SiteEvaluateConfig`, chosen in benchmarks/site_finetune.py without any holdout): the global model
fine-tuned (kept as `output/fine_tuned_model.safetensors`, the candidate a small hospital deploys) and a local-only
model from scratch at the same width (what the site would have without the consortium). Both are scored next to the
global model on the same groups. Nothing leaves the site, so this costs no privacy; neither model nor its scores is
ever offered (the offer is the allow-listed synthetic set only, invariant 5), and the holdout stays an honest estimate
because no choice here looks at it (fine-tuning on local data: Yosinski et al. 2014; per-site personalisation after
federated training: Wang et al. 2019, "Federated evaluation of on-device personalization").
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from torch import nn

from medfdd.artifacts import load_agreed_model, save_model
from medfdd.charts import png_bytes, pyplot
from medfdd.config import SiteConfig, SiteEvaluateConfig
from medfdd.data.records import RecordView
from medfdd.errors import MedfddError
from medfdd.io import atomic_write_bytes, atomic_write_json
from medfdd.nets import CONVNET
from medfdd.site.check import load_with_progress
from medfdd.training import TrainSettings, evaluate, pick_device, train_classifier

EVALUATION_FILE = "evaluation.json"
CONFUSION_FILE = "evaluation.png"
FINE_TUNED_FILE = "fine_tuned_model.safetensors"
GROUPS = {"holdout": "audit holdout (never used)", "training": "training patients (via the DP synthetic set)"}
MODELS = {"global": "global model", "fine_tuned": "global model fine-tuned here",
          "local_only": "local-only (this site alone)"}


class SiteEvaluationError(MedfddError):
    """The site has no usable record to evaluate the model on."""


def confusion_png(results: dict, classes: list[str], title: str) -> bytes:
    """PNG of row-normalised confusion matrices (counts written in the cells): one row per model, one column per
    group; `results` maps model -> group -> metrics."""
    plt = pyplot()
    k = len(classes)
    ncols = max(len(r) for r in results.values())
    fig, axes = plt.subplots(len(results), ncols, figsize=(0.45 * k * ncols + 2.5, (0.45 * k + 1.8) * len(results)),
                             squeeze=False)
    for row, (name, groups) in zip(axes, results.items(), strict=True):
        for ax in row[len(groups):]:
            ax.axis("off")
        for ax, (group, r) in zip(row, groups.items(), strict=False):
            cm = np.asarray(r["confusion_matrix"], dtype=float)
            rows = cm.sum(1, keepdims=True)
            ax.imshow(np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0), cmap="Blues", vmin=0, vmax=1)
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                                color="white" if cm[i, j] > 0.6 * max(rows[i, 0], 1) else "black")
            ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(k), classes, fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{MODELS[name]}: {GROUPS[group]}\naccuracy {r['accuracy']:.3f}, n = {r['n']}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def recipe_settings(ev: SiteEvaluateConfig, arch: dict) -> TrainSettings:
    """The site models' recipe: `train_classifier` with the config's epochs, lr and batch size, for the global
    model's architecture `arch` (its file header: ConvNet-3 at its width, or the MONAI network it names)."""
    architecture = arch["name"] if arch.get("family") == "monai" else CONVNET
    return TrainSettings(epochs=ev.epochs, lr=ev.lr, batch_size=ev.batch_size, width=int(arch.get("width", 128)),
                         augment=ev.augment, architecture=architecture)


def train_site_models(global_model: nn.Module, images: np.ndarray | RecordView, labels: np.ndarray, num_classes: int,
                      ev: SiteEvaluateConfig, *, seed: int, device) -> dict[str, nn.Module]:
    """The fine-tuned global model and a local-only one (from scratch, the global model's architecture), both
    trained on `images` (the site's training patients only: the caller never passes holdout records) with one
    recipe."""
    settings = recipe_settings(ev, global_model.arch)
    return {"fine_tuned": train_classifier(images, labels, num_classes, settings, seed=seed, device=device,
                                           init=global_model),
            "local_only": train_classifier(images, labels, num_classes, settings, seed=seed, device=device)}


def evaluate_at_site(cfg: SiteConfig, model_path: Path, *, console: Console | None = None) -> dict:
    """Score `model_path` on the site's holdout and training patients; write output/evaluation.json and .png."""
    console = console or Console()
    # the model is checked (exists, safetensors, agreed architecture, finite) before any scan is read
    model = load_agreed_model(model_path, in_channels=cfg.data.channels, num_classes=len(cfg.data.classes),
                              spatial_size=cfg.data.spatial_size).to(pick_device(cfg.device))
    data = load_with_progress(cfg, console)
    groups = {"holdout": data.holdout, "training": np.union1d(data.train, data.unused)}
    results = {g: evaluate(model, RecordView(data.images, idx), data.labels[idx], len(data.classes))
               for g, idx in groups.items() if len(idx)}  # read in batches from the site's memory map
    if not results:
        raise SiteEvaluationError(f"{cfg.site_id}: data", "no usable record to evaluate on",
                                  "run `medfdd site check` and fix the quarantined rows")
    out = cfg.output_dir
    models, extra = {"global": results}, {}
    train_idx = groups["training"]
    if cfg.evaluate.finetune and len(train_idx):
        with console.status(f"{cfg.site_id}: fine-tuning the global model and training a local-only one on "
                            f"{len(train_idx)} training records (they stay here)"):
            site_models = train_site_models(model, RecordView(data.images, train_idx), data.labels[train_idx],
                                            len(data.classes), cfg.evaluate, seed=cfg.seed, device=pick_device(cfg.device))
        for name, m in site_models.items():
            models[name] = {g: evaluate(m, RecordView(data.images, idx), data.labels[idx], len(data.classes))
                            for g, idx in groups.items() if len(idx)}
        saved = save_model(out / FINE_TUNED_FILE, site_models["fine_tuned"])
        extra = {"fine_tuned_model": {"file": FINE_TUNED_FILE, "sha256": hashlib.sha256(saved.read_bytes()).hexdigest()},
                 "site_recipe": {**recipe_settings(cfg.evaluate, model.arch).__dict__,
                                 "trained_on": "training", "seed": cfg.seed}}
    for per_group in models.values():
        for r in per_group.values():
            r["per_class_recall"] = dict(zip(data.classes, r["per_class_recall"], strict=True))
            r["auc"] = r["auc"] if math.isfinite(r["auc"]) else None  # one class present: AUC undefined
    report = {"site_id": cfg.site_id, "model_sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
              "time": datetime.now(UTC).isoformat(timespec="seconds"), "classes": data.classes,
              "groups": {g: GROUPS[g] for g in results}, "results": results,
              "models": {name: {"label": MODELS[name], "results": r} for name, r in models.items()}, **extra,
              "note": "computed from real records without DP: keep at the site"}
    atomic_write_json(out / EVALUATION_FILE, report)
    atomic_write_bytes(out / CONFUSION_FILE, confusion_png(models, data.classes, f"{cfg.site_id}: this site's scans"))
    _print(console, cfg.site_id, report)
    kept = f", {out / FINE_TUNED_FILE}" if extra else ""
    console.print(f"wrote {out / EVALUATION_FILE}, {out / CONFUSION_FILE}{kept} (they stay at the site)")
    return report


def _print(console: Console, site_id: str, report: dict) -> None:
    models = report["models"]
    several = len(models) > 1
    t = Table(title=f"{site_id}: " + ("the models" if several else "the global model") + " on this site's scans")
    for col in ("model",) * several + ("records", "n", "accuracy", "balanced accuracy", "macro AUC"):
        t.add_column(col, justify="left" if col in ("model", "records") else "right")
    for m in models.values():
        for g, r in m["results"].items():
            t.add_row(*(m["label"],) * several, GROUPS[g], str(r["n"]), f"{r['accuracy']:.3f}",
                      f"{r['balanced_accuracy']:.3f}", "-" if r["auc"] is None else f"{r['auc']:.3f}")
    console.print(t)
    # one model: a column per group; several: a column per model on the holdout (the honest estimate)
    shown = "holdout" if "holdout" in report["results"] else "training"
    cols = [(name, shown, name) for name in models] if several else [("global", g, g) for g in report["results"]]
    recall = Table(title="recall per class" + (f" ({GROUPS[shown]})" if several else ""))
    recall.add_column("class")
    for _, _, header in cols:
        recall.add_column(header, justify="right")
    for c in report["classes"]:
        recall.add_row(c, *("-" if (v := models[name]["results"][g]["per_class_recall"][c]) is None else f"{v:.2f}"
                            for name, g, _ in cols))
    console.print(recall)
