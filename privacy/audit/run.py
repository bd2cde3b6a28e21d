"""`medfdd audit RUN_DIR`: audit a finished run directory, per site and for the consortium.

Runs at the site (it reads the real records): members = the site's training records, non-members = its audit
holdout (`medfdd.data.site_data`). Targets: the final global model (`global_model.safetensors`) and the site's
released synthetic set (`sites/<site>/synthetic.npz`; DCR measures against the site's releases of every round,
`rounds/round-R/sites/<site>/`, and the consortium's against every round's merged set). Shadow pipelines (LiRA) and
the canary run replay the site's mechanism of its last released round R (`replayed_mechanism`): the noise multiplier,
sample rate and steps of that round's ledger charge (checked against synthetic.json), so a shadow differs from the
audited run only in its records and noise; under `privacy.count_noise` the sample rate is the published outcome of
the paid record count, taken as the attacker sees it. From round 2 on they also start from the site's round R-1
release (warm start) and match against round R-1's global model, both public. The coordinator's training (run.json's
`config.train`) is rerun in memory on the shadow's release, the other sites' round R releases (concatenation) and the
earlier merged sets the final model trained on (`train_rounds`). Not replayed: the record-count release itself (its
noisy n is not attacked), earlier rounds (taken as released: the bounds speak for round R given them; a multi-round
run's report says so) and the merge's weights.

What comes out holds aggregate numbers, attack scores and the (already released) synthetic images only: no file
path, header value or patient id (invariant 5). It is computed from real records without DP: it is for the site's
privacy officer and must stay at the site.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medfdd.artifacts import load_agreed_model, load_model, load_synthetic
from medfdd.charts import run_progress
from medfdd.config import DistillConfig, load_site_config
from medfdd.data.records import RecordView
from medfdd.data.site_data import load_site_data
from medfdd.data.split import MEMBERS_FILE, split_digest, split_units
from medfdd.distill.base import PrivacyPlan, WarmStart, check_warm_start
from medfdd.errors import MedfddError
from medfdd.io import json_number
from medfdd.nets import Classifier
from medfdd.rundir import RunDir
from medfdd.training import TrainSettings
from privacy.accounting import PURPOSE_DISTILL, PURPOSE_RECORD_COUNT, RECORD_COUNT_ROUND, PrivacyLedger, epsilon_for
from privacy.audit.attacks import dcr_attack, lira_scores, loss_attack, run_shadows, target_statistic
from privacy.audit.canary import canary_audit
from privacy.audit.metrics import (
    AttackMetrics,
    AuditInputError,
    EpsilonBound,
    attack_metrics,
    canaries_for,
    clopper_pearson_lower_bound,
)
from privacy.audit.pipeline import PipelineOutput, PipelineSettings
from privacy.audit.spec import AuditSpec

CONSORTIUM = "consortium"
AUTO_CANARIES_MAX = 1024  # `canaries: auto` without DP: this many at most (the one-run bound saturates, ~4.6)


class AuditError(MedfddError):
    """The run directory cannot be audited (missing or unfinished run, missing artifacts, no holdout)."""


@dataclass
class AttackRow:
    site: str
    attack: str
    target: str
    scores: np.ndarray
    is_member: np.ndarray
    metrics: AttackMetrics
    bound: EpsilonBound
    epsilon_accounted: float
    details: dict = field(default_factory=dict)


@dataclass
class SiteAudit:
    site_id: str
    dp: bool
    epsilon_budget: float
    epsilon_spent: float
    delta: float
    accountant: str
    ledger: list[dict]  # per charge: round, purpose, noise_multiplier, sample_rate, steps, epsilon_after
    synthetic_images: np.ndarray
    synthetic_labels: np.ndarray
    n_members: int
    n_nonmembers: int
    privacy_unit: str = "scan"  # what epsilon protects (`privacy.unit`; artifacts before it: scan)


@dataclass
class AuditOutcome:
    run: dict  # name, engine, status, medfdd_version, seed, rounds
    classes: list[str]
    spec: AuditSpec
    sites: dict[str, SiteAudit]
    rows: list[AttackRow]
    utility: dict | None
    notes: list[str]
    round_metrics: list[dict] = field(default_factory=list)  # per round: accepted sites, accuracy, ...
    progress: list[dict] = field(default_factory=list)  # per round, fine-tuning included: `medfdd.charts.run_progress`


def _read_run(run_dir: Path) -> dict:
    path = RunDir(run_dir).run_json
    if not path.is_file():
        raise AuditError(str(run_dir), "no run.json here", "pass a run directory written by `medfdd coordinator run`")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditError(str(path), f"not valid JSON ({e})", "re-run or resume the coordinator") from None
    if run.get("status") != "completed":
        raise AuditError(str(path), f"status is {run.get('status')!r}, not 'completed'",
                         "wait for the run to finish (or resume it) before auditing")
    for key in ("classes", "sites", "config"):
        if key not in run:
            raise AuditError(str(path), f"lacks key {key!r}", "audit a run directory written by this medfdd version")
    return run


def _inf(x) -> float:
    return math.inf if x is None else json_number(x)


def _train_settings(run: dict) -> TrainSettings:
    t = run["config"].get("train") or {}
    known = {k: t[k] for k in ("epochs", "lr", "batch_size", "width", "augment", "architecture") if k in t}
    return TrainSettings(**known)


def _ledger_rows(path: Path) -> tuple[list[dict], float | None]:
    if not path.is_file():
        return [], None
    ledger = PrivacyLedger.load(path)
    rows, so_far = [], []
    for e in ledger.entries:
        so_far.append(e)
        rows.append({"round": e.round, "purpose": e.purpose, "noise_multiplier": e.noise_multiplier,
                     "sample_rate": e.sample_rate, "steps": e.steps, "dp": e.dp,
                     "epsilon_after": epsilon_for(so_far, delta=ledger.budget.delta,
                                                  accountant=ledger.budget.accountant)})
    return rows, ledger.epsilon_spent


def _check_members(cfg, data, sid: str, run: dict, notes: list[str]) -> None:
    """The split rebuilt now must be the one the released rounds trained on, or members would be mislabelled (a
    changed manifest or seed reshuffles patients) and the audit would understate leakage."""
    path = cfg.output_dir / MEMBERS_FILE
    if not path.is_file():
        notes.append(f"{sid}: no {MEMBERS_FILE} at the site (a release older than this check): members could not "
                     "be verified against the released rounds")
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["rounds"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise AuditError(str(path), "not a members record written by `medfdd site distill`",
                         "restore it from the site's backup or distill again") from None
    now = split_digest(data.rows, data.train, data.holdout, cfg.data.split)
    run_rounds = {str(r.get("round")) for r in run.get("rounds") or [] if isinstance(r, dict)}
    for rnd, digest in sorted(recorded.items()):
        digest = digest if isinstance(digest, dict) else {}
        if (run_rounds and rnd not in run_rounds) or (digest.get("train"), digest.get("holdout")) == (
                now["train"], now["holdout"]):
            continue
        then = digest.get("split", "stratified")  # releases before data.split existed used the stratified rule
        fix = (f"set data.split: {then} in the site config (the rule that round used)" if then != cfg.data.split
               else "audit with the manifest, data and config the run used")
        raise AuditError(f"{sid}: {path}", f"round {rnd} trained on a different train/holdout split than the "
                         "site's data and config give now (manifest rows, quarantine, seed or split rule changed)",
                         fix)


def _released_images(run_dir: Path, run: dict, site: str | None) -> tuple[np.ndarray | None, list[int]]:
    """Every image released over the run's rounds, the DCR target: `site`'s release of each round
    (`rounds/round-R/sites/SITE/`), or for the consortium (site None) each round's merged set
    (`rounds/round-R/merged.npz`). An earlier round's release is as public as the last one, and with warm starts
    and `train_rounds` it can sit closer to a record. Empty when the run directory kept no round files."""
    images, used = [], []
    for r in sorted({int(h["round"]) for h in run.get("rounds") or [] if isinstance(h, dict) and "round" in h}):
        rdir = RunDir(run_dir)
        if site is None and rdir.round_merged(r).is_file():
            with np.load(rdir.round_merged(r), allow_pickle=False) as z:
                images.append(z["images"])
        elif site is not None and (rdir.round_release(r, site) / "synthetic.npz").is_file():
            images.append(load_synthetic(rdir.round_release(r, site)).images)
        else:
            continue
        used.append(r)
    return (np.concatenate(images) if images else None), used


def _dcr_target(run_dir: Path, run: dict, site: str | None, latest: np.ndarray) -> tuple[np.ndarray, dict]:
    """(every image released over the rounds, details): the DCR target, the latest set when the run directory kept
    no round files (older runs)."""
    target, used = _released_images(run_dir, run, site)
    if target is None:
        target, used = latest, []
    return target, {"released_rounds": used or "latest only", "n_synthetic": int(len(target))}


@dataclass
class _PoolPart:
    """One site's share of the consortium rows: its records' scores (the records themselves stay unread)."""

    member: np.ndarray
    groups: np.ndarray
    delta: float
    eps: float
    loss: np.ndarray | None  # loss attack on the global model
    dcr: np.ndarray | None  # DCR against the consortium's merged sets


@dataclass(frozen=True)
class Replay:
    """What the shadow and canary pipelines replay of a site's audited release (round `round_`)."""

    plan: PrivacyPlan
    round_: int
    matching_net: Classifier | None
    start: WarmStart | None
    details: dict


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)


