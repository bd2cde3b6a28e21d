"""report.html: one self-contained page for a privacy officer (no scripts, fonts or links to fetch: works offline).

Order: verdict in plain words -> what each attack found (table) -> ROC curves (log-log) -> score histograms ->
privacy ledger (epsilon spent vs budget, per site and round) -> utility of the global model (accuracy and epsilon per
round, `medfdd.charts.progress_png`) -> synthetic images.
Figures are matplotlib PNGs embedded as base64 data URIs.
"""

from __future__ import annotations

import base64
import html
import math

import numpy as np

from medfdd.charts import png_bytes, progress_png, pyplot
from privacy.audit.metrics import roc
from privacy.audit.run import AuditOutcome

HISTOGRAMS = 12  # attack rows drawn as score histograms (all of them are in the table)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;
padding:0 16px;color:#1d2330;line-height:1.45}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #d7dbe3;padding-bottom:4px}
.verdict{border-radius:8px;padding:16px 20px;margin:16px 0;border:2px solid}
.ok{background:#e9f7ee;border-color:#2e8b57}.leak{background:#fff5e0;border-color:#d98c00}
.violation{background:#fde8e8;border-color:#c0392b}
.headline{font-size:1.25em;font-weight:700;margin:0 0 8px}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}th,td{border:1px solid #d7dbe3;padding:4px 8px;text-align:right}
th{background:#f2f4f8}td.l,th.l{text-align:left}img{max-width:100%;height:auto}figure{margin:8px 0}
.muted{color:#5b6475;font-size:.9em}.bad{color:#c0392b;font-weight:700}
"""


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(fig) -> str:
    return _uri(png_bytes(fig))


def _label(r) -> str:
    return f"{r.site} · {r.attack}"


def roc_figure(rows, target: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    floor = 1.0
    for r in rows:
        fpr, tpr, _ = roc(r.scores, r.is_member)
        lo = 1.0 / max(2, r.metrics.n_nonmembers)
        floor = min(floor, lo)
        ax.plot(np.maximum(fpr, lo / 2), np.maximum(tpr, lo / 2), lw=1.6,
                label=f"{_label(r)} (AUC {r.metrics.auc:.2f})")
    grid = np.logspace(math.log10(floor / 2), 0, 50)
    ax.plot(grid, grid, ls="--", color="grey", lw=1, label="guessing")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(floor / 2, 1.05)
    ax.set_xlabel("false-positive rate (unused scans wrongly accused)")
    ax.set_ylabel("true-positive rate (used scans caught)")
    ax.set_title(f"ROC, log-log: attacks on the {target.replace('_', ' ')}")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def histogram_figure(rows) -> str:
    plt = pyplot()
    n = len(rows)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.0 * cols, 2.7 * nrows), squeeze=False)
    for i, r in enumerate(rows):
        ax = axes[i // cols][i % cols]
        s = r.scores
        lo, hi = np.percentile(s, [0.5, 99.5])
        if hi <= lo:
            lo, hi = float(s.min()) - 0.5, float(s.max()) + 0.5
        bins = np.linspace(lo, hi, 30)
        ax.hist(np.clip(s[r.is_member], lo, hi), bins=bins, alpha=0.6, density=True, label="used (members)",
                color="#c0392b")
        ax.hist(np.clip(s[~r.is_member], lo, hi), bins=bins, alpha=0.6, density=True, label="unused (holdout)",
                color="#2e6fb5")
        ax.set_title(f"{_label(r)} → {r.target.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel("attack score (higher = 'was used')", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    return _png(fig)


def ledger_figure(sites) -> str | None:
    plt = pyplot()
    items = [(sid, s) for sid, s in sites.items() if s.ledger]
    if not items:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(items), 3.4))
    for i, (_sid, s) in enumerate(items):
        prev = 0.0
        for e in s.ledger:
            after = e["epsilon_after"]
            top = after if math.isfinite(after) else (s.epsilon_budget if math.isfinite(s.epsilon_budget) else 1.0)
            ax.bar(i, top - prev, bottom=prev, width=0.55, edgecolor="white",
                   color="#c0392b" if not math.isfinite(after) else "#2e6fb5")
            ax.text(i, (prev + top) / 2, f"r{e['round']}" + ("" if math.isfinite(after) else " ∞"), ha="center",
                    va="center", fontsize=7, color="white")
            prev = top
        if math.isfinite(s.epsilon_budget):
            ax.hlines(s.epsilon_budget, i - 0.35, i + 0.35, colors="black", linestyles="--")
    ax.set_xticks(range(len(items)), [sid for sid, _ in items], fontsize=8)
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_title("privacy ledger: epsilon per round (dashed = budget)", fontsize=9)
    return _png(fig)


def progress_figure(outcome: AuditOutcome) -> str | None:
    """`medfdd.charts.progress_png` of the audited sites: the coordinator's progress.png for this report's sites."""
    if not outcome.progress:
        return None
    points = [{**p, "epsilon": {s: e for s, e in p["epsilon"].items() if s in outcome.sites}}
              for p in outcome.progress]
    budgets = {sid: s.epsilon_budget for sid, s in outcome.sites.items()}
    return _uri(progress_png(points, budgets, "accuracy of the global model and epsilon spent, per round"))


def progress_section(outcome: AuditOutcome) -> list[str]:
    """The accuracy-and-epsilon-per-round chart with a caption in plain words (nothing when run.json has no round)."""
    fig = progress_figure(outcome)
    if fig is None:
        return []
    return ['<figure id="progress">', f'<img alt="accuracy and epsilon per round" src="{fig}">',
            "<figcaption class=\"muted\">Top: how often the shared model was right on the coordinator's test "
            "images after each round (1 = always). Bottom: the privacy each site had spent after each round; it "
            "only ever goes up, and each site's dashed line is the limit it agreed to. A line that reaches its "
            "dashed limit means that site can release nothing more. Rounds marked “ft” are fine-tuning rounds, in "
            "which the sites sent model updates instead of synthetic images.</figcaption></figure>"]


def synthetic_grid(images: np.ndarray, labels: np.ndarray, classes: list[str], title: str, max_cols: int = 10) -> str:
    from medfdd.artifacts import preview_png

    return _uri(preview_png(images, labels, classes, title, max_cols=max_cols, cell=0.6, dpi=90))


def _p(p: float | None) -> str:
    return "" if p is None else f" (p {p:.2g})"


def _e(x) -> str:
    return html.escape(str(x))


def _f(x, digits=3) -> str:
    if x == "inf" or (isinstance(x, float) and math.isinf(x)):
        return "∞"
    return f"{x:.{digits}g}" if isinstance(x, float) else _e(x)


def _detects(r: dict) -> bool:
    """Whether the row could have shown a bound above the accounted epsilon (never without DP)."""
    acc, power = r["epsilon_accounted"], r["max_certifiable_epsilon"]
    return acc != "inf" and (power == "inf" or power > acc + 1e-9)


def render_html(outcome: AuditOutcome, data: dict) -> str:
    v = data["verdict"]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
           "style-src 'unsafe-inline'\">",
           f"<title>Privacy audit — {_e(outcome.run['name'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Privacy audit of run “{_e(outcome.run['name'])}”</h1>",
           f"<p class=\"muted\">medfdd {_e(data['medfdd_version'])}, created {_e(data['created'])}; engine "
           f"{_e(outcome.run.get('engine'))}, {outcome.run.get('rounds')} round(s). This report is computed from real "
           "patient records without differential privacy: keep it at the site.</p>",
           f'<section id="verdict" class="verdict {v["level"]}"><p class="headline">Verdict: {_e(v["headline"])}</p>',
           f"<p>{_e(v['tested'])}</p><ul>"]
    out += [f"<li class=\"{'bad' if f['level'] == 'violation' else ''}\">{_e(f['text'])}</li>" for f in v["findings"]]
    out.append("</ul></section>")
    if outcome.notes:
        out.append("<p class=\"muted\">Notes: " + "; ".join(_e(n) for n in outcome.notes) + "</p>")

    out += ["<h2>What each attack found</h2>",
            "<p class=\"muted\">AUC 0.5 = guessing, 1 = perfect; p = the chance of an AUC that high without any "
            "leakage (one-sided test over patients). TPR at FPR = share of used scans caught when only "
            "0.1 % / 1 % of unused scans may be wrongly accused. The epsilon lower bound is what the attack proves "
            "at the stated confidence; under DP it must stay at or below the accounted epsilon. Only the canary test's "
            "one-run bound is rigorous (each canary is used with probability 1/2 in one run); the other rows' bounds "
            "treat the patients of one run as independent trials and are heuristic. The largest certifiable bound is "
            "what the row could have shown with a perfect attack on the same trials: where it is not above the "
            "accounted epsilon, the row could not have detected a breach of the budget, and a bound of 0 is no "
            "reassurance. Members and non-members count trials (patients; canaries for the canary row).</p>",
            "<table><tr><th class=l>site</th><th class=l>attack</th><th class=l>target</th><th>AUC</th>"
            "<th>TPR @ 0.1 % FPR</th><th>TPR @ 1 % FPR</th><th>balanced acc.</th><th>epsilon lower bound</th>"
            "<th>largest certifiable</th><th>epsilon accounted</th><th>members</th><th>non-members</th></tr>"]
    for r in data["results"]:
        over = (r["epsilon_accounted"] != "inf" and r["epsilon_lower_bound"] != "inf"
                and r["epsilon_lower_bound"] > r["epsilon_accounted"] + 1e-9) or \
               (r["epsilon_lower_bound"] == "inf" and r["epsilon_accounted"] != "inf")
        bad = over and r["epsilon_lower_bound_rigorous"]
        kind = "rigorous" if r["epsilon_lower_bound_rigorous"] else "heuristic"
        out.append(
            f"<tr><td class=l>{_e(r['site'])}</td><td class=l>{_e(r['attack'])}</td><td class=l>{_e(r['target'])}</td>"
            f"<td>{r['auc']:.3f}{_p(r.get('auc_p_value'))}</td><td>{r['tpr_at_fpr_0.001']:.3f}</td>"
            f"<td>{r['tpr_at_fpr_0.01']:.3f}</td>"
            f"<td>{r['balanced_accuracy']:.3f}</td><td class=\"{'bad' if bad else ''}\">"
            f"{_f(r['epsilon_lower_bound'])} ({_e(r['epsilon_lower_bound_method'].replace('_', '-'))}, {kind}, "
            f"{100 * r['confidence']:.0f} %)</td><td class=\"{'' if _detects(r) else 'bad'}\">"
            f"{_f(r['max_certifiable_epsilon'])}</td><td>{_f(r['epsilon_accounted'])}</td><td>{r['n_members']}</td>"
            f"<td>{r['n_nonmembers']}</td></tr>")
    out.append("</table>")

    out.append("<h2>ROC curves (log-log)</h2><p class=\"muted\">The low false-positive corner (left) is what "
               "matters: a curve above the dashed line there means some patients can be identified confidently.</p>")
    for target in ("global_model", "synthetic"):
        rows = [r for r in outcome.rows if r.target == target]
        if rows:
            out.append(f'<img alt="ROC curves, {_e(target)}" src="{roc_figure(rows, target)}">')
    if outcome.rows:
        out.append("<h2>Score distributions</h2><p class=\"muted\">Overlapping histograms mean the attack cannot "
                   "separate used from unused scans.</p>")
        out.append(f'<img alt="score histograms" src="{histogram_figure(outcome.rows[:HISTOGRAMS])}">')
        if len(outcome.rows) > HISTOGRAMS:
            out.append(f"<p class=\"muted\">The first {HISTOGRAMS} of {len(outcome.rows)} attack rows are shown; "
                       "the table above has them all.</p>")

    out.append("<h2>Privacy ledger</h2><table><tr><th class=l>site</th><th>round</th><th class=l>purpose</th>"
               "<th>noise multiplier</th><th>sample rate</th><th>steps</th><th>epsilon after</th><th>budget</th>"
               "<th>protects each</th></tr>")
    for sid, s in outcome.sites.items():
        for e in s.ledger or [{}]:
            if not e:
                out.append(f"<tr><td class=l>{_e(sid)}</td><td colspan=8 class=l>no ledger copy in the run directory"
                           "</td></tr>")
                continue
            out.append(f"<tr><td class=l>{_e(sid)}</td><td>{_e(str(e['round']))}</td><td class=l>{_e(e['purpose'])}</td>"
                       f"<td>{e['noise_multiplier']:.4g}</td><td>{e['sample_rate']:.4g}</td><td>{e['steps']}</td>"
                       f"<td>{_f(e['epsilon_after'], 4)}</td><td>{_f(s.epsilon_budget)}</td>"
                       f"<td>{_e(s.privacy_unit)}</td></tr>")
    out.append("</table>")
    fig = ledger_figure(outcome.sites)
    if fig:
        out.append(f'<img alt="privacy ledger" src="{fig}">')

    out.append("<h2>Utility of the global model</h2>")
    u = data.get("utility")
    if u:
        out.append("<table><tr>" + "".join(f"<th>{_e(k.replace('_', ' '))}</th>" for k in u) + "</tr><tr>"
                   + "".join(f"<td>{_f(x, 4) if isinstance(x, float) else _e(x)}</td>" for x in u.values())
                   + "</tr></table>")
    else:
        out.append("<p>No test-set metrics in run.json (the run had no test set).</p>")
    out += progress_section(outcome)
    per_round = [r for r in outcome.round_metrics if r.get("accuracy") is not None]
    if len(per_round) > 1:
        out.append("<table><tr><th>round</th><th>sites accepted</th><th>accuracy</th><th>balanced accuracy</th>"
                   "<th>AUC</th></tr>" + "".join(
                       f"<tr><td>{_e(str(r['round']))}</td><td>{_e(str(r['accepted']))}</td><td>{_f(r['accuracy'], 4)}</td>"
                       f"<td>{_f(r['balanced_accuracy'], 4)}</td><td>{_f(r['auc'], 4)}</td></tr>" for r in per_round)
                   + "</table>")

    out.append("<h2>Synthetic images each site shared</h2><p class=\"muted\">These are the only images that left "
               "the sites. Under DP they start from noise and should not resemble any one patient.</p>")
    for sid, s in outcome.sites.items():
        eps = "inf (NON-PRIVATE)" if math.isinf(s.epsilon_spent) else f"{s.epsilon_spent:.3g}"
        title = f"{sid}: {len(s.synthetic_labels)} images, epsilon {eps}"
        out.append(f'<img alt="synthetic images of {_e(sid)}" '
                   f'src="{synthetic_grid(s.synthetic_images, s.synthetic_labels, outcome.classes, title)}">')
    out += outside_epsilon_section(data["outside_epsilon"])
    out.append("</body></html>")
    return "\n".join(out)


def outside_epsilon_section(scope: dict) -> list[str]:
    """What epsilon covers (the neighbouring relation per unit, the group cases) and the data-dependent channels
    outside it, from report.json's `outside_epsilon` (`privacy.report.channels`)."""
    out = ["<h2 id=\"outside-epsilon\">What epsilon covers, and what leaves outside it</h2><p>Epsilon protects "
           "each unit under the neighbouring relation of its <code>privacy.unit</code>:</p><ul>"]
    out += [f"<li><b>{_e(u)}</b>: {_e(w)}</li>" for u, w in scope["neighbouring"].items()]
    out.append("</ul><p class=\"muted\">Protected only as a group of records:</p><ul>")
    out += [f"<li>{_e(g['case'])}: {_e(g['protection'])}</li>" for g in scope["groups"]]
    out.append("</ul><table><tr><th class=l>channel outside epsilon</th><th class=l>depends on</th>"
               "<th class=l>size</th><th class=l>mitigation</th></tr>")
    out += [f"<tr><td class=l>{_e(c['name'])}</td><td class=l>{_e(c['depends_on'])}</td><td class=l>{_e(c['size'])}"
            f"</td><td class=l>{_e(c['mitigation'])}</td></tr>" for c in scope["channels"]]
    out.append("</table>")
    return out
