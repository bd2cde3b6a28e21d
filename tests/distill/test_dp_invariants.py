"""Privacy invariants of site distillation (DESIGN.md 1-6), each with a test that would catch its violation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_png, prepared_digits
from hypothesis import given, settings
from hypothesis import strategies as st

from medfdd.artifacts import META_KEYS, ArtifactError, SyntheticSet, load_synthetic
from medfdd.config import DistillConfig, load_site_config
from medfdd.distill.base import PrivacyPlan, WarmStart, evidence_allocation, fast_bf16, synthetic_labels
from medfdd.distill.distribution_matching import DistributionMatching
from medfdd.distill.mechanism import noisy_class_stats
from medfdd.errors import MedfddError
from medfdd.messages import Broadcast
from medfdd.nets import convnet_for
from medfdd.site.budget import print_budget
from medfdd.site.distill import distill_site, loss_curve_path
from medfdd.site.noise_key import KEY_FILENAME
from medfdd.site.offer import make_offer
from privacy.accounting import BudgetExceeded, PrivacyLedger

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)


def released_vector(features, labels, k, clip, center=None, share=0.5):
    """The pre-noise release (all class blocks: sums and scaled counts) as one flat vector."""
    s = noisy_class_stats(features, labels, k, clip_norm=clip, noise_multiplier=0.0, generator=None, center=center,
                          count_share=share)
    return torch.cat([s.sums.flatten(), s.counts * (clip * share**0.5)])


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 20), d=st.integers(1, 16), k=st.integers(2, 5), clip=st.floats(0.01, 100),
       scale=st.floats(1e-3, 1e4), seed=st.integers(0, 1000), centred=st.booleans(), share=st.floats(0.01, 0.99))
def test_one_record_moves_the_release_by_at_most_C(n, d, k, clip, scale, seed, centred, share):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n + 1, d, generator=g) * scale
    y = torch.randint(0, k, (n + 1,), generator=g)
    center = torch.randn(d, generator=g) if centred else None
    with_all = released_vector(f, y, k, clip, center, share)
    without_last = released_vector(f[:-1], y[:-1], k, clip, center, share)  # add/remove adjacency
    assert float((with_all - without_last).norm()) <= clip * (1 + 1e-5)
    # replace-one adjacency stays within 2C (two add/remove steps)
    f2 = f.clone()
    f2[0] = torch.randn(d, generator=g) * scale * 10
    y2 = y.clone()
    y2[0] = (y[0] + 1) % k
    assert float((released_vector(f2, y2, k, clip, center, share) - with_all).norm()) <= 2 * clip * (1 + 1e-5)


def test_noise_has_std_sigma_times_C():
    sigma, clip, k, d = 1.7, 0.5, 3, 2000
    f = torch.zeros(0, d)
    y = torch.zeros(0, dtype=torch.long)
    s = noisy_class_stats(f, y, k, clip_norm=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(0))
    raw = s.sums * 1.0  # no record: the release is pure noise
    assert abs(float(raw.std()) - sigma * clip) < 0.02 * sigma * clip
    assert abs(float(raw.mean())) < 4 * sigma * clip / raw.numel() ** 0.5  # 4 standard errors
    counts_raw = s.counts * clip * 0.5**0.5
    assert counts_raw.shape == (k,)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 12), which=st.integers(0, 11),
       scale=st.sampled_from([0.0, 1e-40, 1e-20, 1e-7, 1e-3, 0.5, 1.0]), constant=st.booleans(), bf16=st.booleans())
def test_a_blank_scan_keeps_its_contribution_whatever_the_batch(seed, n, which, scale, constant, bf16):
    """Through the real embedding network: a blank (all-zero), constant or near-zero record next to real ones.
    A conv bias before instance norm turned such a record's embedding into rounding noise that depended on the
    other records in the batch, so removing one record moved the release by more than C. Both in fp32 and under
    bf16 autocast (what `precision: auto` uses on CPUs with native bf16; forced here on any CPU)."""
    x, _ = _digits(n=100)
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randint(0, len(x), (n,), generator=g)].clone()
    y = torch.randint(0, 10, (n,), generator=g)
    x[0] = scale if constant else scale * torch.rand(x.shape[1:], generator=g)
    net = convnet_for(tuple(x.shape[1:]), 10, width=16, seed=seed % 1000)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            f_full = net.embed(x).float()
            keep = torch.arange(n) != which % n
            f_removed = net.embed(x[keep]).float()
        full = released_vector(f_full, y, 10, 1.0)
        removed = released_vector(f_removed, y[keep], 10, 1.0)
    assert float((full - removed).norm()) <= 1.0 + 1e-5


def _digits(n=200):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor((d.images[:n] / 16.0).astype(np.float32))[:, None]
    return x, torch.tensor(d.target[:n])


@pytest.mark.parametrize("schedule", ["interleaved", "decoupled"])
def test_one_augmentation_family_per_paid_statistic_however_many_chunks(schedule, monkeypatch):
    """Records are embedded in chunks; a family drawn per chunk would make one record's presence change the
    augmentation of the records after it (their chunk moves), so the release could move by more than C."""
    import medfdd.augment as augment_module

    applied: list[tuple[str, int]] = []
    for name, op in list(augment_module.OPS.items()):
        monkeypatch.setitem(augment_module.OPS, name,
                            lambda x, g, _op=op, _name=name: applied.append((_name, x.shape[0])) or _op(x, g))
    x, y = _digits(700)
    d = DistributionMatching(DistillConfig(ipc=1, iterations=8, batch_size=700, width=8, schedule=schedule),
                             PrivacyPlan(True, 1.0, 1.0, 8, 1.0), num_classes=10, image_shape=(1, 8, 8), seed=0)
    for t in range(8):
        applied.clear()
        d.real_statistic(d.network(t), x, y, t)
        assert len(applied) == 3 and sum(n for _, n in applied) == 700  # 256 + 256 + 188: q = 1 samples all
        assert len({name for name, _ in applied}) == 1, applied


def test_synthetic_images_start_from_noise_not_data():
    cfg = DistillConfig(ipc=3, iterations=2, batch_size=50, width=16)
    plan = PrivacyPlan(True, 1.0, 0.25, 2, 1.0)
    a = DistributionMatching(cfg, plan, num_classes=10, image_shape=(1, 8, 8), seed=0)
    x, y = _digits()
    init = a.init_state().images.detach().clone()
    # the initial state is a function of the seed only: identical for any data, far from every real image
    other = DistributionMatching(cfg, plan, num_classes=10, image_shape=(1, 8, 8), seed=0).init_state()
    assert torch.equal(init, other.images.detach())
    dist = torch.cdist(init.flatten(1), x.flatten(1)).min()
    assert float(dist) > 1.0
    # a run on two different datasets starts from the same images
    s1 = a.run(x, y, a.init_state())
    assert s1.iteration == a.total_work and not torch.equal(s1.images, init)


def test_seeded_networks_are_torch_manual_seed_networks_and_leave_the_callers_rng_alone():
    # convnet_for seeds only the CPU generator (torch.manual_seed was slow); the networks must be bit-identical to
    # the torch.manual_seed ones (results recorded before the change stay reproducible), and the caller's random
    # stream must not move
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    nets = [convnet_for((1, 8, 8), 10, width=8, seed=s) for s in (0, 5)]
    assert torch.equal(torch.rand(3), expected_next)
    for s, net in zip((0, 5), nets, strict=True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            reference = convnet_for((1, 8, 8), 10, width=8)
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), reference.state_dict().values(),
                                                      strict=True))
    assert not torch.equal(nets[0].features[0].weight, nets[1].features[0].weight)


def test_precision_auto_uses_bf16_only_where_it_is_fast():
    # bf16 autocast was 10x slower than fp32 for the real-data embedding on a CPU without native bf16 (AVX2 only)
    assert fast_bf16(torch.device("cuda"))
    x, y = _digits()
    plan = PrivacyPlan(True, 2.0, 0.3, 1, 1.0)
    stats = {}
    for precision in ("auto", "fp32", "bf16"):
        d = DistributionMatching(DistillConfig(ipc=2, iterations=1, batch_size=60, width=16, precision=precision),
                                 plan, num_classes=10, image_shape=(1, 8, 8), seed=3)
        stats[precision] = d.real_statistic(d.network(0), x, y, 0).sums
    assert torch.equal(stats["auto"], stats["bf16" if fast_bf16(torch.device("cpu")) else "fp32"])
    assert not torch.equal(stats["bf16"], stats["fp32"])  # the forced settings take effect


class _Stop(Exception):
    pass


@pytest.mark.parametrize("schedule,stop_at", [("interleaved", 3), ("decoupled", 3), ("decoupled", 9)])
def test_runs_are_reproducible_and_resume_exactly(schedule, stop_at):
    """Interrupt after `stop_at` units of work (decoupled: 6 paid statistics then 12 updates) and resume from the
    state: the result equals an uninterrupted run's, in the bank phase (3) and in the update phase (9)."""
    cfg = DistillConfig(ipc=2, iterations=6, batch_size=60, width=16, inner_steps=2, schedule=schedule)
    plan = PrivacyPlan(True, 2.0, 0.3, 6, 1.0)
    x, y = _digits()

    def make():
        return DistributionMatching(cfg, plan, num_classes=10, image_shape=(1, 8, 8), seed=3)

    full = make().run(x, y)
    assert full.iteration == make().total_work == (18 if schedule == "decoupled" else 6)
    assert torch.equal(full.result(), make().run(x, y).result())  # reproducible

    def stop(state, _loss):
        if state.iteration >= stop_at:
            raise _Stop

    d = make()
    state = d.init_state()
    with pytest.raises(_Stop):
        d.run(x, y, state, on_step=stop)
    assert state.iteration == stop_at
    resumed = make().run(x, y, state)
    assert torch.allclose(full.result(), resumed.result(), atol=1e-6)
    assert make().class_evidence(resumed) == make().class_evidence(full)  # counts are not paid or kept twice