def replayed_mechanism(run_dir: Path, sid: str, meta: dict, distill: DistillConfig, *, num_classes: int,
                       shape: tuple[int, ...]) -> Replay:
    """The mechanism of `sid`'s last release: its ledger charge for (round, "distill") (noise multiplier, sample
    rate, steps), which must agree with the release's synthetic.json; from round 2 on the site's previous release
    (with `distill.warm_start`) and the previous round's global model, as the site runner used them."""
    rnd = int(meta.get("round", 1))
    path = RunDir(run_dir).site_ledger(sid)
    ledger = PrivacyLedger.load(path) if path.is_file() else None
    entry = ledger.find_charge(rnd, PURPOSE_DISTILL) if ledger is not None else None
    published = [meta.get(k) for k in ("noise_multiplier", "sample_rate", "steps")]
    if entry is not None:
        mech, source = (entry.noise_multiplier, entry.sample_rate, entry.steps), "ledger"
        if None not in published and not all(_same(a, b) for a, b in zip(mech, published, strict=True)):
            raise AuditError(f"{sid}: {path}", f"round {rnd}'s ledger charge (noise multiplier, sample rate, steps) "
                             f"= {mech} is not what its synthetic.json says ({tuple(published)})",
                             "audit the run directory together with the ledger of the site that released it")
    elif None not in published:
        mech, source = (float(published[0]), float(published[1]), int(published[2])), "synthetic.json"
    else:
        raise AuditError(f"{sid}: {path}", f"no ledger charge for round {rnd} and synthetic.json lacks the "
                         "mechanism (noise_multiplier, sample_rate, steps)", "audit a run written by this medfdd "
                         "version, with the site's ledger in the run directory")
    dp = bool(meta.get("dp", True)) and mech[0] > 0
    clip = float(meta.get("clip_norm", distill.clip_norm))
    plan = PrivacyPlan(dp, float(mech[0]), float(mech[1]), int(mech[2]), clip)
    count = ledger.find_charge(RECORD_COUNT_ROUND, PURPOSE_RECORD_COUNT) if ledger is not None else None
    rdir = RunDir(run_dir)
    net = start = None
    if rnd > 1 and rdir.round_model(rnd - 1).is_file():
        net = load_agreed_model(rdir.round_model(rnd - 1), in_channels=shape[0], num_classes=num_classes,
                                spatial_size=shape[1:])
    if rnd > 1 and distill.warm_start and (rdir.round_release(rnd - 1, sid) / "synthetic.npz").is_file():
        earlier = load_synthetic(rdir.round_release(rnd - 1, sid))
        start = WarmStart(torch.from_numpy(earlier.images).float(), torch.from_numpy(earlier.labels).long())
        try:
            check_warm_start(start, distill, num_classes, shape)
        except ValueError:
            start = None  # the site runner starts from noise then too
    details = {"round": rnd, "source": source, "noise_multiplier": plan.noise_multiplier,
               "sample_rate": plan.sample_rate, "steps": plan.steps, "clip_norm": plan.clip_norm,
               "warm_start": start is not None, "broadcast_model": net is not None,
               "record_count": ({"noise_multiplier": count.noise_multiplier, "replayed": "its published outcome "
                                 "(the sample rate)"} if count is not None else None)}
    return Replay(plan, rnd, net, start, details)


