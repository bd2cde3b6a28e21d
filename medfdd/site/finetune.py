"""The site's side of a hybrid-mode fine-tuning round: one round of DP-FedAvg (McMahan et al., "Learning
Differentially Private Recurrent Language Models", ICLR 2018) with local DP-SGD (Abadi et al. 2016, `medfdd.finetune.dpsgd`).

Order (privacy invariants 1-4, 8, 9): refuse a received model that is not the agreed architecture -> load the training
split -> plan: q = batch_size / n~ (n~ the site's DP record count, `privacy.count_noise`), steps = local_epochs x
ceil(n~ / batch_size), noise calibrated by Opacus so that every ledger entry (record count, distillation rounds,
all `privacy.finetune_rounds` fine-tuning rounds) composes to the site's epsilon -> charge the ledger write-ahead
(purpose "finetune", one entry per round, bound to its release: the training records' content and labels, the
received model, the recipe, the keyed seed, the device) -> DP-SGD -> return only the local model's weights and the
allow-listed metadata. A repeated round with the same inputs replays its keyed noise under its charge; with anything
changed it is a ChargeConflict.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform

import numpy as np
import torch
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medfdd.artifacts import load_agreed_model, save_model
from medfdd.config import FinetuneConfig, SiteConfig
from medfdd.data.records import RecordView, byte_chunks
from medfdd.errors import ConfigError
from medfdd.finetune.dpsgd import DPSGDPlan, dp_sgd
from medfdd.io import atomic_write_bytes, json_safe
from medfdd.messages import UPDATE_META, FinetuneRound, LocalUpdate
from medfdd.site.budget import open_ledger
from medfdd.site.check import load_with_progress
from medfdd.site.distill import DistillError
from medfdd.site.noise_key import KEY_FILENAME, keyed_seed, load_or_create
from medfdd.site.record_count import private_record_count
from medfdd.training import pick_device
from privacy.accounting import (
    PURPOSE_FINETUNE,
    BudgetExceeded,
    Charge,
    ChargeConflict,
    PrivacyLedger,
    calibrate_round_noise,
)

PURPOSE = PURPOSE_FINETUNE


def plan_finetune(cfg: SiteConfig, ledger: PrivacyLedger, recipe: FinetuneConfig, *, round_: int, n_train: int,
                  seed: int, dp: bool) -> DPSGDPlan:
    """The DP-SGD plan of fine-tuning round `round_`: q = batch_size / n~ and the noise that makes all the site's
    entries compose to `privacy.epsilon` (`calibrate_round_noise` with `already_spent`, as `plan_privacy` does). The
    record count is paid here if no distillation round paid it. A paid round keeps its noise multiplier (the ledger
    refuses it if q or steps changed)."""
    if not dp:
        q = min(1.0, recipe.batch_size / n_train)
        return DPSGDPlan(0.0, q, recipe.local_epochs * math.ceil(n_train / recipe.batch_size), recipe.clip_norm,
                         q * n_train)
    paid = ledger.find_charge(round_, PURPOSE)
    if paid is None and round_ > cfg.privacy.finetune_rounds:  # refused before anything (the count) is paid
        raise BudgetExceeded(f"{cfg.site_id}: privacy.finetune_rounds", f"fine-tuning round {round_} is beyond the "
                             f"planned {cfg.privacy.finetune_rounds} (spent so far {ledger.epsilon_spent:.4g} of "
                             f"epsilon = {cfg.privacy.epsilon:g})",
                             "plan the fine-tuning rounds before the first distillation round (privacy.finetune_share "
                             "and privacy.finetune_rounds), or agree a new budget")
    private_n = cfg.privacy.count_noise is not None
    n = private_record_count(cfg, ledger, n=n_train, seed=seed) if private_n else n_train
    q = min(1.0, recipe.batch_size / n)
    steps = recipe.local_epochs * math.ceil(n / recipe.batch_size)
    if paid is not None:  # a repeated or resumed round: the noise it paid for
        return DPSGDPlan(paid.noise_multiplier, q, steps, recipe.clip_norm, q * n)
    if cfg.privacy.delta >= 1.0 / n:
        raise DistillError(f"{cfg.site_id}: privacy.delta", f"delta = {cfg.privacy.delta:g} is not below 1/n = 1/{n} "
                           f"(n = {'the DP estimate of the ' if private_n else ''}training records)",
                           "set privacy.delta well below 1/n, e.g. 1e-5")
    earlier = [e for e in ledger.entries if (e.round, e.purpose) != (round_, PURPOSE)]
    remaining = max(1, cfg.privacy.finetune_rounds - len({e.round for e in earlier if e.purpose == PURPOSE}))
    sigma = calibrate_round_noise(epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, sample_rate=q,
                                  steps_per_round=steps, rounds=remaining, already_spent=earlier,
                                  accountant=cfg.privacy.accountant)
    return DPSGDPlan(sigma, q, steps, recipe.clip_norm, q * n)


# what a change of each part of a fine-tuning release fingerprint means (tags of `release_fingerprint`, in its order)
RELEASE_PARTS = {
    "k": "the site's noise key or the config's seed",
    "l": "the training records' labels (labels.csv)",
    "c": "the training records' content (the scans' pixels, their number or order, or their preprocessing)",
    "s": "the coordinator's recipe or this round's privacy plan",
    "r": "the device or torch build",
    "g": "the model received to fine-tune",
}


def release_fingerprint(*, seed: int, round_: int, recipe: FinetuneConfig, plan: DPSGDPlan, device: torch.device,
                        x: np.ndarray | RecordView, y: np.ndarray, model: bytes) -> str:
    """What a fine-tuning charge pays for (DESIGN invariant 9), as the distillation's fingerprint: a digest of all
    parts, then an 8-hex tag per part (`RELEASE_PARTS`), every digest keyed by the secret keyed seed (the ledger may
    travel; a plain digest of the records would let anyone test candidate data sets)."""
    key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()

    def digest(*chunks: bytes | memoryview) -> bytes:
        h = hashlib.blake2b(key=key, digest_size=16)
        for chunk in chunks:
            h.update(chunk)
        return h.digest()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    parts = {
        "k": digest(b"noise key"),
        "l": digest(*byte_chunks(y)),
        "c": digest(*byte_chunks(x)),
        "s": digest(json.dumps([round_, recipe.model_dump(mode="json"), plan.__dict__], sort_keys=True).encode()),
        "r": digest(json.dumps([str(device), name, torch.__version__]).encode()),
        "g": digest(b"model", model),
    }
    return digest(*parts.values()).hex() + ":" + ",".join(f"{t}={d.hex()[:8]}" for t, d in parts.items())


def _check_paid_release(ledger: PrivacyLedger, round_: int, release: str) -> None:
    """A charged fine-tuning round reruns only on exactly the inputs it was charged for: its keyed noise on other
    inputs would publish their difference without noise. Names what changed (ChargeConflict), before any charge."""
    paid = ledger.find_charge(round_, PURPOSE)
    if paid is None or paid.release == release:
        return

    def tags(fingerprint: str | None) -> dict[str, str]:
        tail = (fingerprint or "").partition(":")[2]
        return dict(p.split("=", 1) for p in tail.split(",") if "=" in p)

    before, now = tags(paid.release), tags(release)
    changed = [RELEASE_PARTS["k"]] if before.get("k") != now["k"] else \
        [RELEASE_PARTS[t] for t in now if before.get(t) != now[t]]
    raise ChargeConflict(f"{ledger.path} (fine-tuning round {round_})",
                         f"fine-tuning round {round_} was already charged for a release, and this run would publish "
                         f"another one under that charge; changed since: {'; '.join(changed) or 'an input'}. "
                         "Nothing was released",
                         f"to resume or replay fine-tuning round {round_}, restore exactly the inputs it was charged "
                         "for; anything else is a new round (within privacy.finetune_rounds and the budget left)")


def finetune_site(cfg: SiteConfig, task: FinetuneRound, *, console: Console | None = None,
                  no_dp: bool = False) -> LocalUpdate:
    """Run fine-tuning round `task.round` at this site; returns the local model and allow-listed metadata."""
    console = console or Console()
    dp = cfg.privacy.dp and not no_dp
    recipe = _recipe(task, cfg.site_id)
    received = atomic_write_bytes(cfg.output_dir / "received" / f"finetune-round-{task.round}.safetensors",
                                  task.model)
    # a model that is not the agreed architecture (or holds NaN/Inf) is refused before anything is charged
    model = load_agreed_model(received, in_channels=cfg.data.channels, num_classes=len(cfg.data.classes),
                              spatial_size=cfg.data.spatial_size)
    data = load_with_progress(cfg, console)
    if len(data.train) == 0:
        raise DistillError(f"{cfg.site_id}: data", "the training split is empty",
                           "run `medfdd site check` and fix the quarantined rows")
    x, y = RecordView(data.images, data.train), data.labels[data.train]  # read by index (a Poisson sample)
    device = pick_device(cfg.device)
    ledger = open_ledger(cfg, dp)
    seed = keyed_seed(load_or_create(cfg.output_dir / KEY_FILENAME), cfg.seed)
    plan = plan_finetune(cfg, ledger, recipe, round_=task.round, n_train=len(y), seed=seed, dp=dp)
    release = release_fingerprint(seed=seed, round_=task.round, recipe=recipe, plan=plan, device=device, x=x, y=y,
                                  model=task.model)
    _check_paid_release(ledger, task.round, release)
    # write-ahead: the whole round is on the ledger before the first noisy step
    ledger.charge(Charge(plan.noise_multiplier, plan.sample_rate, plan.steps, round=task.round, purpose=PURPOSE,
                         dp=dp, release=release))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        t = bar.add_task(f"{cfg.site_id}: DP fine-tuning round {task.round}", total=plan.steps)
        local = dp_sgd(model, x, torch.as_tensor(y), plan, lr=recipe.lr, seed=seed,
                       round_=task.round, device=device, on_step=lambda s: bar.update(t, completed=s))
    path = save_model(cfg.output_dir / "finetune" / f"local-round-{task.round}.safetensors", local.cpu())
    eps = ledger.epsilon_spent
    console.print(f"{cfg.site_id}: fine-tuning round {task.round} done ({plan.steps} DP-SGD steps, sigma "
                  f"{plan.noise_multiplier:.3g}, q {plan.sample_rate:.3g}); "
                  f"{'NON-PRIVATE (eps = inf)' if not dp else f'eps {eps:.3g} of {cfg.privacy.epsilon:g}'}")
    # invariant 5: the metadata is the allow-list, in its order
    meta = dict(zip(UPDATE_META, (cfg.site_id, task.round, json_safe(eps),
                                  plan.noise_multiplier, plan.sample_rate, plan.steps), strict=True))
    return LocalUpdate(cfg.site_id, task.round, path.read_bytes(), meta)


def _recipe(task: FinetuneRound, site_id: str) -> FinetuneConfig:
    """The broadcast recipe as a typed config (a malformed one is a ConfigError naming the key)."""
    where = f"{site_id}: fine-tuning recipe of round {task.round}"
    if not isinstance(task.recipe, dict):
        raise ConfigError(where, f"is a {type(task.recipe).__name__}, not a mapping", "the coordinator must send "
                          "its `finetune` settings")
    try:
        return FinetuneConfig.model_validate(task.recipe)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{where}: key '{'.'.join(map(str, err['loc']))}'", err["msg"],
                          "the coordinator must send valid `finetune` settings") from None
