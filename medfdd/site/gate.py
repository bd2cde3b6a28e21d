"""The site's optional audit gate on the offer path (`audit_gate` in the site config).

Before an offer leaves, the site scores its own training records (members) and audit holdout (non-members) by their
distance to the closest synthetic image (DCR) and checks AUC (with its per-patient p-value when the gate asks for
significance), TPR at low FPR and a Clopper-Pearson epsilon lower bound (Jagielski et al. 2020) against its
thresholds with `privacy.audit.gate.check_gate`. A failing set is not offered.
The pass/fail decision is itself computed from real records without DP: it reveals at most one bit per round (whether
the site offered), which the site accepts by enabling the gate; a failing gate reaches the coordinator as the same
`site-failed` code as any other failure (`medfdd.federation.failures`; listed in `privacy.report.channels`).
The gate's report stays at the site.
"""

from __future__ import annotations

import math

import numpy as np
from rich.console import Console

from medfdd.artifacts import SyntheticSet
from medfdd.config import SiteConfig
from medfdd.data.records import RecordView
from medfdd.data.site_data import load_site_data
from medfdd.data.split import split_units
from medfdd.errors import MedfddError
from medfdd.io import atomic_write_json, json_safe


class AuditGateFailed(MedfddError):
    """The site's own audit of its synthetic set broke a threshold of its `audit_gate`: nothing is offered."""


def gate_synthetic_set(cfg: SiteConfig, syn: SyntheticSet, *, console: Console | None = None) -> dict:
    """Audit `syn` against the site's records, write output/audit_gate.json, raise AuditGateFailed if it fails."""
    from privacy.audit.attacks import dcr_attack
    from privacy.audit.gate import check_gate
    from privacy.audit.metrics import attack_metrics, clopper_pearson_lower_bound

    data = load_site_data(cfg)
    records = RecordView(data.images, np.r_[data.train, data.holdout])  # read a chunk at a time
    member = np.concatenate([np.ones(len(data.train), bool), np.zeros(len(data.holdout), bool)])
    if member.all():
        raise AuditGateFailed(f"{cfg.site_id}: audit_gate", "the site has no audit holdout to compare against",
                              "set data.holdout_fraction above 0 or remove audit_gate")
    scores = dcr_attack(syn.images, records)
    m = attack_metrics(scores, member, split_units(data.patient_ids, np.concatenate([data.train, data.holdout])))
    bound = clopper_pearson_lower_bound(scores, member, delta=cfg.privacy.delta, seed=cfg.seed)
    eps = syn.meta.get("epsilon", math.inf)
    row = {"site": cfg.site_id, "attack": "dcr", "target": "synthetic", "auc": m.auc, "auc_p_value": m.auc_p_value,
           "tpr_at_fpr_0.001": m.tpr_at_fpr_0_001, "tpr_at_fpr_0.01": m.tpr_at_fpr_0_01,
           "balanced_accuracy": m.balanced_accuracy, "epsilon_lower_bound": bound.value,
           "epsilon_accounted": json_safe(eps), "n_members": m.n_members,
           "n_nonmembers": m.n_nonmembers}
    result = check_gate({"results": [row]}, cfg.audit_gate, site_id=cfg.site_id)
    report = {"round": syn.meta.get("round"), "results": [row], "passed": result.passed, "failures": result.failures}
    atomic_write_json(cfg.output_dir / "audit_gate.json", report)
    if console:
        console.print(f"audit gate ({cfg.site_id}): DCR AUC {m.auc:.3f} (p {m.auc_p_value:.2g}), "
                      f"TPR@1%FPR {m.tpr_at_fpr_0_01:.3f}, epsilon lower bound {bound.value:.3g} -> {'[green]pass' if result.passed else '[red]FAIL'}")
    if not result.passed:
        raise AuditGateFailed(f"{cfg.site_id}: audit_gate", "; ".join(result.failures),
                              "do not share this set: distill again with a smaller epsilon or review the data; "
                              f"details in {cfg.output_dir / 'audit_gate.json'}")
    return report
