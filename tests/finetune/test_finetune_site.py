"""Hybrid mode, site side (`medfdd.finetune`): the fine-tuning round is planned from n~, charged write-ahead, replays
under its charge, refuses a changed or unplanned round, and draws float64 noise; the coordinator's checks of updates."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import hybrid_sites
from pydantic import ValidationError
from rich.console import Console
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from medfdd.artifacts import save_model
from medfdd.config import (
    ConsortiumConfig,
    FinetuneConfig,
    PrivacyConfig,
    SiteBudget,
    load_site_config,
)
from medfdd.coordinator.average import average, validate_update
from medfdd.coordinator.validate import OfferRejected, Reason
from medfdd.errors import ConfigError
from medfdd.finetune import dpsgd
from medfdd.messages import FinetuneRound, LocalUpdate
from medfdd.nets import convnet_for
from medfdd.site import finetune as ft_site
from medfdd.site.record_count import COUNT_FILE
from privacy.accounting import PURPOSE_RECORD_COUNT as COUNT_PURPOSE
from privacy.accounting import BudgetExceeded, ChargeConflict, PrivacyLedger

QUIET = Console(quiet=True)
RECIPE = {"rounds": 2, "local_epochs": 1, "lr": 0.2, "batch_size": 64, "clip_norm": 1.0}


def _saved(model) -> bytes:
    """A model as it travels: the safetensors bytes `save_model` writes."""
    with tempfile.TemporaryDirectory() as d:
        return save_model(Path(d) / "m.safetensors", model).read_bytes()


def model_bytes(seed: int = 0, width: int = 16) -> bytes:
    return _saved(convnet_for((1, 16, 16), 10, width=width, seed=seed))


@pytest.fixture
def two_sites(digits_consortium):
    coord = digits_consortium(name="ft-site", sites=2)
    paths = hybrid_sites(coord, share=0.5, rounds=2)
    return [paths[s] for s in sorted(paths)]


@pytest.fixture
def one_site(two_sites):
    return two_sites[0]


def test_a_round_is_charged_before_its_first_noisy_step_and_replays_without_a_second_charge(one_site, monkeypatch):
    path = one_site
    cfg = load_site_config(path)
    task = FinetuneRound(1, model_bytes(), dict(RECIPE))
    ledger_path = cfg.output_dir / "privacy_ledger.json"

    def crash(*args, **kwargs):  # the site dies as training starts: the charge must already be on disk
        entries = PrivacyLedger.load(ledger_path).entries
        assert [(e.purpose, e.round) for e in entries] == [(COUNT_PURPOSE, 1), (ft_site.PURPOSE, 1)]
        raise KeyboardInterrupt

    monkeypatch.setattr(ft_site, "dp_sgd", crash)
    with pytest.raises(KeyboardInterrupt):
        ft_site.finetune_site(load_site_config(path), task, console=QUIET)
    monkeypatch.undo()
    charged = PrivacyLedger.load(ledger_path)
    assert len(charged.entries) == 2  # a crash may over-count, never under-count

    update = ft_site.finetune_site(load_site_config(path), task, console=QUIET)  # the same round again: its charge, no second one
    after = PrivacyLedger.load(ledger_path)
    assert after.entries == charged.entries
    n_est = json.loads((cfg.output_dir / COUNT_FILE).read_text())["n_estimate"]
    (entry,) = [e for e in after.entries if e.purpose == ft_site.PURPOSE]
    assert entry.sample_rate == update.meta["sample_rate"] == RECIPE["batch_size"] / n_est  # batch / n~, never / n
    assert entry.steps == update.meta["steps"] == math.ceil(n_est / RECIPE["batch_size"])
    assert update.meta["noise_multiplier"] == entry.noise_multiplier > 0
    assert update.meta["epsilon"] == pytest.approx(after.epsilon_spent)
    assert set(update.meta) == {"site_id", "round", "epsilon", "noise_multiplier", "sample_rate", "steps"}
    # the keyed noise replays: the same inputs give the same model (one release, paid once)
    again = ft_site.finetune_site(load_site_config(path), task, console=QUIET)
    trained = load_tensors(update.model)
    replayed = load_tensors(again.model)
    assert all(torch.equal(replayed[k], trained[k]) for k in trained)
    assert PrivacyLedger.load(ledger_path).entries == charged.entries
    start = load_tensors(task.model)
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_a_changed_or_unplanned_round_is_refused(one_site):
    path = one_site
    ft_site.finetune_site(load_site_config(path), FinetuneRound(1, model_bytes(), dict(RECIPE)), console=QUIET)
    ledger_path = load_site_config(path).output_dir / "privacy_ledger.json"
    before = PrivacyLedger.load(ledger_path).entries
    with pytest.raises(ChargeConflict, match="changed since: the model received to fine-tune"):
        ft_site.finetune_site(load_site_config(path), FinetuneRound(1, model_bytes(seed=1), dict(RECIPE)), console=QUIET)
    with pytest.raises(ChargeConflict, match="changed since: the coordinator's recipe"):  # other steps and rate
        ft_site.finetune_site(load_site_config(path), FinetuneRound(1, model_bytes(), {**RECIPE, "lr": 0.1}), console=QUIET)
    with pytest.raises(ChargeConflict):
        ft_site.finetune_site(load_site_config(path), FinetuneRound(1, model_bytes(), {**RECIPE, "batch_size": 32}), console=QUIET)
    cfg = load_site_config(path)  # the same round on relabelled records (every label moved to the next class)
    manifest = cfg.data_root / cfg.data.manifest
    head, *rows = manifest.read_text().splitlines()
    classes = cfg.data.classes
    moved = [[p, classes[(classes.index(c) + 1) % len(classes)], pid] for p, c, pid in (r.split(",") for r in rows)]
    manifest.write_text("\n".join([head, *(",".join(r) for r in moved)]) + "\n")
    with pytest.raises(ChargeConflict, match="labels"):
        ft_site.finetune_site(load_site_config(path), FinetuneRound(1, model_bytes(), dict(RECIPE)), console=QUIET)
    with pytest.raises(ConfigError, match="lr"):
        ft_site.finetune_site(load_site_config(path), FinetuneRound(2, model_bytes(), {**RECIPE, "lr": -1}), console=QUIET)
    with pytest.raises(BudgetExceeded, match="finetune_rounds"):  # the site planned 2
        ft_site.finetune_site(load_site_config(path), FinetuneRound(3, model_bytes(), dict(RECIPE)), console=QUIET)
    assert PrivacyLedger.load(ledger_path).entries == before
    # a site that kept nothing for fine-tuning refuses before anything, even its record count, is paid
    doc = yaml.safe_load(path.read_text())
    doc["privacy"].update(finetune_share=0.0, finetune_rounds=0)
    doc["output"] = "out-unplanned"
    unplanned = path.with_name("unplanned.yaml")
    unplanned.write_text(yaml.safe_dump(doc))
    with pytest.raises(BudgetExceeded, match="finetune_rounds"):
        ft_site.finetune_site(load_site_config(unplanned), FinetuneRound(1, model_bytes(), dict(RECIPE)), console=QUIET)
    assert PrivacyLedger.load(load_site_config(unplanned).output_dir / "privacy_ledger.json").entries == ()


def test_a_non_private_round_is_recorded_as_epsilon_inf_and_accepted_only_from_a_declared_non_private_site(
        two_sites, tmp_path):
    path = two_sites[1]
    update = ft_site.finetune_site(load_site_config(path), FinetuneRound(1, model_bytes(), dict(RECIPE)), console=QUIET, no_dp=True)
    assert update.meta["epsilon"] == "inf" and update.meta["noise_multiplier"] == 0.0
    (entry,) = PrivacyLedger.load(load_site_config(path).output_dir / "privacy_ledger.json").entries
    assert (entry.purpose, entry.dp) == (ft_site.PURPOSE, False)
    sid = update.site_id
    spec = ConsortiumConfig(classes=[str(c) for c in range(10)], spatial_size=[16, 16],
                            sites={sid: SiteBudget(dp=False)})
    reference = convnet_for((1, 16, 16), 10, width=16, seed=0)
    recipe = FinetuneConfig(**RECIPE)
    accepted = validate_update(update, spec, reference=reference, recipe=recipe, received=tmp_path / "u.st")
    assert math.isinf(accepted.meta["epsilon"])
    private = spec.model_copy(update={"sites": {sid: SiteBudget(dp=True, epsilon=1.0)}})
    with pytest.raises(OfferRejected) as e:
        validate_update(update, private, reference=reference, recipe=recipe, received=tmp_path / "u.st")
    assert e.value.reason == Reason.NOT_PRIVATE


def test_noise_and_sampling_are_float64_draws_of_the_keyed_generator():
    g = dpsgd.keyed_generator(2**200 + 7, 1, dpsgd.NOISE_STREAM)
    z = dpsgd.gaussian_noise(4096, 2.0, g)
    assert z.dtype == torch.float64
    assert (z.float().double() != z).any()  # not float32 draws widened
    assert 1.8 < z.std().item() < 2.2
    again = dpsgd.gaussian_noise(4096, 2.0, dpsgd.keyed_generator(2**200 + 7, 1, dpsgd.NOISE_STREAM))
    assert torch.equal(z, again)  # keyed: a replay draws the same noise
    other = dpsgd.gaussian_noise(4096, 2.0, dpsgd.keyed_generator(2**200 + 7, 2, dpsgd.NOISE_STREAM))
    assert not torch.equal(z, other)  # each round its own stream
    idx = dpsgd.poisson_sample(100_000, 0.03, dpsgd.keyed_generator(1, 1, dpsgd.SAMPLE_STREAM))
    assert 2700 < len(idx) < 3300


def test_dp_sgd_noise_reaches_the_model_at_the_planned_scale():
    """One step on an empty sample is pure noise: the parameter change is lr x N(0, (sigma C)^2) / (q n~)."""
    model = convnet_for((1, 8, 8), 3, width=4, seed=0)
    x, y = torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)
    plan = dpsgd.DPSGDPlan(noise_multiplier=3.0, sample_rate=1e-12, steps=1, clip_norm=0.5, expected_batch=10.0)
    out = dpsgd.dp_sgd(model, x, y, plan, lr=1.0, seed=5, round_=1, device=torch.device("cpu"))
    delta = torch.cat([(a - b).flatten() for a, b in zip(out.parameters(), model.parameters(), strict=True)])
    assert delta.std().item() == pytest.approx(3.0 * 0.5 / 10.0, rel=0.1)


def test_the_coordinator_rejects_bad_updates_and_averages_by_the_published_counts(tmp_path):
    a, b = "site-a", "site-b"
    spec = ConsortiumConfig(classes=[str(c) for c in range(10)], spatial_size=[16, 16],
                            sites={a: SiteBudget(epsilon=1.0), b: SiteBudget(epsilon=1.0)})
    ref = convnet_for((1, 16, 16), 10, width=16, seed=0)
    recipe = FinetuneConfig(**RECIPE)
    meta = {"round": 1, "epsilon": 0.9, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}

    def check(update):
        return validate_update(update, spec, reference=ref, recipe=recipe, received=tmp_path / f"{update.site_id}.st")

    good_a = check(LocalUpdate(a, 1, _saved(convnet_for((1, 16, 16), 10, width=16, seed=1)), {**meta, "site_id": a}))
    good_b = check(LocalUpdate(b, 1, _saved(convnet_for((1, 16, 16), 10, width=16, seed=2)),
                               {**meta, "site_id": b, "sample_rate": 0.2}))
    assert (good_a.weight, good_b.weight) == (640.0, 320.0)  # n~ = batch / q
    avg = average([good_a, good_b], ref).state_dict()
    for k, v in avg.items():
        assert torch.allclose(v, (2 * good_a.state[k] + good_b.state[k]) / 3, atol=1e-6)

    nan = convnet_for((1, 16, 16), 10, width=16, seed=1)
    with torch.no_grad():
        nan.classifier.weight[0, 0] = float("nan")
    wide = convnet_for((1, 16, 16), 10, width=8, seed=1)
    cases = [
        (LocalUpdate(a, 1, _saved(nan), {**meta, "site_id": a}), Reason.NON_FINITE),
        (LocalUpdate(a, 1, _saved(wide), {**meta, "site_id": a}), Reason.WRONG_SHAPE),
        (LocalUpdate(a, 1, b"not a model", {**meta, "site_id": a}), Reason.MALFORMED),
        (LocalUpdate(a, 1, _saved(ref), {**meta, "site_id": a, "epsilon": 1.5}), Reason.EPSILON_ABOVE_BUDGET),
        (LocalUpdate(a, 1, _saved(ref), {**meta, "site_id": a, "noise_multiplier": 0.0}), Reason.NOT_PRIVATE),
        (LocalUpdate(a, 1, _saved(ref), {**meta, "site_id": a, "n_records": 480}), Reason.UNEXPECTED_METADATA),
    ]
    for update, reason in cases:
        with pytest.raises(OfferRejected) as e:
            check(update)
        assert e.value.reason == reason
    bad = save_tensors({"x": torch.zeros(2)})
    with pytest.raises(OfferRejected):
        check(LocalUpdate(a, 1, bad, {**meta, "site_id": a}))
    assert np.isfinite(sum(float(v.sum()) for v in avg.values()))


def test_a_hybrid_plan_needs_both_its_share_and_its_rounds():
    for half in ({"finetune_share": 0.5}, {"finetune_rounds": 2}):
        with pytest.raises(ValidationError, match="finetune_share and privacy.finetune_rounds go together"):
            PrivacyConfig(**half)
    with pytest.raises(ValidationError):
        PrivacyConfig(finetune_share=1.0, finetune_rounds=2)  # nothing left for the distillation
    assert PrivacyConfig(finetune_share=0.5, finetune_rounds=2).finetune_rounds == 2
