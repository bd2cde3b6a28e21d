"""Figures of the benchmark results (written next to the JSON files by report.py): accuracy against epsilon.

- ``b1_central.png``: our default DP-DM (decoupled) per IPC, GPU and CPU scale, with NDPDC and Dosser at epsilon 1.
- ``b1_federated.png``: one panel per Dirichlet split: DP-DM in 1 round and in 3 rounds of the same paid steps (CPU
  scale, large-site settings), DP-FedAvg / FedAvg, and the non-private references on the same split.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EPS_AXIS = (1.0, 4.0, 10.0, math.inf)  # categorical positions: the epsilons the benchmarks run
EPS_LABELS = ("1", "4", "10", "∞ (no DP)")
# The federated configuration the README reports: CPU scale, 128 real records per class per paid step, 10 updates
# per paid statistic, evidence allocation and merge, 100 paid steps in all (3 rounds of 34 = 102).
FEDERATED_DEFAULT = {"scale": "cpu", "batch_per_class": 128, "inner_steps": 10}
FEDERATED_PAID_STEPS = (100, 102)
REFERENCES = {"random real subset": "subset (real, non-private)", "local-only": "local-only (non-private)",
              "centralized": "centralized, all records (non-private)"}


def eps_value(v) -> float:
    """A row's epsilon as a number (files write 1, 1.0, "inf" or nothing for non-private baselines)."""
    return math.inf if v in (None, "inf") else float(v)


def fedavg_label(row: dict) -> str:
    """A FedAvg row's method with the settings it ran (rows from before the sweep flags ran the defaults)."""
    f = row.get("fedavg_settings")
    if not f:
        return row["method"]
    epochs = f["local_epochs"]
    return (f"{row['method']}: width {f['width']}, batch {f['batch_size']}, lr {f['lr']:g}, clip {f['clip']:g}, "
            f"{epochs} local epoch{'s' if epochs > 1 else ''}")


def best_fedavg(rows: list[dict]) -> dict[tuple[str, float], tuple[dict, int]]:
    """(FedAvg or DP-FedAvg, epsilon) -> (the most accurate row of all settings tried, how many were tried): the
    baseline we compare against is its best setting (tuned on the test split, which can only favour it)."""
    out: dict[tuple[str, float], tuple[dict, int]] = {}
    for row in rows:
        if not row["method"].startswith(("DP-FedAvg", "FedAvg")):
            continue
        key = (row["method"], eps_value(row.get("epsilon")))
        best, n = out.get(key, (row, 0))
        out[key] = (max(best, row, key=lambda r: r["accuracy_mean"]), n + 1)
    return out