@pytest.mark.parametrize("schedule", ["decoupled", "interleaved"])
def test_class_evidence_is_the_released_noisy_counts_over_the_sample_rate(schedule):
    """Without noise and with q = 1 the evidence is exactly the class counts; under DP it is those counts plus the
    count noise the ledger paid for (std sigma / sqrt(share) / (q sqrt(steps))), never the true counts themselves."""
    x, y = _digits(200)
    true = np.bincount(y.numpy(), minlength=10)
    cfg = DistillConfig(ipc=1, iterations=4, batch_size=10**6, width=8, inner_steps=1, schedule=schedule)
    exact = DistributionMatching(cfg, PrivacyPlan(False, 0.0, 1.0, 4, 1.0), num_classes=10, image_shape=(1, 8, 8),
                                 seed=0)
    assert np.allclose(exact.class_evidence(exact.run(x, y)), true, atol=1e-4)
    sigma, q, steps = 4.0, 0.5, 8
    share = 0.1 if schedule == "decoupled" else 0.5
    cfg = DistillConfig(ipc=1, iterations=steps, batch_size=100, width=8, inner_steps=1, schedule=schedule)
    errors = []
    for seed in range(6):
        d = DistributionMatching(cfg, PrivacyPlan(True, sigma, q, steps, 1.0), num_classes=10, image_shape=(1, 8, 8),
                                 seed=seed)
        errors.append(np.array(d.class_evidence(d.run(x, y))) - true)
    errors = np.concatenate(errors)
    expected_sd = sigma / share**0.5 / (q * steps**0.5)
    assert np.all(errors != 0) and 0.6 < errors.std() / expected_sd < 1.5


