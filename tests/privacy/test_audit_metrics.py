"""Audit metrics against hand-computed cases: ROC points, TPR at FPR, Clopper-Pearson, the two epsilon bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privacy.audit.metrics import (
    AuditInputError,
    attack_metrics,
    auc,
    balanced_accuracy,
    clopper_pearson,
    clopper_pearson_epsilon,
    clopper_pearson_lower_bound,
    epsilon_from_error_rates,
    one_run_epsilon,
    one_run_lower_bound,
    one_run_p_value,
    roc,
    top_rank_test,
    tpr_at_fpr,
)


def test_roc_points_auc_tpr_and_balanced_accuracy_by_hand():
    # members score 0.35, 0.8; non-members 0.1, 0.4. Thresholds 0.8 -> (0, 1/2); 0.4 -> (1/2, 1/2);
    # 0.35 -> (1/2, 1); 0.1 -> (1, 1). Pairs ranked correctly: (0.8>0.1, 0.8>0.4, 0.35>0.1) = 3 of 4.
    scores, member = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    fpr, tpr, _ = roc(scores, member)
    assert list(zip(fpr, tpr, strict=True)) == [(0, 0), (0, 0.5), (0.5, 0.5), (0.5, 1), (1, 1)]
    assert auc(scores, member) == 0.75
    assert tpr_at_fpr(fpr, tpr, 0.001) == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.5) == 1.0
    assert tpr_at_fpr(np.array([0.2, 1.0]), np.array([0.9, 1.0]), 0.01) == 0.0  # no point at so low a FPR
    assert balanced_accuracy(fpr, tpr) == 0.75  # threshold 0.35 or 0.8: (1 + 0.5) / 2
    m = attack_metrics(scores, member)
    assert (m.n_members, m.n_nonmembers, m.auc) == (2, 2, 0.75)


def test_perfect_and_inverted_attacks():
    member = np.r_[np.ones(50), np.zeros(50)]
    perfect = attack_metrics(np.r_[np.arange(50) + 100.0, np.arange(50)], member)
    assert perfect.auc == 1.0 and perfect.tpr_at_fpr_0_001 == 1.0 and perfect.balanced_accuracy == 1.0
    inverted = attack_metrics(np.r_[np.arange(50), np.arange(50) + 100.0], member)
    assert inverted.auc == 0.0 and inverted.tpr_at_fpr_0_01 == 0.0


def test_clopper_pearson_known_counts():
    # k = 0 and k = n have closed forms: upper = 1 - (alpha/2)^(1/n), lower = (alpha/2)^(1/n)
    lo, hi = clopper_pearson(0, 10, alpha=0.05)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** 0.1, abs=1e-12)
    lo, hi = clopper_pearson(10, 10, alpha=0.05)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** 0.1, abs=1e-12)
    # 5 of 10: the textbook interval (0.1871, 0.8129); symmetric
    lo, hi = clopper_pearson(5, 10, alpha=0.05)
    assert (round(lo, 4), round(hi, 4)) == (0.1871, 0.8129)
    # defining property: P[Bin(n, hi) <= k] = alpha / 2
    from scipy.stats import binom

    assert binom.cdf(3, 20, clopper_pearson(3, 20)[1]) == pytest.approx(0.025, abs=1e-9)
    with pytest.raises(AuditInputError):
        clopper_pearson(11, 10)


def test_epsilon_from_error_rates_and_counts():
    # FPR 0.05, FNR 0.5, delta 0: log((1 - 0.05) / 0.5) vs log((1 - 0.5) / 0.05) = log 10
    assert epsilon_from_error_rates(0.05, 0.5, delta=0.0) == pytest.approx(math.log(10))
    assert epsilon_from_error_rates(0.5, 0.5, delta=0.0) == 0.0  # a coin flip shows nothing
    # counts: 0 false positives of 100 non-members, 50 misses of 100 members, 95 %
    fpr_hi = 1 - 0.025 ** (1 / 100)
    fnr_hi = clopper_pearson(50, 100)[1]
    expected = math.log((1 - 1e-5 - fnr_hi) / fpr_hi)
    assert clopper_pearson_epsilon(0, 100, 50, 100, delta=1e-5) == pytest.approx(expected)


def test_clopper_pearson_bound_separable_vs_random():
    member = np.r_[np.ones(200), np.zeros(200)].astype(bool)
    sep = clopper_pearson_lower_bound(np.r_[np.full(200, 5.0), np.zeros(200)] + np.arange(400) * 1e-3, member,
                                      delta=1e-5)
    # evaluation half: 100 members, 100 non-members, no error: both rates bounded by h = 1 - 0.025^(1/100)
    h = 1 - 0.025 ** 0.01
    assert sep.value == pytest.approx(math.log((1 - 1e-5 - h) / h), rel=1e-9)
    rnd = clopper_pearson_lower_bound(np.random.default_rng(0).normal(size=400), member, delta=1e-5)
    assert rnd.value < 0.5


def test_one_run_p_value_by_hand():
    # m = 2, r = 2, v = 2, eps = 0: q = 1/2; P[Bin >= 2] = 1/4; windows: i=1 P[Bin=1]/1 = 1/2, i=2 (1/2+1/4)/2
    assert one_run_p_value(2, 2, 2, epsilon=0.0, delta=0.0) == pytest.approx(0.25)
    assert one_run_p_value(2, 2, 2, epsilon=0.0, delta=0.01) == pytest.approx(0.25 + 2 * 2 * 0.01 * 0.5)
    # monotone in epsilon
    ps = [one_run_p_value(100, 40, 35, epsilon=e, delta=1e-5) for e in (0, 0.5, 1, 2, 4)]
    assert ps == sorted(ps)


def test_one_run_epsilon_worked_example():
    # delta = 0, all r = 100 guesses right: P[Bin(100, q) >= 100] = q^100 = 0.05 -> q = 0.05^(1/100),
    # eps = log(q / (1 - q)) = 3.4937...
    q = 0.05 ** 0.01
    assert one_run_epsilon(1000, 100, 100, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    # half right is no evidence at all
    assert one_run_epsilon(1000, 100, 50, delta=1e-5) == 0.0
    # delta only weakens the bound
    assert one_run_epsilon(1000, 100, 90, delta=1e-4) < one_run_epsilon(1000, 100, 90, delta=0.0)


def test_one_run_lower_bound_perfect_vs_random_canaries():
    rng = np.random.default_rng(1)
    included = rng.random(400) < 0.5
    perfect = one_run_lower_bound(included.astype(float) + rng.random(400) * 0.1, included, delta=1e-5)
    assert perfect.value > 2 and perfect.details["v"] == perfect.details["r"]
    random = one_run_lower_bound(rng.random(400), included, delta=1e-5)
    assert random.value < 0.5


def test_top_rank_test_by_hand():
    # members 3, 2 above the only non-member... scores: members 5, 4, 0.5; non-members 1, 0. Two members outrank
    # every non-member; in a random order of 3 members and 2 non-members the first two are both members with
    # probability (3/5)(2/4) = 3/10.
    x, p = top_rank_test([5, 4, 0.5, 1, 0], [1, 1, 1, 0, 0])
    assert (x, p) == (2, pytest.approx(0.3, abs=1e-12))
    # a tie with the best non-member does not count for the attack
    assert top_rank_test([1, 4, 1, 0], [1, 1, 0, 0])[0] == 1
    assert top_rank_test([0, 1], [1, 0]) == (0, 1.0)


def test_auc_p_value_on_hand_computed_cases():
    """One-sided Mann-Whitney: with perfect separation of m members over h non-members (no ties) the exact chance
    under exchangeable scores is 1 / C(m + h, m); one inversion among 3 + 3 gives U = 8: 2 / 20."""
    from privacy.audit.metrics import auc_p_value

    assert auc_p_value([3, 2, 1, 0], [1, 1, 0, 0]) == pytest.approx(1 / 6, abs=1e-12)
    assert auc_p_value([5, 4, 3, 2, 1, 0], [1, 1, 1, 0, 0, 0]) == pytest.approx(1 / 20, abs=1e-12)
    # orders with U >= 8 of 9: the perfect one and the three with one adjacent inversion... only one adjacent
    # pair crosses the boundary (3rd member vs 1st non-member): U = 8 has 1 order, U = 9 has 1 -> 2 / 20
    assert auc_p_value([5, 4, 2, 3, 1, 0], [1, 1, 1, 0, 0, 0]) == pytest.approx(2 / 20, abs=1e-12)
    assert auc_p_value([0, 1, 2, 3], [1, 1, 0, 0]) == pytest.approx(1.0, abs=1e-12)  # fully reversed: no evidence
    assert attack_metrics([3, 2, 1, 0], [1, 1, 0, 0]).auc_p_value == pytest.approx(1 / 6, abs=1e-12)
    # two scans per patient, one coin per patient: the test runs over the 2 + 2 patients' mean scores (3, 2 | 1, 0:
    # perfect separation, 1/6), not over 8 scans as if they were 8 independent trials (which claims more)
    scores, member = [4, 2, 3, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]
    patients = ["A", "A", "B", "B", "C", "C", "D", "D"]
    assert auc_p_value(scores, member, patients) == pytest.approx(1 / 6, abs=1e-12)
    assert auc_p_value(scores, member) < 1 / 6
    with pytest.raises(AuditInputError, match="members and non-members"):
        auc_p_value(scores, member, ["A", "A", "B", "C", "C", "C", "D", "D"])


def test_top_rank_test_catches_a_few_exposed_records_the_auc_misses():
    rng = np.random.default_rng(0)
    member = np.r_[np.ones(800), np.zeros(200)].astype(bool)
    scores = rng.normal(size=1000)
    scores[:40] += 100.0  # 5 % of the members exposed with certainty, the rest indistinguishable
    m = attack_metrics(scores, member)
    assert m.auc < 0.6 and m.top_rank_members >= 40  # below the verdict's AUC threshold and m.top_rank_p_value < 1e-3
    # under the null the p-value is not small: exchangeable scores, over many draws it is uniform-ish (>= 0.05 in
    # most of them)
    ps = [attack_metrics(rng.normal(size=1000), member).top_rank_p_value for _ in range(200)]
    assert np.mean(np.array(ps) < 0.05) <= 0.1


def test_clopper_pearson_rows_count_a_patient_once():
    """The split tosses one coin per patient: a patient with k scans is one trial (scored by the max over its
    scans). Copying every patient's scan k times must leave the bound and its trial counts unchanged; counted per
    scan, the copies would pass for independent trials and inflate the bound."""
    rng = np.random.default_rng(0)
    n = 60
    member = np.r_[np.ones(n), np.zeros(n)].astype(bool)
    scores = rng.normal(size=2 * n) + 2.5 * member
    patients = np.array([f"P{i}" for i in range(2 * n)], dtype=object)
    k = 3
    one = clopper_pearson_lower_bound(scores, member, delta=1e-5, groups=patients)
    many = clopper_pearson_lower_bound(np.repeat(scores, k), np.repeat(member, k), delta=1e-5,
                                       groups=np.repeat(patients, k))
    assert many.value == one.value > 0 and many.max_certifiable == one.max_certifiable
    assert (many.details["trials_members"], many.details["trials_nonmembers"], many.details["unit"]) == (n, n,
                                                                                                         "patient")
    per_scan = clopper_pearson_lower_bound(np.repeat(scores, k), np.repeat(member, k), delta=1e-5)
    assert per_scan.details["trials_members"] == k * n and per_scan.max_certifiable > one.max_certifiable
    m = attack_metrics(np.repeat(scores, k), np.repeat(member, k), np.repeat(patients, k))
    assert (m.n_members, m.n_nonmembers, m.n_member_scans, m.n_nonmember_scans) == (n, n, k * n, k * n)
    # a patient's score is the max over its scans: one exposed scan exposes the patient
    from privacy.audit.metrics import per_unit

    s, mem = per_unit([0.1, 9.0, 0.2, 0.3], [1, 1, 0, 0], ["A", "A", "B", "B"])
    assert list(s) == [9.0, 0.3] and list(mem) == [True, False]


def test_every_bound_reports_the_largest_value_it_could_have_shown():
    from privacy.audit.metrics import canaries_for, clopper_pearson_power, one_run_power

    # the one-run audit saturates with m (Steinke et al. 2023): 32 canaries certify at most ~1.10, 64 ~1.86
    assert one_run_power(32, delta=1e-5) == pytest.approx(1.10, abs=0.01)
    assert one_run_power(64, delta=1e-5) == pytest.approx(1.86, abs=0.01)
    assert one_run_power(256, delta=1e-5) > one_run_power(64, delta=1e-5)
    # power of one run: a perfect attack on the same draw of included canaries; a real attack shows no more
    rng = np.random.default_rng(2)
    included = rng.random(64) < 0.5
    noisy = one_run_lower_bound(rng.normal(size=64) + included, included, delta=1e-5)
    perfect = one_run_lower_bound(included.astype(float), included, delta=1e-5)
    assert noisy.max_certifiable == perfect.max_certifiable == perfect.value >= noisy.value
    assert perfect.max_certifiable == pytest.approx(one_run_power(64, delta=1e-5), abs=0.3)
    # Clopper-Pearson: the bound of a perfect test on the evaluated half's trials
    member = np.r_[np.ones(200), np.zeros(200)].astype(bool)
    sep = clopper_pearson_lower_bound(member + np.arange(400) * 1e-4, member, delta=1e-5)
    assert sep.value == pytest.approx(sep.max_certifiable) and sep.max_certifiable == pytest.approx(
        clopper_pearson_power(100, 100, delta=1e-5))
    assert clopper_pearson_power(5, 5, delta=1e-5) < 1 < clopper_pearson_power(100, 100, delta=1e-5)
    # sizing m for a site's epsilon: the fewest canaries whose power reaches 1.5 x epsilon, else all there are
    assert canaries_for(1.0, 1000, delta=1e-5) == 64
    assert canaries_for(0.5, 1000, delta=1e-5) == 32
    assert canaries_for(8.0, 300, delta=1e-5) == 300
    assert canaries_for(math.inf, 50, delta=1e-5) == 50