def _bound(scores, member, *, delta, spec, seed, groups=None) -> EpsilonBound:
    try:
        return clopper_pearson_lower_bound(scores, member, delta=delta, confidence=spec.confidence, seed=seed,
                                           groups=groups)
    except AuditInputError as e:
        return EpsilonBound(0.0, spec.confidence, "clopper_pearson", delta, {"reason": e.problem})


def _row(site, attack, target, scores, member, *, groups, delta, eps, spec, details=None) -> AttackRow:
    """A member/holdout row: metrics over scans, the Clopper-Pearson bound over patients (`groups`)."""
    return AttackRow(site, attack, target, np.asarray(scores, dtype=np.float64), member.astype(bool),
                     attack_metrics(scores, member, groups),
                     _bound(scores, member, delta=delta, spec=spec, seed=spec.seed, groups=groups), eps,
                     details or {})


def _training_context(run_dir: Path, run: dict, sid: str, released: dict, rnd: int
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """What the coordinator trained the final model on besides `sid`'s last release: the other sites' releases of
    that round and the merged sets of the earlier rounds in its `train_rounds` window (released, public)."""
    n = int(run["config"].get("train_rounds", 1))  # runs before the option trained on the last round only
    parts = [(released[o].images, released[o].labels) for o in sorted(released) if o != sid]
    for r in range(1 if n == 0 else max(1, rnd - n + 1), rnd):
        path = RunDir(run_dir).round_merged(r)
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                parts.append((z["images"], z["labels"]))
    if not parts:
        return None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _canaries(spec: AuditSpec, holdout: int, eps_round: float, delta: float, confidence: float) -> int:
    """m: the spec's number (capped by the holdout) or, with `canaries: auto`, enough for the round's epsilon
    (`metrics.canaries_for`; without DP as many as the holdout gives, up to AUTO_CANARIES_MAX)."""
    if spec.canaries != "auto":
        return min(int(spec.canaries), holdout)
    available = holdout if math.isfinite(eps_round) else min(holdout, AUTO_CANARIES_MAX)
    return canaries_for(eps_round, available, delta=delta, confidence=confidence)


def audit_run(run_dir: Path, spec: AuditSpec, *, console: Console | None = None) -> AuditOutcome:
    console = console or Console()
    run_dir = Path(run_dir).resolve()
    run = _read_run(run_dir)
    classes = list(run["classes"])
    k = len(classes)
    train = _train_settings(run)
    model_path = RunDir(run_dir).global_model
    model = load_model(model_path) if model_path.is_file() else None
    if model is None and "global_model" in spec.targets:
        raise AuditError(str(model_path), "missing", "audit a completed run (or drop global_model from targets)")
    wanted = spec.sites if spec.sites is not None else sorted(run["sites"])
    unknown = [s for s in wanted if s not in run["sites"]]
    if unknown:
        raise AuditError("audit spec: key 'sites'", f"{unknown} are not sites of this run ({sorted(run['sites'])})",
                         "list site ids from run.json")
    released = {}
    for sid in sorted(run["sites"]):
        if (RunDir(run_dir).site(sid) / "synthetic.npz").is_file():
            released[sid] = load_synthetic(RunDir(run_dir).site(sid))

    notes: list[str] = []
    sites: dict[str, SiteAudit] = {}
    rows: list[AttackRow] = []
    pools: list[_PoolPart] = []
    merged = RunDir(run_dir).merged
    consortium_dcr = None  # the consortium's DCR target: every round's merged set
    if spec.consortium and "dcr" in spec.attacks and "synthetic" in spec.targets and merged.is_file():
        with np.load(merged, allow_pickle=False) as z:
            consortium_dcr = _dcr_target(run_dir, run, None, z["images"])
    n_rounds = len(run.get("rounds") or [])
    if n_rounds > 1 and (spec.lira or "canary" in spec.attacks):
        notes.append(f"the run had {n_rounds} rounds; LiRA shadows and the canary run replay one round, the last "
                     "(its ledger's noise multiplier, sample rate and steps, from the site's previous release and the "
                     "broadcast model, with the earlier rounds' releases as they were), so their scores and bounds "
                     f"speak for the last round's release given the earlier ones, not for the {n_rounds} together")
    # one rigorous canary test per site: Bonferroni, so that no site raises a false alarm with probability
    # above 1 - confidence however many sites are audited
    canary_confidence = 1 - (1 - spec.confidence) / max(1, len(wanted))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        for sid in wanted:
            info = run["sites"][sid]
            if not info.get("config"):
                notes.append(f"{sid}: no local site config in run.json (Flower run): audit it at its site")
                continue
            if sid not in released:
                notes.append(f"{sid}: no released synthetic set in the run directory (rejected or absent): skipped")
                continue
            cfg = load_site_config(Path(info["config"]))
            data = load_site_data(cfg)
            _check_members(cfg, data, sid, run, notes)
            if len(data.holdout) == 0 or len(data.train) == 0:
                raise AuditError(f"{sid}: data.holdout_fraction", "the site has no audit holdout (or no training "
                                 "records)", "set data.holdout_fraction > 0 in the site config before the run")
            syn = released[sid]
            meta = syn.meta
            dp = bool(meta.get("dp", True)) and math.isfinite(_inf(meta.get("epsilon")))
            delta = float(meta.get("delta", info.get("delta", 1e-5)))
            ledger, spent = _ledger_rows(RunDir(run_dir).site_ledger(sid))
            eps_acc = (spent if spent is not None else _inf(meta.get("epsilon"))) if dp else math.inf
            pool = np.r_[data.train, data.holdout]
            member = np.r_[np.ones(len(data.train)), np.zeros(len(data.holdout))].astype(bool)
            x, y = RecordView(data.images, pool), data.labels[pool]  # read by index, a batch at a time
            sites[sid] = SiteAudit(sid, dp, _inf(info.get("epsilon_budget")), eps_acc, delta,
                                   str(meta.get("accountant", "rdp")), ledger, syn.images, syn.labels,
                                   int(member.sum()), int((~member).sum()), str(meta.get("privacy_unit", "scan")))
            groups = split_units(data.patient_ids, pool, sid)
            common = {"groups": groups, "delta": delta, "eps": eps_acc, "spec": spec}
            losses = None
            if "loss" in spec.attacks and "global_model" in spec.targets:
                losses = loss_attack(model, x, y)
                rows.append(_row(sid, "loss", "global_model", losses, member, **common))
            if "dcr" in spec.attacks and "synthetic" in spec.targets:
                target, details = _dcr_target(run_dir, run, sid, syn.images)
                rows.append(_row(sid, "dcr", "synthetic", dcr_attack(target, x), member, details=details, **common))
            pools.append(_PoolPart(member, groups, delta, eps_acc, losses,
                                   None if consortium_dcr is None else dcr_attack(consortium_dcr[0], x)))

            replay = replayed_mechanism(run_dir, sid, meta, cfg.distill, num_classes=k,
                                        shape=tuple(data.images.shape[1:]))
            context = _training_context(run_dir, run, sid, released, replay.round_)
            eps_round = _inf(meta.get("epsilon_round", meta.get("epsilon"))) if dp else math.inf
            settings = PipelineSettings(cfg.distill, train, k, eps_round, delta, str(meta.get("accountant", "rdp")),
                                        mechanism=replay.plan, round_=replay.round_, matching_net=replay.matching_net,
                                        start=replay.start)
            if spec.lira:
                targets = tuple(t for t in ("global_model", "synthetic") if t in spec.targets)
                task = bar.add_task(f"{sid}: {spec.shadows} shadow pipelines (LiRA)", total=spec.shadows)
                with torch.random.fork_rng(devices=[]):
                    shadows = run_shadows(x, y, settings, n_shadows=spec.shadows, seed=spec.seed, targets=targets,
                                          context=context, on_shadow=lambda d, t=task: bar.update(t, completed=d))
                observed = PipelineOutput(syn.images, syn.labels, model, eps_acc, 0.0, 0.0)
                for t in targets:
                    tstat = target_statistic(t, observed, x, y)
                    for attack in spec.lira:
                        scores = lira_scores(tstat, shadows.stats[t], shadows.in_mask, online=attack == "lira_online",
                                             fixed_variance=spec.fixed_variance)
                        rows.append(_row(sid, attack, t, scores, member, **common,
                                         details={"shadows": spec.shadows, "fixed_variance": spec.fixed_variance,
                                                  "replayed": replay.details,
                                                  "shadow_mechanisms": sorted(set(shadows.mechanisms))}))
            m = _canaries(spec, len(data.holdout), eps_round, delta, canary_confidence)
            if "canary" in spec.attacks and m < 2:
                notes.append(f"{sid}: {len(data.holdout)} holdout record(s), too few canaries for the one-run audit")
            elif "canary" in spec.attacks:
                task = bar.add_task(f"{sid}: canary run ({m} canaries)", total=1)
                pick = np.random.default_rng([spec.seed, 11]).permutation(data.holdout)[:m]
                with torch.random.fork_rng(devices=[]):
                    c = canary_audit(RecordView(data.images, data.train), data.labels[data.train],
                                     RecordView(data.images, pick),
                                     data.labels[pick], settings, target=spec.canary_target, kind=spec.canary_kind,
                                     seed=spec.seed, delta=delta, confidence=canary_confidence, context=context)
                bar.update(task, completed=1)
                if c.one_run is None or c.clopper_pearson is None:
                    notes.append(f"{sid}: all {m} canaries fell on one side; canary metrics skipped")
                else:
                    rows.append(AttackRow(
                        sid, "canary", spec.canary_target, c.scores, c.included, attack_metrics(c.scores, c.included),
                        c.one_run, c.epsilon_accounted,
                        {"canaries": m, "kind": c.kind, "one_run": c.one_run.to_json(),
                         "clopper_pearson": c.clopper_pearson.to_json(),
                         "epsilon_lower_bound_clopper_pearson": c.clopper_pearson.value,
                         "replayed": replay.details, "canary_mechanism": list(c.mechanism)}))
                    if math.isfinite(c.epsilon_accounted) and c.one_run.max_certifiable <= c.epsilon_accounted:
                        notes.append(f"{sid}: the canary audit ({m} canaries) could certify at most epsilon "
                                     f"{c.one_run.max_certifiable:.2f}, not above the {c.epsilon_accounted:.3g} "
                                     "accounted for the round it replays: it lacks the power to detect a breach "
                                     "of the budget (more canaries need a larger audit holdout)")
    if not sites:
        raise AuditError(str(run_dir), "no site could be audited here: " + "; ".join(notes),
                         "run the audit where the sites' configs and data are")
    if not rows:
        raise AuditError("audit spec", f"attacks {spec.attacks} on targets {spec.targets} produced no result: "
                         "nothing was tested (" + "; ".join(notes) + ")",
                         "pick attacks that run on the chosen targets (loss needs global_model, dcr needs synthetic)")
    if spec.consortium and len(pools) > 1:  # every site's records scored above, pooled (each record's score does
        # not depend on the other records)
        member = np.concatenate([p.member for p in pools])
        delta = max(p.delta for p in pools)
        eps = max(p.eps for p in pools)  # a record is protected by its own site's guarantee: the worst site bounds all
        common = {"groups": np.concatenate([p.groups for p in pools]), "delta": delta, "eps": eps, "spec": spec}
        if all(p.loss is not None for p in pools):
            rows.append(_row(CONSORTIUM, "loss", "global_model", np.concatenate([p.loss for p in pools]), member,
                             **common))
        if consortium_dcr is not None:
            rows.append(_row(CONSORTIUM, "dcr", "synthetic", np.concatenate([p.dcr for p in pools]), member,
                             details=consortium_dcr[1], **common))
    rounds = run.get("rounds") or []
    info = {"name": run_dir.name, "engine": run.get("engine"), "status": run.get("status"),
            "medfdd_version": run.get("medfdd_version"), "seed": run.get("seed"), "rounds": len(rounds),
            "merge": run["config"].get("merge")}
    per_round = [{"round": r.get("round"), "accepted": len(r.get("accepted") or []),
                  **{k: (r.get("metrics") or {}).get(k) for k in ("accuracy", "balanced_accuracy", "auc")}}
                 for r in rounds]
    return AuditOutcome(info, classes, spec, sites, rows, run.get("final"), notes, per_round, run_progress(run))