def test_decoupled_pays_each_planned_statistic_once_whatever_the_updates():
    """The real records are touched only by the `iterations` paid statistics; the extra updates reuse them."""
    plan = PrivacyPlan(True, 2.0, 0.3, 4, 1.0)
    x, y = _digits()
    for inner in (1, 5):
        cfg = DistillConfig(ipc=2, iterations=4, batch_size=60, width=16, inner_steps=inner)
        d = DistributionMatching(cfg, plan, num_classes=10, image_shape=(1, 8, 8), seed=0)
        paid = []

        def counting(nets, xx, yy, steps, *args, _real=d.real_statistics, _paid=paid, **kwargs):
            _paid.extend(steps)
            return _real(nets, xx, yy, steps, *args, **kwargs)

        d.real_statistics = counting
        state = d.run(x, y)
        assert paid == [0, 1, 2, 3] and state.iteration == 4 + 4 * inner
        assert state.average is not None and not torch.equal(state.result(), state.images.detach())


def test_artifact_payload_is_an_allow_list(tmp_path):
    with pytest.raises(ArtifactError, match="allow-list"):
        SyntheticSet(np.zeros((1, 1, 2, 2), np.float32), np.zeros(1, np.int64), {"site_id": "a", "patient_id": "x"})


# ------------------------------------------------------------------ the site runner on a prepared consortium


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    return prepared_digits(tmp_path_factory.mktemp("cons") / "c", ipc=3, iterations=30)


def _site_config(consortium: Path, tmp_path: Path, name: str = "hospital-a", **distill) -> Path:
    src = consortium / "site_configs" / f"{name}.yaml"
    cfg = yaml.safe_load(src.read_text())
    cfg["data"]["root"] = str((consortium / name).resolve())
    cfg["output"] = str(tmp_path / "out")
    # One preprocessing cache for the module's runs (content-addressed): the first run decodes the DICOM files
    # through MONAI, the others read its tensors instead of decoding the same 676 scans again (~15 s each).
    cfg["data"]["cache_dir"] = str(consortium.parent / "preprocess-cache")
    cfg["distill"].update({"width": 16, "checkpoint_every": 5, **distill})
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def quiet():
    from rich.console import Console

    return Console(quiet=True)


