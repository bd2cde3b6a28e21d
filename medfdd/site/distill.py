"""`medfdd site distill`: the site runner of one private distillation round.

Order of operations (privacy invariants 1-4): load the site's training split -> calibrate the noise for the
planned steps and rounds -> charge the ledger (write-ahead, atomic; refused if over budget) -> distill, with
resumable checkpoints that stay at the site -> write the allow-listed artifact (and, kept at the site, the round's
matching-loss curve, `distill_loss_round-R.png` and `.json`). A resumed run finds its charge
in the ledger and does not pay twice; a crash may over-count, never under-count. (A resumed decoupled DM run
recomputes its bank of noisy statistics from the same seeds: the same releases, not new ones.) Every random draw is
keyed by the site's secret noise key (`noise_key.py`), and the ledger entry names the release it paid for (keyed
digests of the training records' content and labels, settings, keyed seed, device and precision, warm start and global
model): rerunning a charged round with anything changed would publish the same noise on other data under the old
charge and is refused, naming what changed (DESIGN invariant 9). A lost ledger is never a fresh budget: with the
ledger missing, any file written only after a charge (`release_traces`) makes the run refuse (`LedgerMissing`).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save

from medfdd.artifacts import SyntheticSet, load_agreed_model, save_preview, save_synthetic, save_volumes_nifti
from medfdd.charts import loss_png
from medfdd.config import SiteConfig
from medfdd.data.records import RecordView, byte_chunks
from medfdd.data.split import MEMBERS_FILE, split_digest
from medfdd.distill import create_distiller
from medfdd.distill.base import DistillState, PrivacyPlan, WarmStart, check_warm_start, fast_bf16
from medfdd.distill.mechanism import secure_replay_refused
from medfdd.errors import MedfddError
from medfdd.io import atomic_write_bytes, atomic_write_json, json_safe
from medfdd.site.budget import open_ledger
from medfdd.site.check import load_with_progress
from medfdd.site.noise_key import KEY_FILENAME, keyed_seed, load_or_create
from medfdd.site.record_count import private_record_count
from medfdd.training import pick_device
from privacy.accounting import (
    PURPOSE_DISTILL,
    BudgetExceeded,
    Charge,
    ChargeConflict,
    PrivacyLedger,
    calibrate_round_noise,
    epsilon_for,
)

PURPOSE = PURPOSE_DISTILL


class DistillError(MedfddError):
    """The site cannot distill as configured (e.g. delta not below 1/n, empty training split)."""


@dataclass
class DistillOutcome:
    synthetic: Path
    meta: dict
    resumed_from: int


def plan_privacy(cfg: SiteConfig, ledger: PrivacyLedger, *, n_train: int, round_: int, dp: bool,
                 seed: int = 0) -> PrivacyPlan:
    """Noise for this round such that all planned rounds fit the budget, given what earlier rounds (and the record
    count) spent.

    The sample rate is `distill.sample_rate` when set (it discloses nothing of n), else batch_size / n~ with n~ the
    DP record count (`privacy.count_noise`, on by default; paid here, once, with noise keyed by `seed`): the mechanism
    that runs is then chosen by a charged release only, so the add/remove-one guarantee holds (DESIGN invariant 8).
    With `count_noise: null` n counts as public and batch_size / n discloses it. A delta not below 1/n is refused
    before anything is charged (a data-dependent refusal: it leaves the site only as the generic `site-failed` code,
    one of the channels the privacy officer's guide lists).
    """
    steps = cfg.distill.iterations
    if not dp:
        return PrivacyPlan(False, 0.0, cfg.distill.sample_rate_for(n_train, len(cfg.data.classes)), steps, cfg.distill.clip_norm)
    if cfg.privacy.delta >= 1.0 / n_train:  # refused before any charge; leaves only as the site-failed code
        raise DistillError(f"{cfg.site_id}: privacy.delta", f"delta = {cfg.privacy.delta:g} is not below 1/n = "
                           f"1/{n_train} (n = training records)", "set privacy.delta well below 1/n, e.g. 1e-5")
    paid = ledger.find_charge(round_, PURPOSE)
    if paid is not None:  # resumed or repeated round: same plan as was paid for
        return PrivacyPlan(True, paid.noise_multiplier, paid.sample_rate, paid.steps, cfg.distill.clip_norm)
    if round_ > cfg.privacy.rounds:
        raise BudgetExceeded(f"{cfg.site_id}: privacy.rounds", f"round {round_} is beyond the planned "
                             f"{cfg.privacy.rounds} round(s) the budget epsilon = {cfg.privacy.epsilon:g} was split "
                             f"over (spent so far {ledger.epsilon_spent:.4g})",
                             "plan more rounds before the first one (privacy.rounds) or agree a new budget")
    private_n = cfg.privacy.count_noise is not None and cfg.distill.sample_rate is None
    n = private_record_count(cfg, ledger, n=n_train, seed=seed) if private_n else n_train
    q = cfg.distill.sample_rate_for(n, len(cfg.data.classes))
    earlier = [e for e in ledger.entries if (e.round, e.purpose) != (round_, PURPOSE)]  # incl. the record count
    remaining_rounds = max(1, cfg.privacy.rounds - len({e.round for e in earlier if e.purpose == PURPOSE}))
    # hybrid mode keeps `privacy.finetune_share` of epsilon for the DP fine-tuning rounds (medfdd.site.finetune)
    sigma = calibrate_round_noise(epsilon=cfg.privacy.epsilon * (1 - cfg.privacy.finetune_share),
                                  delta=cfg.privacy.delta, sample_rate=q,
                                  steps_per_round=steps, rounds=remaining_rounds,
                                  already_spent=earlier,
                                  accountant=cfg.privacy.accountant)
    return PrivacyPlan(True, sigma, q, steps, cfg.distill.clip_norm)


# what a change of each part of a release fingerprint means (tags of `_fingerprint`, in its order)
RELEASE_PARTS = {
    "k": "the site's noise key or the config's seed",
    "l": "the training records' labels (labels.csv)",
    "c": "the training records' content (the scans' pixels, their number or order, or their preprocessing)",
    "s": "the distill or data settings, or this round's privacy plan",
    "r": "the device, precision or torch build",
    "w": "the warm start (this site's release of the previous round)",
    "g": "the global model",
}


def _runtime(cfg: SiteConfig, device: torch.device) -> dict:
    """The resolved device and precision (as `Distiller` resolves `distill.precision`) and the torch build: the same
    keyed seeds draw other noise, or round otherwise, on another of these."""
    bf16 = fast_bf16(device)
    precision = "bf16" if cfg.distill.precision == "bf16" or (cfg.distill.precision == "auto" and bf16) else "fp32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {"device": str(device), "device_name": name, "bf16_capable": bf16, "precision": precision,
            "torch": torch.__version__}


def _fingerprint(cfg: SiteConfig, plan: PrivacyPlan, round_: int, seed: int, x: RecordView, y: torch.Tensor,
                 runtime: dict, start: WarmStart | None, global_model: Path | None) -> str:
    """The release's identity (DESIGN invariant 9): digests of everything its noisy statistics and images depend on,
    the training tensors and labels exactly as the mechanism consumes them included. A 128-bit digest of all parts,
    then an 8-hex tag per part (`RELEASE_PARTS`) that names what changed when a rerun is refused. Every digest is
    keyed by the secret keyed seed: the ledger may travel, and a plain digest of the records would let anyone holding
    candidate data sets test which one trained. Recorded with the ledger charge and in checkpoints."""
    key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()

    def digest(*chunks: bytes | memoryview | Iterator[bytes | memoryview]) -> bytes:
        h = hashlib.blake2b(key=key, digest_size=16)
        for chunk in chunks:
            for part in (chunk,) if isinstance(chunk, bytes | memoryview) else chunk:
                h.update(part)
        return h.digest()

    settings = [cfg.distill.model_dump(mode="json"), cfg.data.model_dump(mode="json"), round_, plan.__dict__]
    parts = {
        "k": digest(b"noise key"),
        "l": digest(byte_chunks(y)),
        "c": digest(byte_chunks(x)),
        "s": digest(json.dumps(settings, sort_keys=True, default=str).encode()),
        "r": digest(json.dumps(runtime, sort_keys=True).encode()),
        "w": digest(byte_chunks(start.images), byte_chunks(start.labels)) if start else digest(b"none"),
        "g": digest(b"model", Path(global_model).read_bytes()) if global_model is not None else digest(b"none"),
    }
    return digest(*parts.values()).hex() + ":" + ",".join(f"{t}={d.hex()[:8]}" for t, d in parts.items())


def _changed(paid: str | None, release: str, runtime: dict) -> str:
    """What differs between the release a round was charged for and this run's, from their per-part tags."""

    def tags(fingerprint: str | None) -> dict[str, str] | None:
        if not fingerprint or ":" not in fingerprint:
            return None
        return dict(p.split("=", 1) for p in fingerprint.split(":", 1)[1].split(",") if "=" in p)

    before, now = tags(paid), tags(release)
    if before is None or now is None:
        return "an input (the charge was recorded without per-input digests, so which one cannot be told)"
    if before.get("k") != now["k"]:  # every other digest is keyed by it: they cannot be compared
        return RELEASE_PARTS["k"]
    what = [RELEASE_PARTS[t] for t in now if before.get(t) != now[t]]
    if RELEASE_PARTS["r"] in what:
        what[what.index(RELEASE_PARTS["r"])] += (f" (now {runtime['device']}, {runtime['precision']}, "
                                                 f"torch {runtime['torch']})")
    return "; ".join(what) or "an input"


def _check_paid_release(ledger: PrivacyLedger, round_: int, release: str, runtime: dict) -> None:
    """One charge buys one release of one data set: a charged round reruns (resume, replay) only on exactly the inputs
    it was charged for, since its keyed noise on other data would release their difference without noise."""
    paid = ledger.find_charge(round_, PURPOSE)
    if paid is None or paid.release == release:
        return
    raise ChargeConflict(
        f"{ledger.path} (round {round_})",
        f"round {round_} was already charged for a release, and this run would publish another one under that "
        f"charge; changed since: {_changed(paid.release, release, runtime)}. The same keyed noise on different data "
        "would release their difference without noise; nothing was released",
        f"to resume or replay round {round_}, restore exactly the inputs it was charged for; to release the changed "
        f"data, distill it as a new, paid round (--round {round_ + 1}, within privacy.rounds and the budget left), "
        "or under a newly agreed budget in a new output folder")


def _record_members(cfg: SiteConfig, round_: int, digest: dict) -> None:
    """members.json (site-local): the split digest of every released round, for `medfdd audit` to check against."""
    path = cfg.output_dir / MEMBERS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = {}  # rewritten below; the audit then checks against this round only
    rounds = record.get("rounds") if isinstance(record, dict) and isinstance(record.get("rounds"), dict) else {}
    atomic_write_json(path, {"site_id": cfg.site_id, "rounds": {**rounds, str(round_): digest}})


def _release_copy(cfg: SiteConfig, round_: int) -> Path:
    """The site's private copy of what it released in a round (the warm start of the next round)."""
    return cfg.output_dir / "checkpoints" / f"released-round-{round_}.safetensors"


def _previous_release(cfg: SiteConfig, round_: int, shape: tuple[int, ...], console: Console) -> WarmStart | None:
    """Round `round_ - 1`'s released images and labels when warm starts are on and the copy matches this round's
    plan."""
    if round_ < 2 or not cfg.distill.warm_start:
        return None
    path = _release_copy(cfg, round_ - 1)
    try:
        t = load_file(str(path))
        start = WarmStart(t["images"].float(), t["labels"].long())
        check_warm_start(start, cfg.distill, len(cfg.data.classes), shape)
    except Exception:
        console.print(f"[yellow]no usable round {round_ - 1} release at {path}: round {round_} starts from noise[/]")
        return None
    console.print(f"warm start: round {round_} continues from this site's round {round_ - 1} release")
    return start


def _save_checkpoint(path: Path, state: DistillState, fingerprint: str) -> None:
    tensors = {"images": state.images.detach().cpu().contiguous(), "momentum": state.momentum.cpu().contiguous(),
               "labels": state.labels.cpu().contiguous()}
    for name in ("average", "counts_sum"):
        if getattr(state, name) is not None:
            tensors[name] = getattr(state, name).cpu().contiguous()
    if state.losses:
        tensors["losses"] = torch.tensor(state.losses, dtype=torch.float64)
    atomic_write_bytes(path, save(tensors, metadata={"iteration": str(state.iteration), "fingerprint": fingerprint}))


def _load_checkpoint(path: Path, fingerprint: str, device: torch.device) -> DistillState | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            return None  # a different plan or different data: start over (the charge is per plan)
        t = load_file(str(path))
    except Exception:
        return None
    optional = {name: t[name].to(device) if name in t else None for name in ("average", "counts_sum")}
    losses = [(int(u), float(v)) for u, v in t["losses"].tolist()] if "losses" in t else []
    return DistillState(t["images"].to(device).requires_grad_(True), t["labels"].to(device),
                        t["momentum"].to(device), int(meta["iteration"]), **optional, losses=losses)


def loss_curve_path(cfg: SiteConfig, round_: int) -> Path:
    """output/distill_loss_round-R.png (the numbers beside it as .json): kept at the site, never offered."""
    return cfg.output_dir / f"distill_loss_round-{round_}.png"


def _write_loss_curve(cfg: SiteConfig, round_: int, state: DistillState, *, per_update: bool, eps_text: str) -> Path:
    """The matching loss of each synthetic update of the round (`DistillState.losses`, carried through checkpoints;
    a checkpoint written before they were recorded resumes with the curve from that point), as PNG and JSON."""
    png = loss_curve_path(cfg, round_)
    what = "synthetic update" if per_update else "paid step (loss of its last synthetic update)"
    atomic_write_json(png.with_suffix(".json"), json_safe({
        "site_id": cfg.site_id, "round": round_, "method": cfg.distill.method, "x": what,
        "points": [[u, v] for u, v in state.losses],
        "note": "the matching loss against the noisy statistics (post-processing); kept at the site, never offered"}))
    title = f"{cfg.site_id} round {round_}: {cfg.distill.method.upper()} matching loss, {eps_text}"
    return atomic_write_bytes(png, loss_png(state.losses, title, what))


def distill_site(cfg: SiteConfig, *, round_: int = 1, global_model: Path | None = None, no_dp: bool = False,
                 console: Console | None = None, stop_after: int | None = None) -> DistillOutcome:
    """Run one round of private distillation at a site and write its artifact.

    `stop_after` ends the run after that many steps without releasing (tests of crash/resume use it).
    """
    console = console or Console()
    dp = cfg.privacy.dp and not no_dp
    if not dp:
        console.print("[bold red]WARNING: NON-PRIVATE RUN (--no-dp).[/] The synthetic set is derived from patient "
                      "data WITHOUT differential privacy; epsilon = inf is recorded in the ledger and the artifact. "
                      "Use only for baselines and positive controls; never share it outside the site.")
    data = load_with_progress(cfg, console)
    train = data.train
    if len(train) == 0:
        raise DistillError(f"{cfg.site_id}: data", "the training split is empty",
                           "run `medfdd site check` and fix the quarantined rows")
    x = RecordView(data.images, train)  # read by index: a Poisson sample reads only its rows
    y = torch.as_tensor(data.labels[train])
    device = pick_device(cfg.device)
    # a broadcast model that is not the agreed architecture is refused before anything is charged
    matching_net = None
    shape = tuple(x.shape[1:])
    if global_model is not None:
        matching_net = load_agreed_model(global_model, in_channels=shape[0], num_classes=len(cfg.data.classes),
                                         spatial_size=shape[1:])
    start = _previous_release(cfg, round_, shape, console)
    ledger = open_ledger(cfg, dp)
    seed = keyed_seed(load_or_create(cfg.output_dir / KEY_FILENAME), cfg.seed)
    paid_before = ledger.find_charge(round_, PURPOSE) is not None
    plan = plan_privacy(cfg, ledger, n_train=len(train), round_=round_, dp=dp, seed=seed)
    plan = replace(plan, noise_source=cfg.privacy.noise_source)
    runtime = _runtime(cfg, device)
    fingerprint = _fingerprint(cfg, plan, round_, seed, x, y, runtime, start, global_model)
    _check_paid_release(ledger, round_, fingerprint, runtime)  # before anything is charged, computed or written
    # write-ahead: the whole planned round is paid for before the first noisy statistic is computed
    ledger.charge(Charge(plan.noise_multiplier, plan.sample_rate, plan.steps, round=round_, purpose=PURPOSE, dp=dp,
                         release=fingerprint))
    eps_spent = ledger.epsilon_spent

    distiller = create_distiller(
        cfg.distill, plan, num_classes=len(cfg.data.classes), image_shape=shape, seed=seed, round_=round_,
        device=device, matching_net=matching_net, start=start)
    ckpt_path = cfg.output_dir / "checkpoints" / f"round-{round_}.safetensors"
    bank_path = ckpt_path.with_name(f"round-{round_}-bank.safetensors")  # secure noise: the paid bank, kept
    distiller.secure_store = (bank_path, fingerprint)
    state = _load_checkpoint(ckpt_path, fingerprint, device)
    if dp and plan.noise_source == "secure" and paid_before and state is None:
        raise secure_replay_refused(f"{cfg.site_id}: round {round_}", "this round was charged by an earlier run and "
                                    "has no checkpoint to continue from (it was released, or stopped before its first "
                                    "checkpoint)")
    resumed_from = state.iteration if state else 0
    total = distiller.total_work
    if state:
        console.print(f"resuming round {round_} from step {state.iteration}/{total} (already paid for)")
    elif ckpt_path.is_file():  # the charge matched this run's inputs: the checkpoint is stale (another version)
        console.print(f"[yellow]ignoring {ckpt_path} (unreadable, or not of the inputs round {round_} was charged "
                      "for): the round restarts from step 0, the same release under the same charge[/]")
    state = state or distiller.init_state()
    last = {"loss": float("nan")}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(f"{cfg.site_id}: {cfg.distill.method.upper()} round {round_}", total=total,
                            completed=state.iteration, info="")

        def on_step(st: DistillState, loss: float) -> None:
            last["loss"] = loss
            what = "paying noisy statistics" if math.isnan(loss) else f"loss {loss:.4f}"
            bar.update(task, completed=st.iteration,
                       info=f"{what}  eps {eps_spent:.3g}/{cfg.privacy.epsilon if dp else math.inf:.3g}")
            if st.iteration % cfg.distill.checkpoint_every == 0 and st.iteration < total:
                _save_checkpoint(ckpt_path, st, fingerprint)
                bar.console.print(f"checkpoint: step {st.iteration} (an interrupted run resumes here)")
            if stop_after is not None and st.iteration >= stop_after:
                raise _Interrupted()

        try:
            state = distiller.run(x, y, state, on_step=on_step)
        except _Interrupted:
            _save_checkpoint(ckpt_path, state, fingerprint)
            return DistillOutcome(Path(), {}, resumed_from)

    images = state.result().cpu().numpy().astype(np.float32)
    labels = state.labels.cpu().numpy().astype(np.int64)
    round_eps = epsilon_for([e for e in ledger.entries if (e.round, e.purpose) == (round_, PURPOSE)],
                            delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
    meta = {"site_id": cfg.site_id, "round": round_, "method": cfg.distill.method, "ipc": cfg.distill.ipc,
            "classes": list(cfg.data.classes), "spatial_size": list(cfg.data.spatial_size),
            "channels": cfg.data.channels, "epsilon": eps_spent, "epsilon_round": round_eps,
            "delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant,
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": plan.steps,
            "clip_norm": plan.clip_norm, "dp": dp, "privacy_unit": cfg.privacy.unit,
            "noise_source": plan.noise_source}
    evidence = distiller.class_evidence(state)
    if evidence is not None:
        meta["class_evidence"] = evidence
    if cfg.distill.allocation != "uniform":
        meta["allocation"] = cfg.distill.allocation
    _record_members(cfg, round_, split_digest(data.rows, data.train, data.holdout, cfg.data.split))
    npz, _ = save_synthetic(cfg.output_dir, SyntheticSet(images, labels, meta))
    atomic_write_bytes(_release_copy(cfg, round_), save({"images": torch.from_numpy(images),
                                                         "labels": torch.from_numpy(labels)}))
    eps_text = f"eps {eps_spent:.3g}" if dp else "NON-PRIVATE (eps = inf)"
    save_preview(cfg.output_dir / "synthetic_preview.png", images, labels, list(cfg.data.classes),
                 title=f"{cfg.site_id} round {round_}: {cfg.distill.method.upper()} ipc {cfg.distill.ipc}, {eps_text}")
    if len(cfg.data.spatial_size) == 3:
        save_volumes_nifti(cfg.output_dir / "synthetic.nii.gz", images, orientation=cfg.data.orientation,
                           voxel_size=cfg.data.voxel_size)
    curve = _write_loss_curve(cfg, round_, state, per_update=total > plan.steps, eps_text=eps_text)
    ckpt_path.unlink(missing_ok=True)
    bank_path.unlink(missing_ok=True)
    console.print(f"[green]wrote[/] {npz} ({len(images)} images, {eps_text}, last loss {last['loss']:.4f}); loss "
                  f"curve {curve} (stays at the site)")
    return DistillOutcome(npz, meta, resumed_from)


class _Interrupted(Exception):
    pass
