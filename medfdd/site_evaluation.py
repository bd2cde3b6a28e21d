"""A site evaluates the consortium's global model on its own scans (`medfdd site evaluate`).

Before a hospital relies on the global model it wants to know how it does on *its* patients, whose distribution may
differ from the coordinator's test split. The site loads its records as `site check` does, refuses a model that is
not the agreed architecture or holds NaN/Inf (`artifacts.load_agreed_model`), and scores two groups separately:
its audit holdout (patients no part of the pipeline ever used: the honest estimate) and its training patients (who
reached the model only through the site's DP synthetic set). A training-patient accuracy well above the holdout's
would hint at memorisation (`medfdd audit` measures it properly). The metrics are computed from real records
without DP, so `output/evaluation.json` and `output/evaluation.png` stay at the site: nothing here is sent anywhere.
"""

from __future__ import annotations

import hashlib
import io
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from medfdd.artifacts import load_agreed_model
from medfdd.config import load_site_config
from medfdd.data.check import load_with_progress
from medfdd.errors import MedfddError
from medfdd.io import atomic_write_bytes, atomic_write_json
from medfdd.training import evaluate, pick_device

EVALUATION_FILE = "evaluation.json"
CONFUSION_FILE = "evaluation.png"
GROUPS = {"holdout": "audit holdout (never used)", "training": "training patients (via the DP synthetic set)"}


class SiteEvaluationError(MedfddError):
    """The site has no usable record to evaluate the model on."""


def confusion_png(results: dict, classes: list[str], title: str) -> bytes:
    """PNG of one row-normalised confusion matrix per group (counts written in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, axes = plt.subplots(1, len(results), figsize=(0.45 * k * len(results) + 2.5, 0.45 * k + 1.8), squeeze=False)
    for ax, (group, r) in zip(axes[0], results.items(), strict=True):
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
        ax.set_title(f"{GROUPS[group]}\naccuracy {r['accuracy']:.3f}, n = {r['n']}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def evaluate_at_site(config_path: Path, model_path: Path, *, console: Console | None = None) -> dict:
    """Score `model_path` on the site's holdout and training patients; write output/evaluation.json and .png."""
    console = console or Console()
    cfg = load_site_config(config_path)
    # the model is checked (exists, safetensors, agreed architecture, finite) before any scan is read
    model = load_agreed_model(model_path, in_channels=cfg.data.channels, num_classes=len(cfg.data.classes),
                              spatial_size=cfg.data.spatial_size).to(pick_device(cfg.device))
    data = load_with_progress(cfg, console)
    groups = {"holdout": data.holdout, "training": np.union1d(data.train, data.unused)}
    results = {g: evaluate(model, data.images[idx], data.labels[idx], len(data.classes))
               for g, idx in groups.items() if len(idx)}
    if not results:
        raise SiteEvaluationError(f"{cfg.site_id}: data", "no usable record to evaluate on",
                                  "run `medfdd site check` and fix the quarantined rows")
    for r in results.values():
        r["per_class_recall"] = dict(zip(data.classes, r["per_class_recall"], strict=True))
        r["auc"] = r["auc"] if math.isfinite(r["auc"]) else None  # one class present: AUC undefined
    report = {"site_id": cfg.site_id, "model_sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
              "time": datetime.now(UTC).isoformat(timespec="seconds"), "classes": data.classes,
              "groups": {g: GROUPS[g] for g in results}, "results": results,
              "note": "computed from real records without DP: keep at the site"}
    out = cfg.output_dir
    atomic_write_json(out / EVALUATION_FILE, report)
    atomic_write_bytes(out / CONFUSION_FILE, confusion_png(results, data.classes, f"{cfg.site_id}: global model"))
    _print(console, cfg.site_id, report)
    console.print(f"wrote {out / EVALUATION_FILE} and {out / CONFUSION_FILE} (they stay at the site)")
    return report


def _print(console: Console, site_id: str, report: dict) -> None:
    res = report["results"]
    t = Table(title=f"{site_id}: the global model on this site's scans")
    for col in ("records", "n", "accuracy", "balanced accuracy", "macro AUC"):
        t.add_column(col, justify="left" if col == "records" else "right")
    for g, r in res.items():
        t.add_row(GROUPS[g], str(r["n"]), f"{r['accuracy']:.3f}", f"{r['balanced_accuracy']:.3f}",
                  "-" if r["auc"] is None else f"{r['auc']:.3f}")
    console.print(t)
    recall = Table(title="recall per class")
    recall.add_column("class")
    for g in res:
        recall.add_column(g, justify="right")
    for c in report["classes"]:
        recall.add_row(c, *("-" if res[g]["per_class_recall"][c] is None else f"{res[g]['per_class_recall'][c]:.2f}"
                            for g in res))
    console.print(recall)