def test_site_distill_writes_the_contract_and_accounts_like_dp_accounting(consortium, tmp_path):
    import dp_accounting

    path = _site_config(consortium, tmp_path)
    out = distill_site(load_site_config(path), console=quiet())
    cfg = load_site_config(path)
    syn = load_synthetic(cfg.output_dir)
    assert syn.images.dtype == np.float32 and syn.labels.dtype == np.int64
    assert syn.images.shape == (30, 1, 16, 16) and np.isfinite(syn.images).all()
    assert syn.images.min() >= 0 and syn.images.max() <= 1
    assert set(syn.meta) <= set(META_KEYS)
    with np.load(cfg.output_dir / "synthetic.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["images", "labels"]
    assert (cfg.output_dir / "synthetic_preview.png").stat().st_size > 1000
    ledger = json.loads((cfg.output_dir / "privacy_ledger.json").read_text())
    count, entry = ledger["entries"]  # the default DP record count (paid first), then the round
    assert (count["purpose"], count["sample_rate"], count["steps"]) == ("record-count", 1.0, 1)
    n_estimate = json.loads((cfg.output_dir / "record_count.json").read_text())["n_estimate"]
    assert entry["sample_rate"] == pytest.approx(min(1.0, cfg.distill.expected_batch(len(cfg.data.classes)) / n_estimate))
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(count["noise_multiplier"]))
    event = dp_accounting.PoissonSampledDpEvent(entry["sample_rate"],
                                                dp_accounting.GaussianDpEvent(entry["noise_multiplier"]))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, entry["steps"]))
    independent = acc.get_epsilon(1e-5)
    assert abs(ledger["epsilon_spent"] - independent) / independent < 0.01
    assert ledger["epsilon_spent"] <= 1.0 and out.meta["epsilon"] == pytest.approx(ledger["epsilon_spent"])
    assert out.meta["steps"] == 30 and out.meta["dp"] is True


def test_patient_unit_is_in_the_release_and_the_ledger_and_cannot_change_once_spent(consortium, tmp_path):
    from medfdd.data.site_data import load_site_data

    path = _site_config(consortium, tmp_path, iterations=3)
    doc = yaml.safe_load(path.read_text())
    doc["privacy"]["unit"] = "patient"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_site_config(path)
    data = load_site_data(cfg)
    patients = [data.patient_ids[i] for i in data.train]
    assert len(patients) == len(set(patients)) and len(data.unused) > 0  # prepare gives patients 1-3 scans
    out = distill_site(load_site_config(path), console=quiet())
    assert out.meta["privacy_unit"] == "patient"
    assert json.loads((cfg.output_dir / "privacy_ledger.json").read_text())["budget"]["unit"] == "patient"
    released = (cfg.output_dir / "synthetic.json").read_bytes()
    doc["privacy"]["unit"] = "scan"  # the epsilon already spent protected patients: no mixing of units
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(MedfddError, match="unit"):
        distill_site(load_site_config(path), console=quiet())
    assert (cfg.output_dir / "synthetic.json").read_bytes() == released


@pytest.mark.parametrize("setting", ["default", "public n", "fixed rate"])
def test_the_published_sample_rate_discloses_n_only_when_paid_for_or_declared_public(consortium, tmp_path, setting):
    """sample_rate and the noise calibrated from it are published (invariant 8). By default they come from the DP
    record count n~ (charged first), never from n itself; `count_noise: null` declares n public (q = batch / n
    discloses it); a fixed `distill.sample_rate` is the same whatever the number of training records."""
    from medfdd.site.distill import plan_privacy
    from medfdd.site.record_count import COUNT_FILE
    from privacy.accounting import PURPOSE_RECORD_COUNT as COUNT_PURPOSE

    path = _site_config(consortium, tmp_path, batch_size=64, sample_rate=0.05 if setting == "fixed rate" else None)
    if setting == "public n":
        path = _with_count_noise(path, None)
    cfg = load_site_config(path)
    assert (cfg.privacy.count_noise is None) == (setting == "public n")
    plans, estimates, charges = [], [], []
    for n in (1000, 1001):
        (cfg.output_dir / COUNT_FILE).unlink(missing_ok=True)
        ledger = PrivacyLedger.open(tmp_path / f"ledger-{setting}-{n}.json", site_id=cfg.site_id, epsilon=1.0,
                                    delta=1e-5)
        plans.append(plan_privacy(cfg, ledger, n_train=n, round_=1, dp=True, seed=n))
        charges.append([e.purpose for e in ledger.entries])
        if setting == "default":
            estimates.append(json.loads((cfg.output_dir / COUNT_FILE).read_text())["n_estimate"])
    if setting == "default":
        assert charges == [[COUNT_PURPOSE]] * 2  # the count is paid before it sets q
        assert [p.sample_rate for p in plans] == [64 / e for e in estimates]
        assert [p.sample_rate for p in plans] != [64 / 1000, 64 / 1001]  # std 20 records: equal n~ = n is unlikely
    elif setting == "public n":
        assert [p.sample_rate for p in plans] == [64 / 1000, 64 / 1001]  # n = 64 / q: disclosed, as declared
        assert charges == [[], []]
    else:
        assert plans[0] == plans[1] and plans[0].sample_rate == 0.05 and charges == [[], []]