def _x(eps: float) -> int:
    return EPS_AXIS.index(eps)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _style_eps_axis(ax, title: str, xlabel: str) -> None:
    ax.set_xticks(range(len(EPS_AXIS)), EPS_LABELS)
    ax.set_xlim(-0.3, len(EPS_AXIS) - 0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _series(ax, points: dict[float, dict], label: str, **style) -> None:
    xs = sorted(points, key=_x)
    ax.errorbar([_x(e) for e in xs], [100 * points[e]["accuracy_mean"] for e in xs],
                yerr=[100 * (points[e].get("accuracy_sd") or 0) for e in xs], capsize=3, label=label, **style)


def central_figure(central_rows: dict[tuple[int, float, str], dict], anchors: dict[int, dict[str, float]]) -> bytes:
    """One panel per IPC: (ipc, epsilon, scale) -> row of the headline table, anchors at epsilon 1."""
    ipcs = sorted({ipc for ipc, _, _ in central_rows})
    fig, axes = plt.subplots(1, len(ipcs), figsize=(4.2 * len(ipcs), 3.6), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs, strict=True):
        for scale, marker, color in (("gpu", "o", "C0"), ("cpu", "s", "C1")):
            pts = {eps: row for (i, eps, s), row in central_rows.items() if i == ipc and s == scale}
            if pts:
                _series(ax, pts, f"medfdd DP-DM, {scale.upper()} scale", marker=marker, color=color)
        for (name, acc), marker in zip(sorted(anchors.get(ipc, {}).items()), ("v", "^"), strict=False):
            ax.plot([_x(1.0)], [acc], marker=marker, linestyle="none", color="grey", label=f"{name} (published)")
        _style_eps_axis(ax, f"B1 central, IPC {ipc}", "epsilon (delta 1e-5)")
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


def federated_rows(results: list[dict]) -> dict[tuple[float, int], dict[str, dict[float, dict]]]:
    """(alpha, training records) -> series name -> epsilon -> row: the README's federated configuration, DP-FedAvg /
    FedAvg and the non-private references, on splits where that configuration ran. Where two files hold the same
    point, the one with more evaluation trainings wins."""
    out: dict[tuple[float, int], dict[str, dict[float, dict]]] = {}
    for r in results:
        split = out.setdefault((r["partition"]["alpha"], sum(r["partition"]["site_totals"])), {})
        for row in r["rows"]:
            method, eps = row["method"], eps_value(row.get("epsilon"))
            if method.startswith("dp-dm"):
                rounds = row.get("rounds") or 1
                if (any(r.get(k) != v for k, v in FEDERATED_DEFAULT.items())
                        or r["iterations"] * rounds not in FEDERATED_PAID_STEPS
                        or row.get("allocation") != "evidence" or row.get("merge") != "evidence"):
                    continue
                name = f"medfdd DP-DM, {rounds} round{'s' if rounds > 1 else ''}"
            elif method.startswith(("DP-FedAvg", "FedAvg")):
                name = "DP-FedAvg (FedAvg at ∞), best setting tried"
                old = split.setdefault(name, {}).get(eps)
                if old is None or row["accuracy_mean"] > old["accuracy_mean"]:
                    split[name][eps] = row
                continue
            else:
                name = next((label for key, label in REFERENCES.items() if method.startswith(key)), None)
                if name is None:
                    continue
            old = split.setdefault(name, {}).get(eps)
            if old is None or len(row.get("accuracies") or [0]) > len(old.get("accuracies") or [0]):
                split[name][eps] = row
    return {key: series for key, series in out.items() if any(n.startswith("medfdd") for n in series)}


def federated_figure(results: list[dict]) -> bytes:
    """One panel per Dirichlet split (5 sites, IPC 10 per site)."""
    splits = federated_rows(results)
    keys = sorted(splits, key=lambda k: (-k[1], -k[0]))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.0), squeeze=False, sharey=True)
    for ax, (alpha, records) in zip(axes[0], keys, strict=True):
        series = splits[(alpha, records)]
        for name, style in (("medfdd DP-DM, 3 rounds", {"marker": "o", "color": "C0"}),
                            ("medfdd DP-DM, 1 round", {"marker": "s", "color": "C0", "linestyle": "--"}),
                            ("DP-FedAvg (FedAvg at ∞), best setting tried", {"marker": "D", "color": "C3"})):
            if series.get(name):
                _series(ax, series[name], name, **style)
        for label, color in zip(REFERENCES.values(), ("C2", "C7", "k"), strict=True):
            row = series.get(label, {}).get(math.inf)
            if row is not None:
                ax.axhline(100 * row["accuracy_mean"], color=color, linestyle=":", linewidth=1.2,
                           label=f"{label}: {100 * row['accuracy_mean']:.1f}")
        ax.axhline(80, color="grey", linewidth=0.6)
        _style_eps_axis(ax, f"B1 federated: {records // 1000}k records, 5 sites, alpha {alpha:g}, IPC 10/site",
                        "epsilon per site over all rounds (delta 1e-5)")
        ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def write_figures(out_dir: Path, central_rows: dict, anchors: dict, federated: list[dict]) -> list[str]:
    """Write the figures that have data; returns their file names."""
    written = []
    for name, has_data, make in (("b1_central.png", bool(central_rows), lambda: central_figure(central_rows, anchors)),
                                 ("b1_federated.png", bool(federated), lambda: federated_figure(federated))):
        if has_data:
            (out_dir / name).write_bytes(make())
            written.append(name)
    return written


def size_figure(path: Path, xlabel: str, memory: dict[str, list[tuple[float, float]]],
                seconds: dict[str, list[tuple[float, float]]], seconds_title: str = "time per paid step",
                memory_title: str = "peak memory of site distill", seconds_label: str = "s / paid step") -> None:
    """Two panels against the site's size (log x): peak memory (MiB) and seconds per paid step, one line per series
    of (size, value) points (site_scale.png, volumes_3d.png, audit_scale.png)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for ax, series in ((a, memory), (b, seconds)):
        for (label, points), style in zip(series.items(), ("o-", "s--", "^-", "v--"), strict=False):
            points = sorted(points)
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    a.set(xlabel=xlabel, ylabel="MiB", title=memory_title)
    b.set(xlabel=xlabel, ylabel=seconds_label, title=seconds_title)
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
