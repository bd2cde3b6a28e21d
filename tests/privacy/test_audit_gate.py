"""The optional audit gate: a pure function of report.json and the site's thresholds; the config field is optional."""

from __future__ import annotations

import pytest
import yaml

from medfdd.config import AuditGate, load_site_config
from medfdd.errors import ConfigError
from privacy.audit.gate import check_gate


def _report(auc=0.52, tpr=0.01, lb=0.0, acc=1.0, site="hospital-a", **extra):
    return {"results": [{"site": site, "attack": "loss", "target": "global_model", "auc": auc, **extra,
                         "tpr_at_fpr_0.001": tpr, "tpr_at_fpr_0.01": tpr, "epsilon_lower_bound": lb,
                         "epsilon_accounted": acc, "n_members": 100, "n_nonmembers": 100}]}


def test_gate_passes_a_quiet_report_and_names_each_broken_threshold():
    assert check_gate(_report(), AuditGate()).passed
    res = check_gate(_report(auc=0.9, tpr=0.4, lb=2.0, acc=1.0), AuditGate(max_epsilon_lower_bound=0.5))
    assert not res.passed and res.checked == 1
    text = " ".join(res.failures)
    assert "AUC 0.900" in text and "tpr_at_fpr_0.01" in text and "exceeds the accounted epsilon" in text
    assert "above the allowed 0.5" in text
    # infinite accounted epsilon (--no-dp) never makes the bound check fail by itself
    assert check_gate(_report(lb=1.0, acc="inf"), {"max_auc": 0.95, "max_tpr_at_fpr_0_01": None}).passed


def test_gate_with_auc_significance_fails_only_a_significant_high_auc():
    gate = AuditGate(max_auc=0.6, auc_significance=0.05)
    assert not check_gate(_report(auc=0.7, auc_p_value=0.2), AuditGate(max_auc=0.6)).passed  # strict by default
    assert check_gate(_report(auc=0.7, auc_p_value=0.2), gate).passed  # a small site's chance AUC
    res = check_gate(_report(auc=0.7, auc_p_value=0.001), gate)
    assert not res.passed and "significant (p = 0.001 < 0.05)" in res.failures[0]
    assert check_gate(_report(auc=0.55, auc_p_value=1e-6), gate).passed  # significant but within max_auc
    res = check_gate(_report(auc=0.7), gate)  # a report without p-values cannot show chance: fails closed
    assert not res.passed and "no auc_p_value" in res.failures[0]
    res = check_gate(_report(auc=0.7, tpr=0.4, auc_p_value=0.5), gate)  # significance spares the AUC only
    assert not res.passed and len(res.failures) == 1 and "tpr_at_fpr_0.01" in res.failures[0]
    with pytest.raises(ValueError):
        AuditGate(auc_significance=1.0)


def test_gate_fails_closed_without_matching_rows():
    res = check_gate(_report(site="hospital-b"), AuditGate(), site_id="hospital-a")
    assert not res.passed and "no audit result" in res.failures[0]
    assert not check_gate({"results": []}, AuditGate()).passed


def test_site_config_audit_gate_is_optional_and_strict(site_builder):
    b = site_builder()
    b.add_dicom("a.dcm", "a")
    path = b.write()
    assert load_site_config(path).audit_gate is None
    cfg = yaml.safe_load(path.read_text())
    cfg["audit_gate"] = {"max_auc": 0.55, "max_tpr_at_fpr_0_001": 0.01}
    path.write_text(yaml.safe_dump(cfg))
    gate = load_site_config(path).audit_gate
    assert gate.max_auc == 0.55 and gate.max_tpr_at_fpr_0_01 == 0.05
    cfg["audit_gate"] = {"max_aucc": 0.55}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="max_aucc"):
        load_site_config(path)
