"""Attack building blocks on arrays with a known answer, and LiRA/canary end to end on a small digits site."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from medfdd.errors import ConfigError
from privacy.audit.attacks import balanced_halves, lira_scores
from privacy.audit.metrics import auc
from privacy.audit.scores import closest_distances, logit_confidence, loss_scores
from privacy.audit.spec import AuditSpec, load_audit_spec


def test_balanced_halves_every_record_in_half_the_shadows():
    mask = balanced_halves(101, 8, seed=0)
    assert mask.shape == (8, 101)
    assert (mask.sum(0) == 4).all()
    assert abs(mask.sum(1).mean() - 50.5) < 1e-9


def test_logit_confidence_and_loss_match_softmax():
    z = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = np.array([0, 2])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    py = p[np.arange(2), y]
    assert np.allclose(logit_confidence(z, y), np.log(py / (1 - py)))
    assert np.allclose(loss_scores(z, y), np.log(py))


def test_closest_distances_by_hand():
    rec = np.array([[[0.0, 0.0]], [[3.0, 4.0]]])
    syn = np.array([[[0.0, 1.0]], [[3.0, 0.0]]])
    assert np.allclose(closest_distances(rec, syn), [1.0, 4.0])


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("fixed", [True, False])
def test_lira_separates_a_known_shift(online, fixed):
    # statistic = record difficulty + 1.5 if the record was trained on; members of the target are the first half
    rng = np.random.default_rng(0)
    n, k = 400, 16
    difficulty = rng.normal(0, 2, n)  # large per-record spread: a global threshold does poorly, LiRA does not
    in_mask = balanced_halves(n, k, seed=1)
    shadow = difficulty + 1.5 * in_mask + rng.normal(0, 0.5, (k, n))
    member = np.arange(n) < n // 2
    target = difficulty + 1.5 * member + rng.normal(0, 0.5, n)
    lira_auc = auc(lira_scores(target, shadow, in_mask, online=online, fixed_variance=fixed), member)
    assert lira_auc > 0.9
    assert auc(target, member) < lira_auc - 0.15  # calibration per record is what LiRA adds
    null = auc(lira_scores(difficulty + rng.normal(0, 0.5, n), shadow, in_mask, online=online,
                           fixed_variance=fixed), member)
    assert abs(null - 0.5) < 0.1


def test_audit_spec_is_strict(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({"attacks": ["loss", "dcr"], "shadows": 4}))
    spec = load_audit_spec(p)
    assert spec.attacks == ["loss", "dcr"] and spec.shadows == 4 and spec.lira == []
    p.write_text(yaml.safe_dump({"attacks": ["loss"], "shadow": 4}))
    with pytest.raises(ConfigError, match="shadow"):
        load_audit_spec(p)
    p.write_text(yaml.safe_dump({"attacks": ["membership"]}))
    with pytest.raises(ConfigError, match="attacks"):
        load_audit_spec(p)
    assert AuditSpec().attacks == ["loss", "lira_online", "lira_offline", "dcr", "canary"]
