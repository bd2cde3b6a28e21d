"""Charts as PNG bytes (matplotlib's Agg backend: no display needed): the figure boilerplate in one place, and the
pictures people look at: a run's accuracy and epsilon per round (the coordinator's progress.png and the privacy
officer's report), a site's distillation loss curve and its privacy budget. Drawing only: the callers decide where
the bytes go (atomically, `medfdd.io`) and what stays at a site.
"""

from __future__ import annotations

import io
import math

from medfdd.io import json_number

DISTILL, FINETUNE = "distill", "finetune"
KIND_STYLE = {DISTILL: ("#2e6fb5", "o", "distillation round"), FINETUNE: ("#d98c00", "s", "DP fine-tuning round")}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, never a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 90) -> bytes:
    """`fig` as PNG bytes (tight bounding box); the figure is closed."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def run_progress(run: dict) -> list[dict]:
    """One point per finished round of a run (a run.json dict, or the coordinator's own history in its shape):
    distillation rounds, then hybrid fine-tuning rounds. Each: label, kind (`distill` | `finetune`), accuracy of the
    global model on the coordinator's test split (None without one), and per accepted site the epsilon its offer
    or update declared (composed over everything the site released so far)."""

    def point(label: str, kind: str, h: dict) -> dict:
        acc = (h.get("metrics") or {}).get("accuracy")
        return {"label": label, "kind": kind, "accuracy": None if acc is None else float(acc),
                "epsilon": {s: json_number(e) for s, e in sorted((h.get("epsilon") or {}).items())}}

    return ([point(str(h["round"]), DISTILL, h) for h in run.get("rounds") or []]
            + [point(f"ft {h['round']}", FINETUNE, h) for h in (run.get("finetune") or {}).get("rounds") or []])


def _eps(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.3g}"


def progress_png(points: list[dict], budgets: dict[str, float], title: str = "") -> bytes:
    """Two panels over the rounds of `run_progress`: the global model's test accuracy (distillation and fine-tuning
    rounds in their own colour and marker) and each site's epsilon spent, with its budget dashed in the same colour.
    A site without DP (epsilon infinite) is named in the legend, not drawn."""
    plt = pyplot()
    n = len(points)
    fig, (acc_ax, eps_ax) = plt.subplots(2, 1, sharex=True, figsize=(max(5.0, 1.6 + 0.5 * n), 5.4),
                                         gridspec_kw={"height_ratios": [1, 1.1]})
    x = list(range(n))
    measured = [(i, p["accuracy"], p["kind"]) for i, p in enumerate(points) if p["accuracy"] is not None]
    if measured:
        acc_ax.plot([i for i, _, _ in measured], [a for _, a, _ in measured], color="#8a93a6", lw=1, zorder=1)
        for kind, (color, marker, name) in KIND_STYLE.items():
            pts = [(i, a) for i, a, k in measured if k == kind]
            if pts:
                acc_ax.scatter(*zip(*pts, strict=True), color=color, marker=marker, s=36, label=name, zorder=2)
        acc_ax.legend(fontsize=7, loc="lower right")
    else:
        acc_ax.text(0.5, 0.5, "no test set: accuracy not measured", ha="center", va="center",
                    transform=acc_ax.transAxes, fontsize=9, color="#5b6475")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_ylabel("test accuracy")
    acc_ax.grid(alpha=0.3)
    start = next((i for i, p in enumerate(points) if p["kind"] == FINETUNE), None)
    sites = sorted({s for p in points for s in p["epsilon"]} | set(budgets))
    colors = plt.get_cmap("tab10")
    for j, site in enumerate(sites):
        pts = [(i, p["epsilon"][site]) for i, p in enumerate(points) if site in p["epsilon"]]
        finite = [(i, e) for i, e in pts if math.isfinite(e)]
        budget = budgets.get(site, math.inf)
        if pts and not finite:
            eps_ax.plot([], [], color=colors(j % 10), label=f"{site}: not private (epsilon = ∞)")
            continue
        if finite:
            since = next((points[i]["label"] for i, e in pts if not math.isfinite(e)), None)
            eps_ax.plot(*zip(*finite, strict=True), color=colors(j % 10), marker=".", lw=1.4,
                        label=f"{site} (budget {_eps(budget)})" + (f", not private from round {since}" if since else ""))
        if math.isfinite(budget):
            eps_ax.axhline(budget, color=colors(j % 10), ls="--", lw=0.9)
    if start:  # where the fine-tuning rounds begin
        for ax in (acc_ax, eps_ax):
            ax.axvline(start - 0.5, color="#8a93a6", ls=":", lw=1)
    eps_ax.set_ylim(bottom=0)
    eps_ax.set_ylabel("epsilon spent (cumulative)")
    eps_ax.set_xlabel("round (ft = DP fine-tuning)")
    eps_ax.set_xticks(x, [p["label"] for p in points], fontsize=8)
    eps_ax.grid(alpha=0.3)
    if sites:
        eps_ax.legend(fontsize=7, loc="lower right")
    acc_ax.set_title(title or "global model accuracy and privacy spent, per round", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def loss_png(points: list[tuple[int, float]], title: str, xlabel: str) -> bytes:
    """The matching loss per update (`points`: (update number, loss)), log scale when every loss is positive, with
    a running mean over a tenth of the updates when there are many."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    xs, ys = [u for u, _ in points], [v for _, v in points]
    ax.plot(xs, ys, lw=0.8, color="#2e6fb5", alpha=0.55 if len(points) > 50 else 1.0, label="loss per update")
    if len(points) > 50:
        import numpy as np

        k = max(2, len(points) // 10)
        mean = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax.plot(xs[k - 1:], mean, lw=1.6, color="#c0392b", label=f"running mean of {k}")
        ax.legend(fontsize=7)
    if ys and min(ys) > 0:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("matching loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


PURPOSE_COLORS = {"record-count": "#8e44ad", "distill": "#2e6fb5", "finetune": "#d98c00"}


def budget_png(charges: list[dict], budget: float, title: str) -> bytes:
    """Epsilon spent after each ledger charge (`charges`: round, purpose, epsilon_after, in ledger order), each
    point coloured by what it paid for, against the budget (dashed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.55 * len(charges)), 3.4))
    finite = [(i, c) for i, c in enumerate(charges) if math.isfinite(c["epsilon_after"])]
    if finite:
        ax.step([i for i, _ in finite], [c["epsilon_after"] for _, c in finite], where="post", color="#8a93a6",
                lw=1)
    for purpose in dict.fromkeys(c["purpose"] for c in charges):
        pts = [(i, c["epsilon_after"]) for i, c in finite if c["purpose"] == purpose]
        ax.scatter([i for i, _ in pts], [e for _, e in pts], s=40, zorder=2, label=purpose,
                   color=PURPOSE_COLORS.get(purpose, "#5b6475"))
    if len(finite) < len(charges):
        ax.text(0.02, 0.95, "not private (--no-dp): epsilon = ∞", transform=ax.transAxes, va="top", fontsize=8,
                color="#c0392b")
    if math.isfinite(budget):
        ax.axhline(budget, color="black", ls="--", lw=1, label=f"budget {budget:g}")
    ax.set_ylim(bottom=0)
    ax.set_xticks(range(len(charges)), [f"r{c['round']}" for c in charges], fontsize=8)
    ax.set_xlabel("ledger charge (round)")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if charges or math.isfinite(budget):
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return png_bytes(fig)