def _with_count_noise(path: Path, sigma: float | None = 10.0) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc["privacy"]["count_noise"] = sigma
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_record_count_is_paid_once_from_the_budget_before_it_sets_the_sample_rate(consortium, tmp_path):
    """`privacy.count_noise`: the published sample rate reveals only a DP estimate of n (invariant 1: any count),
    paid before it is computed and left room for by the calibration."""
    import dp_accounting

    from medfdd.site.budget import open_ledger
    from medfdd.site.distill import plan_privacy
    from medfdd.site.record_count import COUNT_FILE
    from privacy.accounting import PURPOSE_RECORD_COUNT as COUNT_PURPOSE
    from privacy.accounting import ChargeConflict

    cfg = load_site_config(_with_count_noise(_site_config(consortium, tmp_path, batch_size=64, iterations=50)))
    plan = plan_privacy(cfg, open_ledger(cfg, True), n_train=1000, round_=1, dp=True, seed=123)
    estimate = json.loads((cfg.output_dir / COUNT_FILE).read_text())["n_estimate"]
    assert plan.sample_rate == 64 / estimate
    (count,) = open_ledger(cfg, True).entries
    assert (count.purpose, count.noise_multiplier, count.sample_rate, count.steps) == (COUNT_PURPOSE, 10.0, 1.0, 1)
    acc = dp_accounting.rdp.RdpAccountant()  # the count and the planned distillation together fit the budget
    acc.compose(dp_accounting.GaussianDpEvent(10.0))
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        plan.sample_rate, dp_accounting.GaussianDpEvent(plan.noise_multiplier)), 50))
    assert 0.97 <= acc.get_epsilon(1e-5) <= 1.0 * 1.01
    # paid once: a later plan (resume, next round, changed records) reuses the released estimate
    again = plan_privacy(cfg, open_ledger(cfg, True), n_train=1001, round_=1, dp=True, seed=123)
    assert again.sample_rate == plan.sample_rate and len(open_ledger(cfg, True).entries) == 1
    # a lost estimate is redrawn from the same keyed noise for the same records; other records would be a second,
    # unpaid release: refused
    (cfg.output_dir / COUNT_FILE).unlink()
    with pytest.raises(ChargeConflict):
        plan_privacy(cfg, open_ledger(cfg, True), n_train=1001, round_=1, dp=True, seed=123)
    assert plan_privacy(cfg, open_ledger(cfg, True), n_train=1000, round_=1, dp=True, seed=123) == plan
    # a refused plan pays nothing for the count
    other = load_site_config(_with_count_noise(_site_config(consortium, tmp_path / "small", batch_size=64)))
    with pytest.raises(BudgetExceeded, match="beyond the planned"):
        plan_privacy(other, open_ledger(other, True), n_train=1000, round_=2, dp=True, seed=123)
    assert open_ledger(other, True).entries == ()


def test_the_record_count_noise_has_std_sigma(consortium, tmp_path):
    from medfdd.site.record_count import private_record_count

    cfg = load_site_config(_with_count_noise(_site_config(consortium, tmp_path), sigma=20.0))
    draws = np.array([private_record_count(cfg, PrivacyLedger.open(tmp_path / f"l{s}", site_id=cfg.site_id,
                                                                    epsilon=100.0, delta=1e-5), n=5000, seed=s)
                      for s in range(300)])
    assert abs(draws.mean() - 5000) < 4 * 20 / np.sqrt(300)
    assert 0.85 * 20 < draws.std() < 1.15 * 20


def test_no_dp_is_recorded_as_infinite_epsilon(consortium, tmp_path, capsys):
    path = _site_config(consortium, tmp_path, iterations=3)
    from rich.console import Console

    distill_site(load_site_config(path), no_dp=True, console=Console(file=sys.stderr, force_terminal=False))
    assert "NON-PRIVATE" in capsys.readouterr().err
    cfg = load_site_config(path)
    syn = load_synthetic(cfg.output_dir)
    assert syn.meta["dp"] is False and math.isinf(syn.meta["epsilon"])
    ledger = json.loads((cfg.output_dir / "privacy_ledger.json").read_text())
    assert ledger["epsilon_spent"] == "inf" and ledger["entries"][0]["dp"] is False


def test_budget_overrun_is_refused_before_any_release(consortium, tmp_path):
    path = _site_config(consortium, tmp_path, iterations=10)
    distill_site(load_site_config(path), console=quiet())  # round 1 takes the whole budget (privacy.rounds = 1)
    cfg = load_site_config(path)
    before = {f: (cfg.output_dir / f).read_bytes() for f in ("synthetic.npz", "synthetic.json", "privacy_ledger.json")}
    with pytest.raises(BudgetExceeded):
        distill_site(load_site_config(path), round_=2, console=quiet())
    after = {f: (cfg.output_dir / f).read_bytes() for f in before}
    assert after == before  # nothing released, ledger unchanged


