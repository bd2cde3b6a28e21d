"""Membership-inference metrics and empirical epsilon lower bounds.

Convention everywhere: a *higher* score means "more likely a member"; ``is_member`` is 1 for members (records the
pipeline trained on) and 0 for non-members (the audit holdout).

- ROC / AUC: scikit-learn's ``roc_curve`` (every threshold kept) and ``roc_auc_score``.
- TPR at a low FPR (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022): the largest
  true-positive rate among ROC points whose false-positive rate is at most the target.
- Balanced accuracy of the best threshold: max over thresholds of (TPR + TNR) / 2.
- Top-rank test (the zero-FPR end of the ROC): how many members score above every non-member, and the exact
  probability of that many or more if scores were exchangeable (no leakage): C(m, x) / C(m + h, x), a
  hypergeometric tail. It catches attacks that expose a few records with certainty while the AUC stays near 0.5.
- Clopper-Pearson epsilon lower bound (Jagielski, Ullman & Oprea, "Auditing Differentially Private Machine
  Learning: How Private is Private SGD?", NeurIPS 2020): an (epsilon, delta)-DP mechanism forces every test to obey
  FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta, so exact binomial upper bounds on FPR and FNR
  give a lower bound on epsilon. One trial per unit of the split's coin (the patient): a patient's score is the
  max over its scans.
- Power: every bound comes with the largest value it could have shown, the bound a perfect attack would give with
  the same trials (`max_certifiable`). A bound of 0 from an audit whose power is below the accounted epsilon says
  nothing about whether the budget holds.
- One-run bound (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023, Theorem 5.2
  and its Algorithm for the p-value, Appendix D): m canaries each included with probability 1/2, the auditor guesses
  r of them and gets v right; under (eps, delta)-DP,
  P[W >= v] <= P[Bin(r, q) >= v] + 2 m delta max_{i=1..v} P[v > Bin(r, q) >= v - i] / i,  q = e^eps / (1 + e^eps).

None of this is privacy *accounting* (that is Opacus's job, `privacy.accounting`); these are statistics on attack
outcomes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from medfdd.errors import MedfddError

DEFAULT_CONFIDENCE = 0.95


class AuditInputError(MedfddError, ValueError):
    """Scores or counts handed to an audit metric are unusable (empty, NaN, inconsistent lengths or counts)."""


def _check_scores(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    m = np.asarray(is_member).ravel()
    if len(s) != len(m):
        raise AuditInputError("privacy.audit.metrics", f"{len(s)} scores but {len(m)} membership labels",
                              "pass one membership label per score")
    if not np.all(np.isfinite(s)):
        raise AuditInputError("privacy.audit.metrics", f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite",
                              "clip or fix the attack's scores")
    if not np.isin(m, (0, 1, True, False)).all():
        raise AuditInputError("privacy.audit.metrics", "membership labels must be 0/1", "pass booleans or 0/1")
    m = m.astype(bool)
    if m.all() or not m.any():
        raise AuditInputError("privacy.audit.metrics", f"need members and non-members, got {int(m.sum())} members "
                              f"and {int((~m).sum())} non-members", "audit a site with a non-empty holdout")
    return s, m


def roc(scores, is_member) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), every threshold kept (scikit-learn ``roc_curve``, ``drop_intermediate=False``)."""
    s, m = _check_scores(scores, is_member)
    fpr, tpr, thr = roc_curve(m, s, drop_intermediate=False)
    return fpr, tpr, thr


def auc(scores, is_member) -> float:
    s, m = _check_scores(scores, is_member)
    return float(roc_auc_score(m, s))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR among ROC points with FPR <= target (0 if none): what an attacker who may wrongly accuse at most
    a fraction `target` of non-members catches."""
    ok = np.asarray(fpr) <= target + 1e-12
    return float(np.max(np.asarray(tpr)[ok])) if ok.any() else 0.0


def balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Best threshold's balanced accuracy: max (TPR + 1 - FPR) / 2 (0.5 = guessing)."""
    return float(np.max((np.asarray(tpr) + 1 - np.asarray(fpr)) / 2))


