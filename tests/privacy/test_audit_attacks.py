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
    # an attack whose target is not audited would silently not run: refused, naming it
    p.write_text(yaml.safe_dump({"attacks": ["loss", "dcr"], "targets": ["synthetic"]}))
    with pytest.raises(ConfigError, match="loss needs target global_model"):
        load_audit_spec(p)


def test_canaries_all_on_one_side_give_no_bound_instead_of_crashing():
    """Each canary is used with probability 1/2; with few canaries all can land on one side (seed 3 puts both of
    two out). The one-run audit then has nothing to compare: no bound, no exception after the pipeline ran."""
    from medfdd.config import DistillConfig
    from medfdd.training import TrainSettings
    from privacy.audit.canary import canary_audit
    from privacy.audit.pipeline import PipelineSettings

    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 8, 8)).astype(np.float32)
    y = np.arange(20) % 2
    settings = PipelineSettings(DistillConfig(ipc=1, iterations=2, batch_size=8, width=8, sample_rate=0.25),
                                TrainSettings(epochs=1, width=8), 2, 1.0, 1e-5)
    out = canary_audit(x[:16], y[:16], x[16:18], y[16:18], settings, target="synthetic", kind="holdout", seed=3,
                       delta=1e-5, confidence=0.95)
    assert not out.included.any() and out.one_run is None and out.clopper_pearson is None
    # the shadow/canary pipeline replays the site's own fixed sample rate (not batch / n)
    from privacy.audit.pipeline import privacy_plan
    assert privacy_plan(settings, 16).sample_rate == 0.25