@pytest.mark.parametrize("count_noise", [None, 10.0])
def test_rounds_split_the_budget(consortium, tmp_path, count_noise):
    path = _site_config(consortium, tmp_path, iterations=10)
    cfg = yaml.safe_load(path.read_text())
    cfg["privacy"].update(rounds=2, count_noise=count_noise)
    path.write_text(yaml.safe_dump(cfg))
    first = distill_site(load_site_config(path), round_=1, console=quiet())
    assert first.meta["epsilon"] < 0.8  # about half of the budget's worth of steps
    second = distill_site(load_site_config(path), round_=2, console=quiet())
    assert first.meta["epsilon"] < second.meta["epsilon"] <= 1.0
    assert second.meta["epsilon"] > 0.95  # the calibration spends the whole budget, the record count included
    assert second.meta["round"] == 2 and second.meta["sample_rate"] == first.meta["sample_rate"]
    ledger = json.loads((load_site_config(path).output_dir / "privacy_ledger.json").read_text())
    assert [(e["round"], e["purpose"]) for e in ledger["entries"]] == (
        [(1, "record-count")] if count_noise else []) + [(1, "distill"), (2, "distill")]


@pytest.mark.parametrize("start", ["warm", "cold", "copy missing"])
def test_round_two_continues_from_the_sites_own_round_one_release(consortium, tmp_path, start):
    """Warm start (post-processing of round 1's DP release): round 2's initial images are exactly what the site
    released in round 1; with warm_start off, or without the site's copy of that release, it starts from noise."""
    from safetensors.torch import load_file

    path = _site_config(consortium, tmp_path, iterations=10)
    cfg = yaml.safe_load(path.read_text())
    cfg["privacy"]["rounds"] = 2
    cfg["distill"]["warm_start"] = start != "cold"
    path.write_text(yaml.safe_dump(cfg))
    site = load_site_config(path)
    distill_site(load_site_config(path), round_=1, console=quiet())
    released = load_synthetic(site.output_dir).images
    if start == "copy missing":
        (site.output_dir / "checkpoints" / "released-round-1.safetensors").unlink()
    distill_site(load_site_config(path), round_=2, console=quiet(), stop_after=1)  # still paying: the state holds the start images
    began = load_file(str(site.output_dir / "checkpoints" / "round-2.safetensors"))["images"].numpy()
    if start == "warm":
        np.testing.assert_array_equal(began, released)
    else:
        assert np.abs(began - released).mean() > 0.05
    resumed = distill_site(load_site_config(path), round_=2, console=quiet())
    assert resumed.resumed_from == 1 and resumed.meta["round"] == 2  # the checkpoint matches its start


@pytest.mark.parametrize("allocation, images, labels, problem", [
    ("uniform", torch.zeros(20, 1, 4, 4), synthetic_labels(10, 2), "start images"),
    ("uniform", torch.full((20, 1, 8, 8), float("nan")), synthetic_labels(10, 2), "start images"),
    ("uniform", torch.zeros(20, 1, 8, 8), torch.zeros(20, dtype=torch.long), "2 of each class"),
    ("evidence", torch.zeros(20, 1, 8, 8), torch.full((20,), 10), "class indices"),
    ("evidence", torch.zeros(20, 1, 8, 8), torch.zeros(19, dtype=torch.long), "class indices"),
])
def test_a_warm_start_that_does_not_fit_the_plan_is_refused(allocation, images, labels, problem):
    cfg = DistillConfig(ipc=2, iterations=2, batch_size=60, width=16, allocation=allocation)
    with pytest.raises(ValueError, match=problem):
        DistributionMatching(cfg, PrivacyPlan(True, 1.0, 0.3, 2, 1.0), num_classes=10, image_shape=(1, 8, 8), seed=0,
                             round_=2, start=WarmStart(images, labels))


def test_an_evidence_allocated_warm_start_is_refitted_to_this_rounds_evidence():
    cfg = DistillConfig(ipc=2, iterations=3, batch_size=60, width=8, inner_steps=1, lr=1e-12, ema=0,
                        allocation="evidence")
    labels = torch.tensor([0] * 11 + [3] * 9)  # last round's allocation
    previous = torch.arange(20, dtype=torch.float32).view(20, 1, 1, 1).expand(20, 1, 8, 8) / 20
    d = DistributionMatching(cfg, PrivacyPlan(False, 0.0, 1.0, 3, 1.0), num_classes=10, image_shape=(1, 8, 8),
                             seed=0, round_=2, start=WarmStart(previous, labels))
    x = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(200) % 10  # now every class has 20 records (q = 1: the evidence is exactly 20 each)
    state = d.run(x, y)
    counts = evidence_allocation(d.class_evidence(state), 1.0, 20)
    assert torch.bincount(state.labels, minlength=10).tolist() == counts == [2] * 10
    images = state.result()
    # lr 1e-12 moves a pixel by ~1e-8 at most (allclose's default atol would be a coin flip); the previous images
    # differ from one another by 0.05
    assert torch.allclose(images[state.labels == 0], previous[:2], atol=1e-6)  # class 0 keeps 2 of its 11
    assert torch.allclose(images[state.labels == 3], previous[11:13], atol=1e-6)
    for k in (1, 2, 4):  # classes without previous images start from noise, not from another class's images
        assert not any(torch.allclose(img, p) for img in images[state.labels == k] for p in previous)