def top_rank_test(scores, is_member) -> tuple[int, float]:
    """(x, p): x members score strictly above every non-member; p = P[X >= x] when member and non-member scores
    are exchangeable (nothing leaks) = C(m, x) / C(m + h, x) (the first x of a random order all members;
    hypergeometric). Ties count against the attack, so p is conservative."""
    s, m = _check_scores(scores, is_member)
    x = int((s[m] > s[~m].max()).sum())
    n_m, total = int(m.sum()), len(s)
    return x, float(stats.hypergeom.pmf(x, total, n_m, x)) if x > 0 else 1.0


def auc_p_value(scores, is_member, groups=None) -> float:
    """P[AUC >= observed] when member and non-member scores are exchangeable (nothing leaks): the one-sided
    Mann-Whitney U test (Mann & Whitney 1947; AUC = U / (members x non-members)), exact for small samples without
    ties, normal approximation with tie correction otherwise.

    `groups` (e.g. patient ids): the units whose membership was decided together. The split tosses one coin per
    patient, so a patient's scans are one trial: their scores are averaged and the test runs over patients
    (otherwise a patient with several scans counts as several independent trials and p comes out too small)."""
    s, m = _check_scores(scores, is_member)
    if groups is not None:
        s, m = per_unit(s, m, groups, reduce="mean", where="privacy.audit.metrics.auc_p_value")
        if m.all() or not m.any():
            return 1.0
    return float(stats.mannwhitneyu(s[m], s[~m], alternative="greater").pvalue)


def per_unit(scores, is_member, groups, *, reduce: str = "max", where: str = "privacy.audit.metrics"
             ) -> tuple[np.ndarray, np.ndarray]:
    """(score, membership) per unit of `groups` (the patient, the split's coin): one trial per unit. `reduce`: max
    (a patient is exposed when any of its scans is) or mean. A unit with both members and non-members is refused."""
    s, m = _check_scores(scores, is_member)
    g = np.asarray(groups, dtype=object).ravel()
    if len(g) != len(s):
        raise AuditInputError(where, f"{len(s)} scores but {len(g)} group ids", "pass one group id per score")
    _, inverse = np.unique(g.astype(str), return_inverse=True)
    count = np.bincount(inverse)
    member_count = np.bincount(inverse, weights=m)
    if np.any((member_count > 0) & (member_count < count)):
        raise AuditInputError(where, "a group has members and non-members",
                              "group by the unit the split assigned (the patient)")
    if reduce == "mean":
        return np.bincount(inverse, weights=s) / count, member_count > 0
    out = np.full(len(count), -np.inf)
    np.maximum.at(out, inverse, s)
    return out, member_count > 0


# ------------------------------------------------------------------------------------------ Clopper-Pearson


