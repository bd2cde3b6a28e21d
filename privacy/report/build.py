"""report.json (the contract of shared/DESIGN.md) and the plain-words verdict, from an `AuditOutcome`.

Per attack row: site, attack, target, auc, tpr_at_fpr_0.001, tpr_at_fpr_0.01, balanced_accuracy,
epsilon_lower_bound (+ method, confidence), max_certifiable_epsilon (the largest bound the row could have shown: a
perfect attack on the same trials), epsilon_accounted, n_members, n_nonmembers (trials: patients for member/holdout
rows, canaries for the canary row; n_member_scans, n_nonmember_scans count the scored scans). Infinite epsilons are
written as the string "inf" (as in the ledger). No file path, header value or patient id is ever written.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

from medfdd import __version__
from medfdd.io import atomic_write_json, atomic_write_text, json_number, json_safe
from privacy.audit.run import CONSORTIUM, AttackRow, AuditError, AuditOutcome
from privacy.report.channels import outside_epsilon

FORMAT_VERSION = 1
AUC_LEAK = 0.6  # an AUC at or above this (and significant, `auc_p_value`) is called measurable leakage
TOL = 1e-9
ATTACK_WORDS = {
    "loss": "loss threshold (does the global model fit the scan unusually well?)",
    "lira_online": "LiRA online (likelihood ratio against shadow pipelines that did and did not use the scan)",
    "lira_offline": "LiRA offline (compared with shadow pipelines that did not use the scan)",
    "dcr": "distance to closest record (is a synthetic image, of any round's release, a near-copy of the scan?)",
    "canary": "canary test (planted scans, each used with probability 1/2)",
}
TARGET_WORDS = {"global_model": "the global model", "synthetic": "the shared synthetic images"}


def row_json(r: AttackRow) -> dict:
    return {
        "site": r.site, "attack": r.attack, "target": r.target,
        "auc": r.metrics.auc, "tpr_at_fpr_0.001": r.metrics.tpr_at_fpr_0_001,
        "tpr_at_fpr_0.01": r.metrics.tpr_at_fpr_0_01, "balanced_accuracy": r.metrics.balanced_accuracy,
        "epsilon_lower_bound": json_safe(r.bound.value), "epsilon_lower_bound_method": r.bound.method,
        "max_certifiable_epsilon": json_safe(r.bound.max_certifiable),
        "confidence": r.bound.confidence, "epsilon_accounted": json_safe(r.epsilon_accounted),
        "epsilon_lower_bound_rigorous": r.bound.method == "one_run",
        "top_rank_members": r.metrics.top_rank_members, "top_rank_p_value": r.metrics.top_rank_p_value,
        "auc_p_value": r.metrics.auc_p_value, "n_members": r.metrics.n_members, "n_nonmembers": r.metrics.n_nonmembers,
        "n_member_scans": r.metrics.n_member_scans, "n_nonmember_scans": r.metrics.n_nonmember_scans,
        "details": _clean(r.details),
    }


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return json_safe(obj) if not math.isnan(obj) else None
    if hasattr(obj, "item"):
        return _clean(obj.item())
    return obj


def site_verdict(site: str, rows: list[AttackRow], *, dp: bool, eps_accounted: float, budget: float | None,
                 confidence: float, unit: str | None = None) -> dict:
    """Plain-words finding for one site (or the consortium): level is ok | leak | violation.

    violation: a *rigorous* bound (the one-run canary audit, Steinke et al. 2023) exceeds the epsilon accounted for
    the run it audited. The member/holdout bounds of one run are heuristic (records are not independent trials, a
    patient may have several scans): above the accounted epsilon they call for the canary audit, not an alarm.
    power: each bound comes with the largest value it could have shown (`max_certifiable`). When no row could
    certify more than the accounted epsilon (always, without DP) the audit could not have detected a breach of the
    budget, and the text says what it could and could not have detected instead of reading as reassurance.
    leak: an AUC of at least AUC_LEAK that chance would not give (one-sided Mann-Whitney test over patients, the
    split's unit; the attacks' direction is fixed in advance: higher score = member), a top-rank test (both
    significant after a Bonferroni split over the rows), or any bound above 0. With a dozen patients a side an AUC
    of 0.65 is within chance. A clearly reversed
    attack (AUC <= 1 - AUC_LEAK) is named in the text: with the right member list it points to a broken score or
    mislabelled members rather than to leakage.
    """
    strongest = max(rows, key=lambda r: r.metrics.auc)
    reversed_rows = [r for r in rows if r.metrics.auc <= 1 - AUC_LEAK]
    best_lb = max(rows, key=lambda r: r.bound.value)
    tpr = max(r.metrics.tpr_at_fpr_0_01 for r in rows)
    alpha = (1 - confidence) / len(rows)
    top = min(rows, key=lambda r: r.metrics.top_rank_p_value)
    top_hit = top.metrics.top_rank_p_value < alpha
    violating = [r for r in rows if dp and r.bound.method == "one_run" and r.bound.value > r.epsilon_accounted + TOL]
    heuristic_over = [r for r in rows if dp and r.bound.method != "one_run"
                      and r.bound.value > r.epsilon_accounted + TOL]
    high = [r for r in rows if r.metrics.auc >= AUC_LEAK]
    auc_hit = any(r.metrics.auc_p_value < alpha for r in high)
    leak = auc_hit or top_hit or best_lb.bound.value > 0
    level = "violation" if violating else "leak" if leak else "ok"
    power = max(rows, key=lambda r: r.bound.max_certifiable)
    underpowered = not dp or power.bound.max_certifiable <= eps_accounted + TOL
    who = "The consortium as a whole" if site == CONSORTIUM else site
    per = f" per {unit}" if unit else ""  # what epsilon protects: each scan, or each patient (privacy.unit)
    budget_words = ("NON-PRIVATE run, no differential privacy (epsilon = ∞)" if not dp else
                    f"privacy budget epsilon = {budget:g}{per}, spent {eps_accounted:.3g}" if budget is not None and
                    math.isfinite(budget) else f"accounted epsilon {eps_accounted:.3g}{per}")
    name = ATTACK_WORDS[strongest.attack].split(" (")[0]
    text = (f"{who} — {budget_words}: the strongest attack, {name} on {TARGET_WORDS[strongest.target]}, told used "
            f"from unused scans with {100 * strongest.metrics.balanced_accuracy:.0f} % balanced accuracy (50 % = a "
            f"coin toss; AUC {strongest.metrics.auc:.2f}). Allowed to wrongly accuse 1 in 100 unused scans, an "
            f"attacker would correctly pick out {100 * tpr:.0f} % of the used ones. ")
    if high and not auc_hit:
        n = min(strongest.metrics.n_members, strongest.metrics.n_nonmembers)
        text += (f"With {n} patients on the smaller side, an AUC of {strongest.metrics.auc:.2f} is within chance "
                 f"(p = {strongest.metrics.auc_p_value:.2g} that guessing does as well; significant would be below "
                 f"{alpha:.2g}). ")
    for r in reversed_rows:
        text += (f"The {ATTACK_WORDS[r.attack].split(' (')[0]} on {TARGET_WORDS[r.target]} points the wrong way (AUC "
                 f"{r.metrics.auc:.2f}: used scans look LESS used than unused ones). Chance does that at times with "
                 "few scans; if it persists, check that the audited split is the released one and the score. ")
    if top_hit:
        text += (f"{top.metrics.top_rank_members} used scans scored above every unused one under the "
                 f"{ATTACK_WORDS[top.attack].split(' (')[0]} (chance of that without leakage: "
                 f"{top.metrics.top_rank_p_value:.2g}): a few scans are exposed even if the average looks safe. ")
    lb = best_lb.bound
    if lb.value > 0:
        kind = "rigorous one-run canary bound" if lb.method == "one_run" else "heuristic member/holdout bound"
        text += (f"With {100 * lb.confidence:.0f} % confidence the data show epsilon is at least {lb.value:.2f} "
                 f"({ATTACK_WORDS[best_lb.attack].split(' (')[0]}, {kind}). ")
    else:
        text += f"No attack proved any leakage at {100 * lb.confidence:.0f} % confidence (empirical epsilon bound 0). "
    if violating:
        v = max(violating, key=lambda r: r.bound.value - r.epsilon_accounted)
        text += (f"WARNING: the canary test's rigorous bound {v.bound.value:.3g} is MORE than the epsilon "
                 f"{v.epsilon_accounted:.3g} accounted for the run it audited: the privacy guarantee does not hold as "
                 "claimed. Stop sharing synthetic sets from this site and report it to the consortium.")
    elif heuristic_over:
        h = max(heuristic_over, key=lambda r: r.bound.value - r.epsilon_accounted)
        text += (f"The heuristic bound of the {ATTACK_WORDS[h.attack].split(' (')[0]} ({h.bound.value:.3g}) is above "
                 f"the accounted epsilon {h.epsilon_accounted:.3g}. That bound treats the scans of one run as "
                 "independent trials, which they are not (a patient can have several scans), so it is not proof of a "
                 "bug: run the canary audit (`--attacks canary`), whose bound is rigorous, before sharing again.")
    elif dp and not underpowered:
        text += f"This is consistent with the accounted epsilon {eps_accounted:.3g}."
    elif not dp:
        text += ("Without differential privacy nothing limits this leakage: such a run is a baseline or positive "
                 "control only and must never be shared. " if leak else
                 "Without differential privacy there is no guarantee, even if these attacks found little. ")
    text = f"{text.rstrip()} {_power_words(rows, dp=dp, eps_accounted=eps_accounted)}"  # one space between sentences
    return {"site": site, "level": level, "text": text.rstrip(), "max_auc": strongest.metrics.auc,
            "max_tpr_at_fpr_0.01": tpr, "max_epsilon_lower_bound": json_safe(lb.value),
            "epsilon_lower_bound_rigorous": lb.method == "one_run", "min_top_rank_p_value": top.metrics.top_rank_p_value,
            "auc_significant": auc_hit,
            "heuristic_bound_above_accounted": bool(heuristic_over),
            "max_certifiable_epsilon": json_safe(power.bound.max_certifiable),
            "max_certifiable_epsilon_rigorous": json_safe(max((r.bound.max_certifiable for r in rows
                                                          if r.bound.method == "one_run"), default=0.0)),
            "underpowered": underpowered,
            "epsilon_accounted": json_safe(eps_accounted), "dp": dp}


def _power_words(rows: list[AttackRow], *, dp: bool, eps_accounted: float) -> str:
    """What the audit could and could not have detected: its power (the bound a perfect attack would show) next to
    the accounted epsilon."""
    best = max(rows, key=lambda r: r.bound.max_certifiable)
    x = best.bound.max_certifiable
    rig = [r for r in rows if r.bound.method == "one_run"]
    rig_x = max((r.bound.max_certifiable for r in rig), default=None)
    what = (f"at most epsilon {x:.2f} (the {ATTACK_WORDS[best.attack].split(' (')[0]}, with a perfect attack on its "
            f"{best.metrics.n_members} + {best.metrics.n_nonmembers} trials"
            + (f"; the rigorous canary test at most {rig_x:.2f}" if rig and rig_x < x else "") + ")")
    if not dp:
        return (f"This audit could certify {what}. The run has no budget (epsilon = ∞): leakage beyond epsilon "
                f"{x:.2f} could not show up in these bounds at all, so a low bound does not mean little leaks.")
    if x <= eps_accounted + TOL:
        return (f"This audit could certify {what}; the accounted epsilon is {eps_accounted:.3g}. It could not have "
                "detected a breach of the budget: it neither confirms nor rules out that the budget holds, and a "
                f"bound of 0 is no reassurance. Plant more canaries (`canaries: auto`, a larger audit holdout) or "
                "audit with more patients.")
    if rig and rig_x <= eps_accounted + TOL:
        return (f"This audit could certify {what}: only the heuristic rows could exceed the accounted epsilon "
                f"{eps_accounted:.3g}; the rigorous canary test could not have detected a breach of the budget.")
    return f"This audit could certify {what}, above the accounted epsilon: a breach of the budget was detectable."


def verdict(outcome: AuditOutcome) -> dict:
    findings = []
    conf = outcome.spec.confidence
    for sid, s in outcome.sites.items():
        rows = [r for r in outcome.rows if r.site == sid]
        if rows:
            findings.append(site_verdict(sid, rows, dp=s.dp, eps_accounted=s.epsilon_spent, budget=s.epsilon_budget,
                                         confidence=conf, unit=s.privacy_unit))
    cons = [r for r in outcome.rows if r.site == CONSORTIUM]
    if cons:
        dp = all(s.dp for s in outcome.sites.values())
        findings.append(site_verdict(CONSORTIUM, cons, dp=dp, eps_accounted=cons[0].epsilon_accounted, budget=None,
                                     confidence=conf))
    if not findings:
        raise AuditError("audit spec", "no attack produced a result, so nothing was tested",
                         "pick attacks that run on the chosen targets (loss needs global_model, dcr needs synthetic)")
    levels = {f["level"] for f in findings}
    level = "violation" if "violation" in levels else "leak" if "leak" in levels else "ok"
    any_nondp = any(not s.dp for s in outcome.sites.values())
    weak = [f for f in findings if f["underpowered"]]
    underpowered = bool(weak)
    weakest = min((json_number(f["max_certifiable_epsilon"]) for f in weak or findings), default=0.0)
    headline = {
        "violation": "PRIVACY GUARANTEE VIOLATED: a rigorous audit measured more leakage than the privacy budget "
                     "allows.",
        "leak": ("Leakage detected in a NON-PRIVATE run: the attacks can tell which patients' scans were used."
                 if any_nondp else
                 "Some leakage was measured, and a heuristic bound exceeds the accounted epsilon: run the rigorous "
                 "canary audit before sharing again." if any(f["heuristic_bound_above_accounted"] for f in findings)
                 else "Some leakage was measured, but it stays within what the privacy budget allows."),
        "ok": ("No leakage proved by these attacks, but the run is NON-PRIVATE: nothing guarantees it, this audit "
               f"could certify at most epsilon {weakest:.2f} and so cannot rule leakage out; it must never be shared."
               if any_nondp else
               f"No leakage proved, but this audit could not have detected a breach of the privacy budget: it could "
               f"certify at most epsilon {weakest:.2f}, not above the accounted epsilon. Not a reassurance: plant more "
               "canaries or audit more patients." if underpowered else
               "No measurable leakage: the attacks could not tell used from unused scans better than chance, "
               "consistent with the privacy budget, which this audit had the power to test."),
    }[level]
    n_m = sum(s.n_members for s in outcome.sites.values())
    n_n = sum(s.n_nonmembers for s in outcome.sites.values())
    attacks = sorted({r.attack for r in outcome.rows}, key=list(ATTACK_WORDS).index)
    tested = (f"What was tested: whether someone holding the shared synthetic images or the global model of run "
              f"'{outcome.run['name']}' could tell which patients' scans were used. {n_m} scans used for training "
              f"and {n_n} scans kept aside at the sites (never used) were scored by: "
              + "; ".join(ATTACK_WORDS[a] for a in attacks) + ".")
    return {"level": level, "headline": headline, "tested": tested, "findings": findings,
            "underpowered": underpowered, "max_certifiable_epsilon": json_safe(weakest)}

def report_json(outcome: AuditOutcome) -> dict:
    return _clean({
        "format_version": FORMAT_VERSION, "kind": "medfdd-audit-report", "medfdd_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": outcome.run, "classes": outcome.classes,
        "spec": outcome.spec.model_dump(mode="json"),
        "verdict": verdict(outcome),
        "sites": {sid: {"dp": s.dp, "epsilon_budget": s.epsilon_budget, "epsilon_spent": s.epsilon_spent,
                        "delta": s.delta, "accountant": s.accountant, "privacy_unit": s.privacy_unit,
                        "ledger": s.ledger,
                        "n_members": s.n_members, "n_nonmembers": s.n_nonmembers}
                  for sid, s in outcome.sites.items()},
        "utility": _utility(outcome.utility),
        "utility_per_round": outcome.round_metrics,
        "results": [row_json(r) for r in outcome.rows],
        "notes": outcome.notes,
        # what epsilon covers, and the data-dependent channels outside it (privacy.report.channels)
        "outside_epsilon": outside_epsilon([s.privacy_unit for s in outcome.sites.values()]),
    })


def _utility(final: dict | None) -> dict | None:
    if not final:
        return None
    keep = ("accuracy", "balanced_accuracy", "auc", "n", "round", "n_merged", "bytes_up_total", "bytes_down_total")
    return {k: final[k] for k in keep if k in final}


def write_report(outcome: AuditOutcome, out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and the self-contained report.html into `out_dir` (atomically)."""
    from privacy.report.html import render_html

    out_dir = Path(out_dir)
    data = report_json(outcome)
    js = atomic_write_json(out_dir / "report.json", data)
    html = atomic_write_text(out_dir / "report.html", render_html(outcome, data))
    return js, html