@pytest.mark.parametrize("stop_after", [10, 30])  # decoupled: 20 paid statistics, then 20 updates
def test_interrupted_run_resumes_without_paying_twice(consortium, tmp_path, stop_after):
    path = _site_config(consortium, tmp_path, iterations=20)
    cfg = load_site_config(path)
    distill_site(load_site_config(path), console=quiet(), stop_after=stop_after)
    ledger = json.loads((cfg.output_dir / "privacy_ledger.json").read_text())
    assert [e["purpose"] for e in ledger["entries"]] == ["record-count", "distill"]  # paid before computing
    assert not (cfg.output_dir / "synthetic.npz").exists()  # nothing released
    resumed = distill_site(load_site_config(path), console=quiet())
    assert resumed.resumed_from == stop_after
    ledger2 = json.loads((cfg.output_dir / "privacy_ledger.json").read_text())
    assert ledger2["entries"] == ledger["entries"]  # no second charge
    # the resumed artifact equals an uninterrupted run's at the same site (the same noise key)
    path2 = _site_config(consortium, tmp_path / "b", iterations=20)
    _copy_noise_key(cfg.output_dir, path2)
    straight = distill_site(load_site_config(path2), console=quiet())
    a = load_synthetic(cfg.output_dir).images
    b = load_synthetic(load_site_config(path2).output_dir).images
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert straight.meta["epsilon"] == resumed.meta["epsilon"]
    assert straight.meta["class_evidence"] == resumed.meta["class_evidence"]
    # the loss curve went through the checkpoint: the resumed run's is the whole round's, as the uninterrupted one's
    curves = [json.loads(loss_curve_path(load_site_config(p), 1).with_suffix(".json").read_text())["points"]
              for p in (path, path2)]
    updates = 20 * cfg.distill.updates_per_statistic  # decoupled: one point per synthetic update
    assert [u for u, _ in curves[0]] == list(range(1, updates + 1))
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
    assert len(resumed.meta["class_evidence"]) == len(cfg.data.classes)


def test_the_loss_curve_and_the_budget_chart_stay_at_the_site(consortium, tmp_path):
    """`site distill` keeps its matching-loss curve (PNG + JSON) in the output folder; the offer carries only the
    allow-listed synthetic set; `site budget` draws the charges against the budget."""
    path = _site_config(consortium, tmp_path, iterations=4, inner_steps=3)
    cfg = load_site_config(path)
    offer = make_offer(cfg, Broadcast(1), console=quiet())
    curve = loss_curve_path(cfg, 1)
    assert_png(curve)
    numbers = json.loads(curve.with_suffix(".json").read_text())
    assert numbers["x"] == "synthetic update" and len(numbers["points"]) == 12  # 4 statistics x 3 updates each
    assert all(v >= 0 and math.isfinite(v) for _, v in numbers["points"])
    assert set(offer.arrays) == {"images", "labels"} and set(offer.meta) <= set(META_KEYS)
    assert "loss" not in json.dumps(offer.meta) and "loss" not in (cfg.output_dir / "synthetic.json").read_text()
    budget = print_budget(cfg, console=quiet())
    assert budget["chart"] == str(cfg.output_dir / "budget.png") and [r["purpose"] for r in budget["rounds"]] == [
        "record-count", "distill"]
    assert_png(cfg.output_dir / "budget.png")


def _copy_noise_key(src: Path, dst_config: Path) -> None:
    from medfdd.site.budget import provision_noise_key

    provision_noise_key(load_site_config(dst_config), (src / KEY_FILENAME).read_bytes())


def test_the_noise_is_keyed_by_a_site_secret_not_by_the_config_seed(consortium, tmp_path):
    """Two sites with the same config seed draw different noise and samples (each its own secret key); the same key
    replays the same release exactly (what resume relies on)."""
    outs = []
    for name in ("one", "two", "same-key-as-one"):
        path = _site_config(consortium, tmp_path / name, iterations=5)
        out = load_site_config(path).output_dir
        if name == "same-key-as-one":
            _copy_noise_key(outs[0], path)
        distill_site(load_site_config(path), console=quiet())
        outs.append(out)
    keys = [(o / KEY_FILENAME).read_bytes() for o in outs]
    assert len(keys[0]) == 32 and keys[0] != keys[1]
    assert (outs[0] / KEY_FILENAME).stat().st_mode & 0o777 == 0o600
    one, two, again = (load_synthetic(o).images for o in outs)
    assert np.abs(one - two).mean() > 1e-3
    np.testing.assert_array_equal(one, again)