def clopper_pearson(k: int, n: int, *, alpha: float = 1 - DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial interval for k successes in n trials (Clopper & Pearson 1934).

    Each end is a one-sided (1 - alpha/2) bound: lower = Beta(alpha/2; k, n-k+1), upper = Beta(1-alpha/2; k+1, n-k).
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n or not 0 <= k <= n or n < 1:
        raise AuditInputError("privacy.audit.metrics.clopper_pearson", f"k={k!r}, n={n!r} must satisfy 0 <= k <= n, "
                              "n >= 1, integers", "pass counts")
    if not 0 < alpha < 1:
        raise AuditInputError("privacy.audit.metrics.clopper_pearson", f"alpha={alpha!r} not in (0, 1)",
                              "use e.g. 0.05 for 95 % confidence")
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_from_error_rates(fpr: float, fnr: float, *, delta: float) -> float:
    """Largest epsilon ruled out by a test with (upper bounds on) error rates fpr, fnr: max of
    log((1 - delta - fpr) / fnr) and log((1 - delta - fnr) / fpr), floored at 0 (Jagielski et al. 2020, Eq. 1)."""
    cands = [0.0]
    for a, b in ((fpr, fnr), (fnr, fpr)):
        num = 1 - delta - a
        if num > 0:
            cands.append(math.inf if b <= 0 else math.log(num / b))
    return max(cands)


@dataclass(frozen=True)
class EpsilonBound:
    """An empirical lower bound on epsilon, valid with probability `confidence` (0 = nothing shown)."""

    value: float
    confidence: float
    method: str  # "clopper_pearson" | "one_run"
    delta: float
    details: dict = field(default_factory=dict)
    max_certifiable: float = 0.0  # the power: the bound a perfect attack would show with the same trials

    def to_json(self) -> dict:
        return asdict(self)


def clopper_pearson_epsilon(fp: int, n_neg: int, fn: int, n_pos: int, *, delta: float,
                            confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Epsilon lower bound from a test's counts: Clopper-Pearson upper bounds on FPR = fp/n_neg and FNR = fn/n_pos,
    each one-sided at (1 - alpha/2) so that both hold together with probability >= confidence."""
    alpha = 1 - confidence
    fpr_hi = clopper_pearson(fp, n_neg, alpha=alpha)[1]
    fnr_hi = clopper_pearson(fn, n_pos, alpha=alpha)[1]
    return epsilon_from_error_rates(fpr_hi, fnr_hi, delta=delta)


def clopper_pearson_power(n_pos: int, n_neg: int, *, delta: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The largest Clopper-Pearson bound `n_pos` member and `n_neg` non-member trials can show: a perfect test (no
    error on either side). Below the accounted epsilon, such an audit cannot detect a breach of the budget."""
    if n_pos < 1 or n_neg < 1:
        return 0.0
    return clopper_pearson_epsilon(0, n_neg, 0, n_pos, delta=delta, confidence=confidence)


def clopper_pearson_lower_bound(scores, is_member, *, delta: float, confidence: float = DEFAULT_CONFIDENCE,
                                seed: int = 0, groups=None) -> EpsilonBound:
    """Jagielski et al. (2020) style bound for a fixed attack: the threshold is chosen on a random half of the
    trials (the one whose point estimate of epsilon is largest) and the Clopper-Pearson bound is computed on the
    other half, so the choice does not inflate the bound.

    `groups` (patient ids): the split tosses one coin per patient, so a patient is one trial, scored by the max over
    its scans (it is exposed when any of its scans is; a mean would dilute one memorised scan among the others).
    Counting scans as trials would inflate the number of trials and so the confidence. The trials still come from
    one run (Jagielski et al. train one model per trial): for a single run, the one-run bound is the rigorous one."""
    s, m = _check_scores(scores, is_member)
    unit = "record"
    if groups is not None:
        s, m = per_unit(s, m, groups, where="privacy.audit.metrics.clopper_pearson_lower_bound")
        unit = "patient"
    rng = np.random.default_rng(seed)
    pick = np.zeros(len(s), dtype=bool)
    for cls in (True, False):  # stratified halves
        idx = rng.permutation(np.flatnonzero(m == cls))
        pick[idx[: len(idx) // 2]] = True
    sel_s, sel_m, ev_s, ev_m = s[pick], m[pick], s[~pick], m[~pick]
    best_thr, best_est = math.inf, -1.0
    if sel_m.any() and (~sel_m).any():
        for thr in np.unique(sel_s):
            fp = int(((sel_s >= thr) & ~sel_m).sum())
            fn = int(((sel_s < thr) & sel_m).sum())
            # point estimate with +1/2 smoothing so that empty cells do not all tie at infinity
            est = epsilon_from_error_rates((fp + 0.5) / ((~sel_m).sum() + 1), (fn + 0.5) / (sel_m.sum() + 1),
                                           delta=delta)
            if est > best_est:
                best_thr, best_est = float(thr), est
    n_pos, n_neg = int(ev_m.sum()), int((~ev_m).sum())
    trials = {"unit": unit, "trials_members": int(m.sum()), "trials_nonmembers": int((~m).sum())}
    power = clopper_pearson_power(n_pos, n_neg, delta=delta, confidence=confidence)
    if n_pos == 0 or n_neg == 0 or not math.isfinite(best_thr):
        return EpsilonBound(0.0, confidence, "clopper_pearson", delta, {"reason": "too few records to split",
                                                                         **trials}, power)
    fp = int(((ev_s >= best_thr) & ~ev_m).sum())
    fn = int(((ev_s < best_thr) & ev_m).sum())
    value = clopper_pearson_epsilon(fp, n_neg, fn, n_pos, delta=delta, confidence=confidence)
    return EpsilonBound(value, confidence, "clopper_pearson", delta,
                        {"threshold": best_thr, "fp": fp, "n_nonmembers": n_neg, "fn": fn, "n_members": n_pos,
                         **trials}, power)


# ------------------------------------------------------------------------------------------ one run


def one_run_p_value(m: int, r: int, v: int, *, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP, m canaries each included with probability 1/2
    (Steinke, Nasr & Jagielski 2023, Theorem 5.2; the numerical procedure of their Appendix D):
    P[Bin(r, q) >= v] + 2 m delta max_{i=1..v} P[v > Bin(r, q) >= v - i] / i with q = e^eps / (1 + e^eps)."""
    if not (0 <= v <= r <= m) or epsilon < 0 or not 0 <= delta <= 1:
        raise AuditInputError("privacy.audit.metrics.one_run_p_value", f"need 0 <= v <= r <= m, epsilon >= 0, "
                              f"0 <= delta <= 1; got m={m}, r={r}, v={v}, epsilon={epsilon}, delta={delta}",
                              "count guesses and correct guesses over the canaries")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    best, window = 0.0, 0.0
    for i in range(1, v + 1):
        window += float(stats.binom.pmf(v - i, r, q))  # P[v > Bin >= v - i]
        best = max(best, window / i)
    return min(1.0, tail + 2 * m * delta * best)


def one_run_epsilon(m: int, r: int, v: int, *, delta: float, confidence: float = DEFAULT_CONFIDENCE,
                    tol: float = 1e-6) -> float:
    """Largest epsilon such that (epsilon, delta)-DP is rejected at level 1 - confidence: the p-value of v correct
    guesses out of r is below 1 - confidence for every smaller epsilon (the p-value grows with epsilon). Bisection."""
    beta = 1 - confidence
    if one_run_p_value(m, r, v, epsilon=0.0, delta=delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, epsilon=hi, delta=delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return math.inf
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, epsilon=mid, delta=delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)


def _guess_sizes(m: int, guess_fractions: tuple[float, ...]) -> list[int]:
    return sorted({max(1, int(round(f * m / 2))) for f in guess_fractions if 0 < f <= 1})


def one_run_power(m: int, *, delta: float, confidence: float = DEFAULT_CONFIDENCE,
                  guess_fractions: tuple[float, ...] = GUESS_FRACTIONS) -> float:
    """The largest one-run bound m canaries can show (a perfect attack: every guess right, r = v = 2k, with
    the same guess sizes and Bonferroni split as `one_run_lower_bound`). E.g. at 95 %: m = 32 -> ~1.10,
    m = 64 -> ~1.86 (Steinke et al. 2023, Fig. 1: the one-run bound saturates with m)."""
    ks = _guess_sizes(m, guess_fractions)
    per_test = 1 - (1 - confidence) / len(ks)
    return max(one_run_epsilon(m, 2 * k, 2 * k, delta=delta, confidence=per_test) for k in ks if 2 * k <= m)


def canaries_for(epsilon: float, available: int, *, delta: float, confidence: float = DEFAULT_CONFIDENCE,
                 margin: float = 1.5, smallest: int = 32) -> int:
    """Canaries to plant for a site of accounted `epsilon`: the smallest m on a doubling grid (from `smallest`)
    whose power reaches `margin` x epsilon, so that a strong, imperfect attack could still show a breach; all
    `available` when none of them does (or without DP: epsilon infinite)."""
    m = min(smallest, available)
    while m < available and not one_run_power(m, delta=delta, confidence=confidence) >= margin * epsilon:
        m = min(2 * m, available)
    return m


def one_run_lower_bound(scores, included, *, delta: float, confidence: float = DEFAULT_CONFIDENCE,
                        guess_fractions: tuple[float, ...] = GUESS_FRACTIONS) -> EpsilonBound:
    """One-run audit (Steinke et al. 2023, Algorithm 1): guess "in" for the k highest-scoring canaries and "out"
    for the k lowest, abstain on the rest; v = correct guesses of r = 2k. Several k are tried (fractions of m) and
    the confidence is split between them (Bonferroni), so the reported maximum keeps its stated confidence.
    `max_certifiable`: the same procedure with a perfect attack on the same draw of included canaries."""
    s, inc = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(included).astype(bool).ravel()
    if len(s) != len(inc) or len(s) < 2 or not np.all(np.isfinite(s)):
        raise AuditInputError("privacy.audit.metrics.one_run_lower_bound", f"{len(s)} scores, {len(inc)} inclusion "
                              "flags (need equal lengths >= 2, finite scores)", "score every canary once")
    best = _one_run(s, inc, delta=delta, confidence=confidence, guess_fractions=guess_fractions)
    perfect = _one_run(inc.astype(np.float64), inc, delta=delta, confidence=confidence,
                       guess_fractions=guess_fractions)
    return EpsilonBound(best.value, confidence, "one_run", delta, best.details, perfect.value)


def _one_run(s: np.ndarray, inc: np.ndarray, *, delta: float, confidence: float,
             guess_fractions: tuple[float, ...]) -> EpsilonBound:
    m = len(s)
    order = np.argsort(-s, kind="stable")
    ks = _guess_sizes(m, guess_fractions)
    per_test = 1 - (1 - confidence) / len(ks)
    best = EpsilonBound(0.0, confidence, "one_run", delta, {"m": m, "r": 0, "v": 0})
    for k in ks:
        top, bottom = order[:k], order[m - k:]
        v = int(inc[top].sum() + (~inc[bottom]).sum())
        eps = one_run_epsilon(m, 2 * k, v, delta=delta, confidence=per_test)
        if eps > best.value or best.details["r"] == 0:
            best = EpsilonBound(eps, confidence, "one_run", delta, {"m": m, "r": 2 * k, "v": v, "k_in": k,
                                                                     "k_out": k, "tests": len(ks)})
    return best


# ------------------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class AttackMetrics:
    auc: float
    tpr_at_fpr_0_001: float
    tpr_at_fpr_0_01: float
    balanced_accuracy: float
    n_members: int  # trials: patients when the split's units are given (`groups`), else scored records
    n_nonmembers: int
    top_rank_members: int = 0  # members scored above every non-member (`top_rank_test`)
    top_rank_p_value: float = 1.0  # chance of that many under no leakage
    auc_p_value: float = 1.0  # chance of an AUC this high under no leakage (`auc_p_value`)
    n_member_scans: int = 0  # scored records (ROC, AUC, TPR are over these)
    n_nonmember_scans: int = 0


def attack_metrics(scores, is_member, groups=None) -> AttackMetrics:
    """`groups`: the unit of the split's coin per score (patient ids): `auc_p_value` and the trial counts
    (n_members, n_nonmembers) are per unit; the ROC is over records."""
    s, m = _check_scores(scores, is_member)
    fpr, tpr, _ = roc(s, m)
    x, p = top_rank_test(s, m)
    units = m if groups is None else per_unit(s, m, groups, where="privacy.audit.metrics.attack_metrics")[1]
    return AttackMetrics(auc=auc(s, m), tpr_at_fpr_0_001=tpr_at_fpr(fpr, tpr, 0.001),
                         tpr_at_fpr_0_01=tpr_at_fpr(fpr, tpr, 0.01), balanced_accuracy=balanced_accuracy(fpr, tpr),
                         n_members=int(units.sum()), n_nonmembers=int((~units).sum()), top_rank_members=x,
                         top_rank_p_value=p, auc_p_value=auc_p_value(s, m, groups), n_member_scans=int(m.sum()),
                         n_nonmember_scans=int((~m).sum()))
