"""One coordinator run over rounds, engine-neutral (the in-process runner and the Flower ServerApp drive it).

Per round: broadcast (the global model from round 2, FedDM-style) -> receive offers (validated; rejects logged with a
reason, the round goes on) -> merge -> train the global ConvNet-3 -> evaluate on the test split -> checkpoint.
Hybrid mode (`finetune.rounds` > 0): after the last distillation round, DP fine-tuning rounds start from the trained
global model (kept as warm_start_model.safetensors): send the model and recipe -> receive each site's local DP-SGD
model (validated like offers) -> average them weighted by n~ (`average.py`) -> evaluate -> checkpoint; the last
average is the run's global model.
`run.json` is rewritten atomically after every round, and `progress.png` redrawn (test accuracy and each site's
epsilon per round, `medfdd.charts.progress_png`); a killed coordinator resumes after the last finished round.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from medfdd import __version__
from medfdd.artifacts import SyntheticSet, load_model, save_model, save_preview, save_synthetic
from medfdd.charts import progress_png, run_progress
from medfdd.config import (
    ConsortiumConfig,
    CoordinatorConfig,
    DataConfig,
    Intensity,
    MinMax,
    SiteConfig,
    dump_config,
)
from medfdd.coordinator.average import AcceptedUpdate, average, validate_update
from medfdd.coordinator.bundle import export_bundle
from medfdd.coordinator.merge import MergedSet, load_merged, merge, union_of_rounds
from medfdd.coordinator.validate import AcceptedOffer, OfferRejected, Reason, check_identity, validate_offer
from medfdd.errors import MedfddError
from medfdd.io import atomic_save_npz, atomic_write_bytes, atomic_write_json, json_safe
from medfdd.messages import Broadcast, FinetuneRound, LocalUpdate, SiteOffer
from medfdd.nets import model_for
from medfdd.rundir import RunDir
from medfdd.training import TrainSettings, evaluate, pick_device, train_classifier
from privacy.accounting import LEDGER_FILENAME

MERGED_PREVIEW_COLS = 20  # images per class in a round's merged_preview.png (the merged set grows with the sites)
_SILENT = frozenset({Reason.NO_ANSWER.value, Reason.SITE_UNAVAILABLE.value})  # a site that sent nothing at all


class CoordinatorError(MedfddError):
    """The coordinator cannot go on (no usable offer in a round, sites that disagree, a foreign run folder)."""


def load_test_set(cfg: CoordinatorConfig, spec: ConsortiumConfig, out: Path,
                  site_intensity: Intensity | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The coordinator's own labelled test split, through the same loader and preprocessing as the sites: scaled by
    `test.intensity`, else by `site_intensity` (the one scaling every in-process site uses: a model trained on
    CT-windowed images must be evaluated on CT-windowed images), else minmax."""
    if cfg.test is None:
        return None
    from medfdd.data.site_data import load_site_data

    data_cfg = DataConfig(root=(cfg.base_dir / cfg.test.root).resolve(), manifest=cfg.test.manifest,
                          format=cfg.test.format, classes=spec.classes, spatial_size=spec.spatial_size,
                          channels=spec.channels, intensity=scan_intensity(cfg, site_intensity),
                          holdout_fraction=0.0, **cfg.test.geometry())
    data = load_site_data(SiteConfig(site_id="test-set", data=data_cfg, output=out / "test-cache", base_dir=out))
    if len(data.labels) == 0:
        raise CoordinatorError(f"test set {data_cfg.root}", "no usable test image",
                               "check the test manifest with `medfdd site check`")
    return data.images, data.labels


def scan_intensity(cfg: CoordinatorConfig, site_intensity: Intensity | None) -> Intensity:
    """How the consortium scales a scan's intensities: `test.intensity`, else the sites' shared setting, else minmax."""
    return (cfg.test.intensity if cfg.test is not None else None) or site_intensity or MinMax()


def _fingerprint(cfg: CoordinatorConfig, spec: ConsortiumConfig) -> str:
    """What a resumed run must share with the run it continues: everything but the quorum, which decides only
    whether a round may finish (a run stopped below it resumes with a lower one; left out, so that run folders of
    earlier versions keep their fingerprint)."""
    text = dump_config(cfg, exclude={"min_sites"}) + spec.model_dump_json()
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass
class _Round:
    round: int
    accepted: dict[str, AcceptedOffer] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    finetune: bool = False  # a hybrid-mode fine-tuning round (accepted holds AcceptedUpdate)

    @property
    def name(self) -> str:
        return f"{'fine-tuning ' if self.finetune else ''}round {self.round}"

    @property
    def what(self) -> str:
        """What a site sends in this round."""
        return "update" if self.finetune else "offer"


