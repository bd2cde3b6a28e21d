"""The optional audit gate: a site may require its audit report to pass thresholds (`audit_gate` in its config)
before its synthetic set is offered. A pure function of the report and the thresholds; no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medfdd.config import AuditGate
from medfdd.io import json_number


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: list[str] = field(default_factory=list)  # one plain sentence per threshold broken
    checked: int = 0  # attack rows looked at


def _auc_failure(tag: str, row: Mapping[str, Any], gate: AuditGate) -> list[str]:
    """An AUC above `max_auc` fails, unless `auc_significance` is set and its p-value shows it within chance."""
    text = f"{tag}: AUC {row['auc']:.3f} is above the allowed {gate.max_auc:g}"
    if gate.auc_significance is None:
        return [text]
    p = row.get("auc_p_value")
    if p is None:  # fails closed: a report from before p-values cannot show the AUC is chance
        return [f"{text} and the report has no auc_p_value to test it against auc_significance: rerun `medfdd audit`"]
    if p < gate.auc_significance:
        return [f"{text} and significant (p = {p:.2g} < {gate.auc_significance:g})"]
    return []


def check_gate(report_json: Mapping[str, Any], thresholds: AuditGate | Mapping[str, Any], *,
               site_id: str | None = None) -> GateResult:
    """Check every attack row of `report_json` (only `site_id`'s rows when given) against `thresholds`.

    Fails closed: a report with no matching row does not pass (nothing was shown to be safe). With
    `auc_significance` an AUC above `max_auc` fails only when its per-patient p-value (one-sided Mann-Whitney,
    `privacy.audit.metrics.auc_p_value`) is below that level; the other thresholds are unchanged.
    """
    gate = thresholds if isinstance(thresholds, AuditGate) else AuditGate.model_validate(dict(thresholds))
    rows = [r for r in report_json.get("results", [])
            if (site_id is None or r.get("site") == site_id) and (gate.attacks is None or r.get("attack") in gate.attacks)]
    if not rows:
        who = f"site {site_id!r}" if site_id else "the report"
        return GateResult(False, [f"no audit result for {who}: run `medfdd audit` with the attacks the gate names"], 0)
    failures = []
    for r in rows:
        tag = f"{r['site']} / {r['attack']} on {r['target']}"
        if r["auc"] > gate.max_auc:
            failures += _auc_failure(tag, r, gate)
        for key, limit in (("tpr_at_fpr_0.001", gate.max_tpr_at_fpr_0_001), ("tpr_at_fpr_0.01", gate.max_tpr_at_fpr_0_01)):
            if limit is not None and r[key] > limit:
                failures.append(f"{tag}: {key} {r[key]:.3f} is above the allowed {limit:g}")
        lb, acc = json_number(r["epsilon_lower_bound"]), json_number(r["epsilon_accounted"])
        if gate.max_epsilon_lower_bound is not None and lb > gate.max_epsilon_lower_bound:
            failures.append(f"{tag}: empirical epsilon bound {lb:.3g} is above the allowed "
                            f"{gate.max_epsilon_lower_bound:g}")
        if gate.bound_within_accounted and lb > acc:
            failures.append(f"{tag}: empirical epsilon bound {lb:.3g} exceeds the accounted epsilon {acc:.3g}")
    return GateResult(not failures, failures, len(rows))