RERUN_CHANGES = ("seed", "noise key", "training records", "global model")


def test_a_charged_round_rerun_on_other_inputs_is_refused_before_any_release(consortium, tmp_path):
    """One charge buys one release: rerunning round 1 exactly replays it; with anything changed it would publish new
    noise under the old charge, so it is refused and nothing on disk changes."""
    from medfdd.artifacts import save_model
    from privacy.accounting import ChargeConflict

    path = _site_config(consortium, tmp_path, iterations=5)
    cfg = load_site_config(path)
    model, other_model = tmp_path / "global.safetensors", tmp_path / "other.safetensors"
    save_model(model, convnet_for((1, 16, 16), 10, width=16, seed=0))
    save_model(other_model, convnet_for((1, 16, 16), 10, width=16, seed=1))
    distill_site(load_site_config(path), global_model=model, console=quiet())
    files = ("synthetic.npz", "synthetic.json", "privacy_ledger.json", KEY_FILENAME)
    before = {f: (cfg.output_dir / f).read_bytes() for f in files}
    config = path.read_text()
    distill_site(load_site_config(path), global_model=model, console=quiet())  # the same inputs: the same release, byte for byte
    assert {f: (cfg.output_dir / f).read_bytes() for f in files} == before
    for change in RERUN_CHANGES:
        raw, global_model = yaml.safe_load(config), model
        if change == "seed":
            raw["seed"] = 1
        elif change == "noise key":
            (cfg.output_dir / KEY_FILENAME).write_bytes(os.urandom(32))
        elif change == "training records":
            raw["data"]["holdout_fraction"] = 0.3
        else:
            global_model = other_model
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ChargeConflict, match="another one"):
            distill_site(load_site_config(path), global_model=global_model, console=quiet())
        assert {f: (cfg.output_dir / f).read_bytes() for f in files if f != KEY_FILENAME} == {
            f: b for f, b in before.items() if f != KEY_FILENAME}, change
        (cfg.output_dir / KEY_FILENAME).write_bytes(before[KEY_FILENAME])
        path.write_text(config)


def test_killed_process_never_under_counts(consortium, tmp_path):
    """SIGKILL a real `medfdd site distill` mid-run: the ledger already holds the full planned charge."""
    path = _site_config(consortium, tmp_path, iterations=400, checkpoint_every=5)
    cfg = load_site_config(path)
    exe = Path(sys.executable).with_name("medfdd")
    proc = subprocess.Popen([str(exe), "site", "distill", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    for line in proc.stdout:  # wait for the first checkpoint line: the run is mid-way
        if line.startswith("checkpoint: step"):
            break
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ledger = PrivacyLedger.load(cfg.output_dir / "privacy_ledger.json")
    (entry,) = [e for e in ledger.entries if e.purpose == "distill"]  # after the DP record count
    assert entry.steps == 400  # every planned step was paid for before the first one ran
    assert ledger.epsilon_spent > 0.9
    assert not (cfg.output_dir / "synthetic.npz").exists()


def test_decoupled_bank_targets_are_the_class_means_without_noise():
    """q = 1, sigma = 0: every banked target is the exact mean unit feature of each class (pooled counts = counts)."""
    from medfdd.distill.mechanism import unit_rows

    cfg = DistillConfig(ipc=2, iterations=3, batch_size=10**6, width=16, augment=False, precision="fp32")
    d = DistributionMatching(cfg, PrivacyPlan(False, 0.0, 1.0, 3, 1.0), num_classes=10, image_shape=(1, 8, 8), seed=0)
    x, y = _digits(120)
    init = d.init_state().images.detach()
    bank = d.bank(x, y, init)
    for s in range(3):
        net = d.network(s)
        f = unit_rows(net.embed(x).float(), bank.centers[s])
        target, usable = bank.target(s)
        for k in range(10):
            np.testing.assert_allclose(target[k].numpy(), f[y == k].mean(0).detach().numpy(), atol=1e-5)
        assert bool(usable.all())


@pytest.mark.parametrize("schedule", ["decoupled", "interleaved"])
def test_feddm_rounds_match_against_a_global_model_of_another_width(schedule):
    """Round 2+: every other network is the broadcast global model, whose embedding size differs from the fresh
    matching networks'; both schedules must handle the mix."""
    cfg = DistillConfig(ipc=2, iterations=4, batch_size=60, width=16, schedule=schedule)
    x, y = _digits()
    global_model = convnet_for((1, 8, 8), 10, width=32, seed=1)
    d = DistributionMatching(cfg, PrivacyPlan(True, 1.0, 0.3, 4, 1.0), num_classes=10, image_shape=(1, 8, 8),
                             seed=0, round_=2, matching_net=global_model)
    state = d.run(x, y)
    assert state.iteration == d.total_work and torch.isfinite(state.result()).all()