class CoordinatorRun:
    """State of one run directory; every engine calls broadcast -> receive* -> finish_round per round."""

    def __init__(self, cfg: CoordinatorConfig, spec: ConsortiumConfig, sites: dict[str, SiteConfig], *,
                 engine: str, console: Console, site_intensity: Intensity | None = None):
        self.cfg, self.spec, self.sites, self.site_intensity = cfg, spec, sites, site_intensity
        self.engine, self.console = engine, console
        self.out = cfg.output_dir
        self.dir = RunDir(self.out)
        self.rounds = cfg.rounds
        self.site_timeout_s = cfg.site_timeout_s
        self.expected_sites = sorted(spec.sites)
        self.min_sites = cfg.min_sites  # quorum: accepted offers (or updates) a round needs to complete
        self.fingerprint = _fingerprint(cfg, spec)
        self.history: list[dict] = []
        self.bindings: dict[str, str] = {}  # engine sender -> site id (first contact binds)
        self.last_epsilon: dict[str, float] = {}
        self.current: _Round | None = None
        self.final_bytes_down: dict[str, int] = {}  # the final model delivered to each site after the last round
        self.finetune_history: list[dict] = []  # hybrid mode: one entry per finished fine-tuning round
        self._reference = None  # the model sent in the open fine-tuning round (the shapes updates must have)
        self.device = pick_device()
        self._test = None

    # ---- opening and resuming -------------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: CoordinatorConfig, spec: ConsortiumConfig, *, engine: str,
             sites: dict[str, SiteConfig] | None = None, site_intensity: Intensity | None = None,
             console: Console | None = None, no_dp: bool = False) -> CoordinatorRun:
        """Open (or resume) the run of `cfg` for the consortium `spec`. `sites`: the site configs an engine that runs
        the sites itself has loaded (in-process: their fine-tuning plans are checked and their ledgers copied into the
        run directory); `site_intensity`: the scaling those sites share, for the test split. `no_dp` (baselines,
        positive controls) accepts non-private offers, recorded as epsilon = inf."""
        if no_dp:
            spec = spec.model_copy(update={"sites": {s: b.model_copy(update={"dp": False})
                                                     for s, b in spec.sites.items()}})
        run = cls(cfg, spec, sites or {}, engine=engine, console=console or Console(), site_intensity=site_intensity)
        run._check_quorum()
        run._check_finetune_plans()
        run._check_architecture()
        run._resume()
        return run

    def _check_quorum(self) -> None:
        """A quorum larger than the consortium could never be met: refused before any site is asked (and pays)."""
        n = len(self.expected_sites)
        if self.min_sites > n:
            raise CoordinatorError("coordinator config: min_sites", f"{self.min_sites} is more than the {n} site(s) "
                                   "of the consortium, so no round could complete",
                                   f"set min_sites to at most {n} (1, the default: any accepted offer completes a "
                                   "round)")

    def _check_finetune_plans(self) -> None:
        """Hybrid mode: every in-process DP site must have planned at least `finetune.rounds` fine-tuning rounds
        (its budget was split for them before its first release); the coordinator knows no plan under Flower."""
        k = self.cfg.finetune.rounds
        for sid, site in sorted(self.sites.items()):
            planned = site.privacy.finetune_rounds
            if k > planned and self.spec.sites[sid].dp:
                raise CoordinatorError(f"{site.source}: privacy.finetune_rounds", f"site {sid!r} planned {planned} "
                                       f"fine-tuning round(s), the coordinator's `finetune.rounds` asks for {k}",
                                       "agree the number before the first round: set privacy.finetune_share and "
                                       f"privacy.finetune_rounds >= {k} at every site, or lower finetune.rounds")
            if k == 0 and planned:
                self.console.print(f"[yellow]{sid} keeps part of its budget for {planned} fine-tuning round(s) "
                                   "(privacy.finetune_share) but `finetune.rounds` is 0: that part stays unspent[/]")

    def _check_architecture(self) -> None:
        """The global model's architecture must run on the consortium's images (DenseNet121 pools 32x and its
        instance norm needs more than one value per map): one forward pass on random images before any round."""
        tc, shape = self.cfg.train, (self.spec.channels, *self.spec.spatial_size)
        try:
            with torch.no_grad():
                model_for(shape, len(self.spec.classes), architecture=tc.architecture, width=tc.width,
                          seed=0).train()(torch.rand(2, *shape))
        except (RuntimeError, ValueError) as e:
            raise CoordinatorError("coordinator config: train.architecture",
                                   f"{tc.architecture} does not run on images of {list(shape)} (channels, "
                                   f"*spatial_size): {e}"[:400], "choose `convnet3`, or larger images "
                                   "(data.spatial_size, e.g. 64 per side or more for densenet121)") from None

    def _resume(self) -> None:
        ckpt = self.dir.checkpoint
        if not ckpt.is_file():
            if self.dir.run_json.is_file():
                raise CoordinatorError(str(self.out), "holds a run without a checkpoint (not written by this "
                                       "version or damaged)", "choose a new `output` folder")
            return
        state = json.loads(ckpt.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise CoordinatorError(str(ckpt), "belongs to a run with a different coordinator config or consortium",
                                   "choose a new `output` folder, or restore the config the run started with")
        self.history = state["history"]
        self.bindings = state["bindings"]
        self.last_epsilon = {k: float(v) for k, v in state["last_epsilon"].items()}
        self.finetune_history = state.get("finetune", [])
        done = len(self.history)
        if self.complete:
            tuned = f", {len(self.finetune_history)} fine-tuning round(s)" if self.finetune_history else ""
            self.console.print(f"run in {self.out} is already complete ({done} round(s){tuned}); use a new `output` "
                               "to run again")
        elif self.finetune_history:
            self.console.print(f"resuming {self.out} after fine-tuning round {len(self.finetune_history)} of "
                               f"{self.cfg.finetune.rounds}")
        elif done:
            self.console.print(f"resuming {self.out} after round {done} of {self.rounds}")

    @property
    def next_round(self) -> int | None:
        r = len(self.history) + 1
        return r if r <= self.rounds else None

    @property
    def next_finetune_round(self) -> int | None:
        """Hybrid mode: the next fine-tuning round, once every distillation round is done (None: none left)."""
        k = len(self.finetune_history) + 1
        return k if self.next_round is None and k <= self.cfg.finetune.rounds else None

    @property
    def complete(self) -> bool:
        return self.next_round is None and self.next_finetune_round is None

    # ---- one round --------------------------------------------------------------------------------------------
    def broadcast(self) -> Broadcast:
        r = self.next_round
        if r is None:
            raise CoordinatorError(str(self.out), "all planned rounds are done", "start a new run")
        # the previous round's own file, not the top-level copy: a coordinator killed between writing the new
        # top-level model and its checkpoint resumes round r with round r-1's model, as the sites were promised
        model = self.dir.round_model(r - 1).read_bytes() if r > 1 else None
        b = Broadcast(r, model)
        self.current = _Round(r)
        return b

    def sent(self, recipient: str, nbytes: int) -> None:
        """Count a broadcast actually sent (the engine calls it per recipient: a site that never connected got
        nothing)."""
        rd = self._round()
        rd.bytes_down[recipient] = rd.bytes_down.get(recipient, 0) + int(nbytes)

    def receive(self, offer: SiteOffer, *, sender: str) -> bool:
        """Validate and keep an offer; a rejected one is logged with its reason and the round goes on."""
        rd = self._round(finetune=False)
        sid = str(offer.site_id)
        accepted = self._admit(rd, offer, sender, lambda: validate_offer(offer, self.spec,
                                                                         previous_epsilon=self.last_epsilon.get(sid)))
        if accepted is None:
            return False
        eps = accepted.meta["epsilon"]
        self.console.print(f"[green]accepted[/] {sid}: {len(accepted.labels)} images, epsilon "
                           f"{'inf (NON-PRIVATE)' if not math.isfinite(eps) else f'{eps:.3g}'}, "
                           f"{accepted.nbytes / 1024:.1f} KiB")
        return True

    def _admit(self, rd: _Round, msg: SiteOffer | LocalUpdate, sender: str, validate):
        """Check the sender's identity, count the bytes and `validate()` an offer or update; keep and return what was
        accepted, or log a rejection with its reason and return None (the round goes on)."""
        sid = str(msg.site_id)
        try:
            try:
                check_identity(msg, sender, spec=self.spec, bindings=self.bindings, received=set(rd.accepted),
                               round_=rd.round)
            except OfferRejected as e:  # what was sent is counted; a claimed identity that fails, under its sender
                who = f"{sid} from {sender}" if e.reason in (Reason.UNKNOWN_SITE, Reason.SPOOFED_SITE) else sid
                rd.bytes_up[who] = rd.bytes_up.get(who, 0) + msg.nbytes()
                raise
            rd.bytes_up[sid] = rd.bytes_up.get(sid, 0) + msg.nbytes()
            accepted = validate()
        except OfferRejected as e:
            rd.rejected.append({"site_id": sid, "sender": sender, "reason": e.reason.value, "detail": e.detail})
            self.console.print(f"[yellow]rejected[/] {rd.what} from {sid!r} ({rd.name}): {e.reason.value}: "
                               f"{e.detail}")
            return None
        self.bindings.setdefault(sender, sid)
        rd.accepted[sid] = accepted
        return accepted

    def no_answer(self, site: str, reason: str, *, code: Reason = Reason.NO_ANSWER, nbytes: int = 0) -> None:
        """Record a site without a usable offer; `nbytes` is what it sent anyway (an unreadable or spoofed offer),
        counted as bytes up under `site`."""
        rd = self._round()
        if nbytes:
            rd.bytes_up[site] = rd.bytes_up.get(site, 0) + int(nbytes)
        rd.rejected.append({"site_id": site, "sender": None, "reason": code.value, "detail": reason})
        self.console.print(f"[yellow]no offer[/] from {site!r} (round {rd.round}): {reason}")

    def _round(self, finetune: bool | None = None) -> _Round:
        if self.current is None:
            raise CoordinatorError("coordinator", "no round is open", "call broadcast() or finetune_task() first")
        if finetune is not None and self.current.finetune != finetune:
            kind = "fine-tuning" if self.current.finetune else "distillation"
            raise CoordinatorError("coordinator", f"the open round is a {kind} round",
                                   "receive offers in distillation rounds and updates in fine-tuning rounds")
        return self.current

    def finish_round(self) -> dict:
        rd = self._round(finetune=False)
        seconds = {"sites": time.perf_counter() - rd.started}
        self._close_sites(rd, "no site offered a usable synthetic set")
        t = time.perf_counter()
        k = len(self.spec.classes)
        merged = merge(list(rd.accepted.values()), self.cfg, num_classes=k, seed=self.cfg.seed + rd.round,
                       device=self.device)
        seconds["merge"] = time.perf_counter() - t
        trained_on = self._training_rounds(rd.round)
        training = union_of_rounds([self._round_set(r) for r in trained_on[:-1]] + [merged])
        t = time.perf_counter()
        tc = self.cfg.train
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=self.console) as bar:
            task = bar.add_task(f"round {rd.round}: training the global model (epochs)", total=tc.epochs)
            model = train_classifier(training.images, training.labels, k,
                                     TrainSettings(epochs=tc.epochs, lr=tc.lr, batch_size=tc.batch_size,
                                                   width=tc.width, augment=tc.augment, architecture=tc.architecture),
                                     seed=self.cfg.seed + rd.round, device=self.device,
                                     weights=training.training_weights,
                                     on_epoch=lambda done: bar.update(task, completed=done))
        seconds["train"] = time.perf_counter() - t
        t = time.perf_counter()
        metrics = self._test_metrics(model)
        seconds["evaluate"] = time.perf_counter() - t
        self._write_round_files(rd, merged, model)
        for sid, acc in rd.accepted.items():
            self.last_epsilon[sid] = acc.meta["epsilon"]
        outcomes = self._outcomes(rd)
        self.history.append({
            "round": rd.round, "accepted": sorted(rd.accepted), "rejected": rd.rejected,
            "n_merged": int(len(merged.labels)), "class_counts": np.bincount(merged.labels, minlength=k).tolist(),
            "class_weight": np.bincount(merged.labels, weights=merged.weights, minlength=k).round(3).tolist(),
            **({"merge_note": merged.note} if merged.note else {}),
            "trained_on_rounds": trained_on, "n_trained_on": int(len(training.labels)),
            "epsilon": {s: a.meta["epsilon"] for s, a in sorted(rd.accepted.items())},
            "bytes_up": rd.bytes_up, "bytes_down": rd.bytes_down, "seconds": seconds, "metrics": metrics,
            "quorum": self._quorum(rd),
            "per_site": {s: {"accepted": s in rd.accepted, "outcome": outcomes[s],
                             "bytes_up": rd.bytes_up.get(s, 0),
                             "bytes_down": rd.bytes_down.get(s, 0),
                             "epsilon": rd.accepted[s].meta["epsilon"] if s in rd.accepted else None,
                             "privacy_unit": rd.accepted[s].meta.get("privacy_unit", "scan")
                             if s in rd.accepted else None}
                         for s in self.expected_sites}})
        self.current = None
        self._checkpoint()
        if self.complete:
            self._export_bundle(model, metrics)
        self._write_run_json(status="completed" if self.complete else "running")
        self._write_progress()
        self._print_round(self.history[-1])
        return self.history[-1]

    def _close_sites(self, rd: _Round, none_usable: str) -> None:
        """Record the expected sites that sent nothing this round; below the quorum (`min_sites` accepted) the run
        stops here: run.json says so (`status: failed`, `stopped`), the checkpoint keeps the finished rounds, and a
        resumed run asks the sites for this round again (each reuses its charge: nothing is paid twice)."""
        for s in self.expected_sites:
            if s not in rd.accepted and not any(x["site_id"] == s for x in rd.rejected):
                self.no_answer(s, f"no {rd.what} received this round")
        if len(rd.accepted) >= self.min_sites:
            return
        outcomes = self._outcomes(rd)
        reason = none_usable if not rd.accepted else (
            f"quorum not met: {len(rd.accepted)} of {len(self.expected_sites)} site(s) accepted, min_sites is "
            f"{self.min_sites}")
        stopped = {"round": rd.round, "finetune": rd.finetune, "reason": reason, **self._quorum(rd),
                   "accepted": sorted(rd.accepted),
                   "answered": sorted(s for s, o in outcomes.items() if o not in _SILENT),
                   "missing": {s: o for s, o in outcomes.items() if o != "accepted"}}
        self._checkpoint()  # the finished rounds (none, in round 1): the stopped run resumes with this round
        self._write_run_json(status="failed", stopped=stopped)
        raise CoordinatorError(rd.name, f"{reason} (rejected: {[(x['site_id'], x['reason']) for x in rd.rejected]})",
                               "see the reasons above; fix or restart the missing sites (or lower min_sites) and "
                               "resume the run")

    def _quorum(self, rd: _Round) -> dict:
        return {"min_sites": self.min_sites, "n_accepted": len(rd.accepted), "n_sites": len(self.expected_sites),
                "met": len(rd.accepted) >= self.min_sites}

    def _outcomes(self, rd: _Round) -> dict[str, str]:
        """Expected site -> `accepted`, or the reason code of its first rejection this round."""
        first: dict[str, str] = {}
        for x in rd.rejected:
            first.setdefault(x["site_id"], x["reason"])
        return {s: "accepted" if s in rd.accepted else first.get(s, Reason.NO_ANSWER.value)
                for s in self.expected_sites}

    def _test_metrics(self, model) -> dict | None:
        """The model's scores on the coordinator's test set (loaded once), or None without one."""
        if self._test is None:
            self._test = load_test_set(self.cfg, self.spec, self.out, self.site_intensity)
        if self._test is None:
            return None
        return evaluate(model.to(self.device), self._test[0], self._test[1], len(self.spec.classes))

    # ---- hybrid mode: DP fine-tuning rounds after the last distillation round ------------------------------------
    def finetune_task(self) -> FinetuneRound:
        """Open the next fine-tuning round: the model to fine-tune (round 1: the last distillation round's global
        model, also kept as warm_start_model.safetensors; later: the previous round's average) and the recipe."""
        k = self.next_finetune_round
        if k is None:
            raise CoordinatorError(str(self.out), "no fine-tuning round is due (distillation rounds remain, or all "
                                   "fine-tuning rounds are done)", "finish the distillation rounds first")
        src = self._finetune_model_path(k - 1)
        if k == 1:
            atomic_write_bytes(self.dir.warm_start_model, src.read_bytes())
        self._reference = load_model(src)
        self.current = _Round(k, finetune=True)
        return FinetuneRound(k, src.read_bytes(), self.cfg.finetune.model_dump(mode="json"))

    def _finetune_model_path(self, k: int) -> Path:
        """The model after fine-tuning round k (k = 0: the warm start, the last distillation round's model)."""
        if k == 0:
            return self.dir.round_model(self.rounds)
        return self.dir.finetune_model(k)

    def receive_update(self, update: LocalUpdate, *, sender: str) -> bool:
        """Validate and keep a site's fine-tuned model; a rejected one is logged with its reason, the round goes on."""
        rd = self._round(finetune=True)
        sid = str(update.site_id)  # a path part only once check_identity has accepted it
        return self._admit(rd, update, sender, lambda: validate_update(
            update, self.spec, reference=self._reference, recipe=self.cfg.finetune,
            received=self.dir.finetune_update(rd.round, sid),
            previous_epsilon=self.last_epsilon.get(sid))) is not None

    def finish_finetune_round(self) -> dict:
        """Average the accepted models (weighted by n~), evaluate, write the round's files and checkpoint."""
        rd = self._round(finetune=True)
        seconds = {"sites": time.perf_counter() - rd.started}
        self._close_sites(rd, "no site returned a usable model")
        updates: dict[str, AcceptedUpdate] = rd.accepted
        model = average(list(updates.values()), self._reference)
        t = time.perf_counter()
        metrics = self._test_metrics(model)
        seconds["evaluate"] = time.perf_counter() - t
        save_model(self._finetune_model_path(rd.round), model)
        save_model(self.dir.global_model, model)
        for sid in updates:
            self.last_epsilon[sid] = updates[sid].meta["epsilon"]
            ledger = self._site_ledger(sid)
            if ledger is not None:  # the run's copy of the site's ledger, with its fine-tuning charges
                atomic_write_bytes(self.dir.site_ledger(sid), ledger.read_bytes())
        per = {key: {s: u.meta[key] for s, u in sorted(updates.items())}
               for key in ("epsilon", "noise_multiplier", "sample_rate", "steps")}
        self.finetune_history.append({
            "round": rd.round, "accepted": sorted(updates), "rejected": rd.rejected, **per,
            "weights": {s: u.weight for s, u in sorted(updates.items())}, "quorum": self._quorum(rd),
            "bytes_up": rd.bytes_up, "bytes_down": rd.bytes_down, "seconds": seconds, "metrics": metrics})
        self.current = self._reference = None
        self._checkpoint()
        if self.complete:
            self._export_bundle(model, metrics)
        self._write_run_json(status="completed" if self.complete else "running")
        self._write_progress()
        self._print_finetune_round(self.finetune_history[-1])
        return self.finetune_history[-1]

    def _training_rounds(self, r: int) -> list[int]:
        """The rounds whose merged sets round r's global model trains on (`train_rounds`), ending with r."""
        n = self.cfg.train_rounds
        return list(range(1 if n == 0 else max(1, r - n + 1), r + 1))

    def _round_set(self, r: int) -> MergedSet:
        """An earlier round's merged set, as this run wrote it (np.load without pickle)."""
        path = self.dir.round_merged(r)
        if not path.is_file():
            raise CoordinatorError(str(path), f"round {r}'s merged set is missing (`train_rounds` needs it)",
                                   "restore the run folder, or set `train_rounds: 1`")
        return load_merged(path)

    # ---- after the last round: the final model goes back to the sites ----------------------------------------
    def final_model(self) -> Broadcast | None:
        """The final global model for the sites, or None while rounds remain. The same message as a broadcast; the
        engine sends it with its delivery type (`medfdd.site.offer.receive_final_model`), so nothing is
        distilled or paid for it."""
        path = self.dir.global_model
        if not self.complete or not self.history or not path.is_file():
            return None
        return Broadcast(len(self.history), path.read_bytes())

    def delivered(self, site: str, nbytes: int) -> None:
        """Count the final model delivered to `site` (run.json: `final_model_bytes_down`)."""
        self.final_bytes_down[site] = self.final_bytes_down.get(site, 0) + int(nbytes)
        self._write_run_json(status="completed")

    # ---- files ------------------------------------------------------------------------------------------------
    def _write_round_files(self, rd: _Round, merged, model) -> None:
        rdir = self.dir.round(rd.round)
        atomic_save_npz(self.dir.round_merged(rd.round), images=merged.images, labels=merged.labels, weights=merged.weights)
        save_model(self.dir.round_model(rd.round), model)
        for sid, acc in rd.accepted.items():  # what each site sent, as received
            site_dir = self.dir.site(sid)
            meta = {k: v for k, v in acc.meta.items() if k != "medfdd_version"}
            released = SyntheticSet(acc.images, acc.labels, meta)
            save_synthetic(self.dir.round_release(rd.round, sid), released)  # every round's release stays (the audit's DCR target)
            save_synthetic(site_dir, released)
            save_preview(site_dir / "synthetic_preview.png", acc.images, acc.labels, list(self.spec.classes),
                         title=f"{sid} round {rd.round} (as received)")
            ledger = self._site_ledger(sid)
            if ledger is not None:
                atomic_write_bytes(self.dir.site_ledger(sid), ledger.read_bytes())
        # a bounded grid: all images of 20 sites drew a 14,000-pixel-wide figure (600 MiB, 30 MiB per site)
        save_preview(rdir / "merged_preview.png", merged.images, merged.labels, list(self.spec.classes),
                     title=f"merged set, round {rd.round} ({self.cfg.merge}): {len(merged.labels)} images, the first "
                     f"{MERGED_PREVIEW_COLS} per class", max_cols=MERGED_PREVIEW_COLS)
        # the latest round's model and set at the top level (atomic copies)
        atomic_save_npz(self.dir.merged, images=merged.images, labels=merged.labels,
                        weights=merged.weights)
        save_model(self.dir.global_model, model)

    def _export_bundle(self, model, metrics: dict | None) -> None:
        """The final global model as a MONAI bundle (`medfdd.coordinator.bundle`), preprocessing as the sites'."""
        data = DataConfig(root=self.out, classes=self.spec.classes, spatial_size=self.spec.spatial_size,
                          channels=self.spec.channels, intensity=scan_intensity(self.cfg, self.site_intensity),
                          **(self.cfg.test.geometry() if self.cfg.test is not None else {}))
        export_bundle(model, self.dir.bundle, data, run_name=self.out.name,
                      accuracy=None if metrics is None else metrics.get("accuracy"))

    def _site_ledger(self, sid: str) -> Path | None:
        """In-process runs can copy the site's own ledger (same machine); under Flower it stays at the site."""
        site = self.sites.get(sid)
        if site is None:
            return None
        ledger = site.output_dir / LEDGER_FILENAME
        return ledger if ledger.is_file() else None

    def _checkpoint(self) -> None:
        atomic_write_json(self.dir.checkpoint, json_safe({
            "fingerprint": self.fingerprint, "history": self.history, "bindings": self.bindings,
            "last_epsilon": self.last_epsilon, "finetune": self.finetune_history}))

    def _write_run_json(self, status: str, stopped: dict | None = None) -> Path:
        done = [h for h in self.history if h.get("metrics") is not None]
        last = self.history[-1] if self.history else None
        up = sum(sum(h["bytes_up"].values()) for h in self.history + self.finetune_history)
        down = sum(sum(h["bytes_down"].values()) for h in self.history + self.finetune_history)
        final = None
        if last is not None:
            tuned = self.finetune_history[-1] if self.finetune_history else None  # hybrid: the fine-tuned model
            metrics = last["metrics"] if tuned is None else tuned["metrics"]
            final = {**(metrics or {}), "round": last["round"], "bytes_up_total": up, "bytes_down_total": down,
                     "bytes_up": up, "bytes_down": down, "n_merged": last["n_merged"],  # totals over sites and rounds
                     **({"finetune_round": tuned["round"]} if tuned else {})}
        finetune = None
        if self.cfg.finetune.rounds:
            finetune = {"recipe": self.cfg.finetune.model_dump(mode="json"), "rounds": self.finetune_history,
                        "warm_start": {"model": self.dir.warm_start_model.name, "round": self.rounds,
                                       "metrics": self.history[self.rounds - 1]["metrics"]
                                       if len(self.history) >= self.rounds else None}}
        run = {
            "medfdd_version": __version__, "engine": self.engine, "status": status,
            "config": json.loads(self.cfg.model_dump_json()), "consortium": json.loads(self.spec.model_dump_json()),
            "classes": list(self.spec.classes), "spatial_size": list(self.spec.spatial_size), "seed": self.cfg.seed,
            "sites": {s: {"config": str(self.sites[s].source) if s in self.sites else None,
                          "epsilon_budget": self.spec.sites[s].epsilon if self.spec.sites[s].dp else math.inf,
                          "delta": self.spec.sites[s].delta, "dp": self.spec.sites[s].dp,
                          # composed over every accepted release (count, distillation and fine-tuning rounds)
                          "epsilon_spent": self.last_epsilon.get(s)}
                      for s in self.expected_sites},
            "rounds": self.history, "rounds_evaluated": len(done), "final": final, "finetune": finetune,
            "final_model_bytes_down": dict(sorted(self.final_bytes_down.items())),
            **({"stopped": stopped} if stopped else {})}
        return atomic_write_json(self.dir.run_json, json_safe(run))

    def _write_progress(self) -> Path:
        """progress.png: the finished rounds' test accuracy and each site's epsilon spent, against its budget."""
        points = run_progress({"rounds": self.history, "finetune": {"rounds": self.finetune_history}})
        budgets = {s: b.epsilon if b.dp else math.inf for s, b in self.spec.sites.items()}
        return atomic_write_bytes(self.dir.progress, progress_png(points, budgets, f"run {self.out.name}: global "
                                                                  "model accuracy and epsilon spent, per round"))

    def _print_round(self, h: dict) -> None:
        t = Table(title=f"round {h['round']} of {self.rounds}: {len(h['accepted'])} of {len(self.expected_sites)} "
                        f"site(s) accepted, {h['n_merged']} merged images")
        for col in ("site", "status", "epsilon", "KiB up", "KiB down"):
            t.add_column(col, justify="right")
        rejected = {x["site_id"]: x["reason"] for x in h["rejected"]}
        for s in self.expected_sites:
            eps = h["epsilon"].get(s)
            t.add_row(s, "accepted" if s in h["accepted"] else f"[yellow]{rejected.get(s, 'missing')}[/]",
                      "-" if eps is None else ("inf" if not math.isfinite(eps) else f"{eps:.3g}"),
                      f"{h['bytes_up'].get(s, 0) / 1024:.1f}", f"{h['bytes_down'].get(s, 0) / 1024:.1f}")
        self.console.print(t)
        if h.get("merge_note"):
            self.console.print(f"[yellow]merge ({self.cfg.merge}):[/] {h['merge_note']}")
        m = h["metrics"]
        if m:
            self.console.print(f"global model: accuracy {m['accuracy']:.3f}, balanced accuracy "
                               f"{m['balanced_accuracy']:.3f}, macro AUC {m['auc']:.3f} on {m['n']} test images")

    def _print_finetune_round(self, h: dict) -> None:
        t = Table(title=f"fine-tuning round {h['round']} of {self.cfg.finetune.rounds}: {len(h['accepted'])} of "
                        f"{len(self.expected_sites)} site(s) accepted")
        for col in ("site", "status", "epsilon", "sigma", "q", "steps", "KiB up", "KiB down"):
            t.add_column(col, justify="right")
        rejected = {x["site_id"]: x["reason"] for x in h["rejected"]}
        for s in self.expected_sites:
            ok = s in h["accepted"]
            eps = h["epsilon"].get(s)
            t.add_row(s, "accepted" if ok else f"[yellow]{rejected.get(s, 'missing')}[/]",
                      "-" if eps is None else ("inf" if not math.isfinite(eps) else f"{eps:.3g}"),
                      f"{h['noise_multiplier'][s]:.3g}" if ok else "-", f"{h['sample_rate'][s]:.3g}" if ok else "-",
                      str(h["steps"][s]) if ok else "-", f"{h['bytes_up'].get(s, 0) / 1024:.1f}",
                      f"{h['bytes_down'].get(s, 0) / 1024:.1f}")
        self.console.print(t)
        m = h["metrics"]
        if m:
            self.console.print(f"fine-tuned global model: accuracy {m['accuracy']:.3f}, balanced accuracy "
                               f"{m['balanced_accuracy']:.3f}, macro AUC {m['auc']:.3f} on {m['n']} test images")

    def close(self) -> Path:
        self.console.print(f"run directory: {self.out}")
        return self.out
