"""The mechanism's noise: float64 draws on 53-bit uniforms (no float32 truncation of the tail at 5.77), keyed or from
the operating system (`privacy.noise_source: secure`), and what a secure-noise round may and may not do on resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from medfdd.config import DistillConfig, load_site_config
from medfdd.distill import mechanism
from medfdd.distill.base import PrivacyPlan
from medfdd.distill.distribution_matching import DistributionMatching, SignalBank
from medfdd.distill.mechanism import SECURE, SecureNoiseReplay, box_muller, noisy_class_stats, standard_normal, uniforms
from medfdd.site.distill import distill_site
from medfdd.site.record_count import COUNT_FILE, private_record_count
from privacy.accounting import Charge, PrivacyLedger

FLOAT32_LIMIT = math.sqrt(-2 * math.log(2.0**-24))  # 5.77: the largest |z| of Box-Muller on float32 uniforms


def _keyed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("source", ["keyed", "secure"])
def test_noise_is_float64_from_53_bit_uniforms(source):
    """Every uniform lies on the 2^-53 grid and nearly all use bits below 2^-24 (a float32 uniform never does)."""
    rng = _keyed() if source == "keyed" else SECURE
    u = uniforms(20_000, rng)
    assert u.dtype == torch.float64 and 0 <= float(u.min()) and float(u.max()) < 1
    k = u * 2.0**53
    assert torch.equal(k, k.round())
    assert float(((u * 2.0**24) % 1 != 0).double().mean()) > 0.99
    z = standard_normal((401, 501), rng)  # std and mean within ~7 standard errors
    assert z.dtype == torch.float64 and z.shape == (401, 501)
    assert 0.98 < float(z.std()) < 1.02 and abs(float(z.mean())) < 0.015


def test_the_released_statistic_is_not_truncated_at_the_float32_limit(monkeypatch):
    """Feed the extreme 53-bit uniform (1 - 2^-53) to the mechanism: its noise reaches sqrt(106 ln 2) = 8.57 sigma C,
    beyond the 5.77 that float32 Box-Muller can never exceed, and it is added to the statistic in full."""
    assert float(box_muller(torch.tensor([1 - 2.0**-24, 0.0], dtype=torch.float64))[0]) == pytest.approx(
        FLOAT32_LIMIT, rel=1e-6)
    extreme = math.sqrt(106 * math.log(2))

    def first_extreme(n, rng):
        u = torch.zeros(n, dtype=torch.float64)
        u[0] = 1 - 2.0**-53  # radius of the first pair, angle 0: z[0] = +radius, z[n/2] = 0
        return u

    monkeypatch.setattr(mechanism, "uniforms", first_extreme)
    f, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 1, 0])
    exact = noisy_class_stats(f, y, 2, clip_norm=1.0, noise_multiplier=0.0, generator=None)
    noisy = noisy_class_stats(f, y, 2, clip_norm=1.0, noise_multiplier=3.0, generator=_keyed())
    delta = (noisy.sums - exact.sums).double()
    assert float(delta[0, 0]) == pytest.approx(3.0 * extreme, rel=1e-6) and extreme > FLOAT32_LIMIT + 2.5
    assert torch.count_nonzero(delta) == 1


def test_the_mechanism_adds_the_float64_draw_of_its_generator():
    """The released sums minus the exact sums are std x `standard_normal` of the same keyed generator (then rounded
    to float32): the noise is the float64 draw, not a float32 one."""
    f, y = torch.randn(40, 16), torch.randint(0, 3, (40,))
    exact = noisy_class_stats(f, y, 3, clip_norm=1.0, noise_multiplier=0.0, generator=None)
    noisy = noisy_class_stats(f, y, 3, clip_norm=1.0, noise_multiplier=2.0, generator=_keyed(5))
    z = standard_normal((3, 16), _keyed(5))
    assert torch.allclose(noisy.sums.double() - exact.sums.double(), 2.0 * z, atol=1e-5)


def test_keyed_draws_replay_and_secure_draws_do_not():
    assert torch.equal(standard_normal((64,), _keyed(1)), standard_normal((64,), _keyed(1)))
    assert not torch.equal(standard_normal((64,), _keyed(1)), standard_normal((64,), _keyed(2)))
    assert not torch.equal(standard_normal((64,), SECURE), standard_normal((64,), SECURE))
    assert not torch.equal(uniforms(64, SECURE), uniforms(64, SECURE))


def _digits(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target[:n])


def _dm(schedule: str, source: str, steps: int = 4) -> DistributionMatching:
    cfg = DistillConfig(ipc=1, iterations=steps, batch_size=60, width=8, inner_steps=2, schedule=schedule)
    return DistributionMatching(cfg, PrivacyPlan(True, 2.0, 0.3, steps, 1.0, noise_source=source), num_classes=10,
                                image_shape=(1, 8, 8), seed=3)


@pytest.mark.parametrize("schedule", ["interleaved", "decoupled"])
def test_secure_sampling_and_noise_are_not_reproducible(schedule):
    """Same seed, same plan: keyed runs release the same images, secure runs do not (nor the same Poisson sample)."""
    x, y = _digits()
    assert torch.equal(_dm(schedule, "keyed").run(x, y).result(), _dm(schedule, "keyed").run(x, y).result())
    assert not torch.equal(_dm(schedule, "secure").run(x, y).result(), _dm(schedule, "secure").run(x, y).result())
    d = _dm(schedule, "secure")
    assert not torch.equal(d.poisson_sample(1000, 0), d.poisson_sample(1000, 0))
    k = _dm(schedule, "keyed")
    assert torch.equal(k.poisson_sample(1000, 0), k.poisson_sample(1000, 0))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("schedule,stop_at", [("interleaved", 2), ("decoupled", 2), ("decoupled", 6)])
def test_a_secure_run_resumes_only_where_nothing_kept_depends_on_lost_noise(schedule, stop_at, tmp_path):
    """Interleaved (and decoupled still paying its bank, 4 statistics): the state holds only what statistics drawn
    once produced, so the run continues. Decoupled after its first update (6 > 4): the images follow the paid bank,
    so the run continues from the bank it kept, and is refused (before anything is drawn) without it or with another
    release's bank: a new bank would be a second release."""
    x, y = _digits()
    store = (tmp_path / "bank.safetensors", "release-a")
    d = _dm(schedule, "secure")
    d.secure_store = store
    state = d.init_state()

    def stop(st, _loss):
        if st.iteration >= stop_at:
            raise _Stop

    with pytest.raises(_Stop):
        d.run(x, y, state, on_step=stop)
    before = (state.images.detach().clone(), state.iteration)
    if stop_at > 4:
        for other in (None, (store[0], "release-b"), (tmp_path / "missing.safetensors", store[1])):
            resumed = _dm(schedule, "secure")
            resumed.secure_store = other
            with pytest.raises(SecureNoiseReplay, match="second release"):
                resumed.run(x, y, state)
            assert torch.equal(state.images.detach(), before[0]) and state.iteration == before[1]
    resumed = _dm(schedule, "secure")
    resumed.secure_store = store
    assert resumed.run(x, y, state).iteration == resumed.total_work


@pytest.mark.parametrize("center", [True, False])
def test_a_kept_bank_comes_back_exactly(center, tmp_path):
    x, y = _digits()
    d = _dm("decoupled", "secure")
    d.cfg = d.cfg.model_copy(update={"center": center})
    bank = d.bank(x, y, d.init_state().images.detach())
    bank.save(tmp_path / "bank.safetensors", "release-a")
    back = SignalBank.load(tmp_path / "bank.safetensors", "release-a", 4, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(bank.sums, back.sums, strict=True))
    assert torch.equal(bank.pooled_counts, back.pooled_counts) and bank.families == back.families
    assert bank.feature_scale == back.feature_scale and (bank.centers[0] is None) == (not center)
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(bank.centers, back.centers, strict=True))
    assert SignalBank.load(tmp_path / "bank.safetensors", "release-a", 5, torch.device("cpu")) is None


# ------------------------------------------------------------------ the site runner


def _secure_site(site_builder, output: str = "out", **distill) -> tuple:
    b = site_builder(classes=("a", "b"))
    rng = np.random.default_rng(1)
    for i in range(40):
        label = "a" if i % 2 else "b"
        b.add_dicom(f"s{i}.dcm", label, pixels=(rng.integers(0, 80, (16, 16)) + (120 if label == "a" else 0))
                    .astype(np.uint8), patient_id=f"P{i}")
    path = b.write(privacy={"dp": True, "epsilon": 4.0, "delta": 1e-5, "accountant": "rdp", "noise_source": "secure"},
                   distill={"method": "dm", "ipc": 1, "iterations": 4, "width": 8, "checkpoint_every": 2, **distill},
                   output=output)
    return path, load_site_config(path).output_dir


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


def test_a_released_secure_round_is_never_drawn_again(site_builder):
    """Keyed noise replays a charged round byte for byte; secure noise cannot, so rerunning it is refused and nothing
    on disk changes."""
    path, out = _secure_site(site_builder, schedule="interleaved")
    distill_site(load_site_config(path), console=_quiet())
    files = ("synthetic.npz", "synthetic.json", "privacy_ledger.json")
    before = {f: (out / f).read_bytes() for f in files}
    with pytest.raises(SecureNoiseReplay, match="charged by an earlier run"):
        distill_site(load_site_config(path), console=_quiet())
    assert {f: (out / f).read_bytes() for f in files} == before


def test_an_interrupted_secure_round_resumes_from_its_checkpoint_or_not_at_all(site_builder):
    """Interleaved: stopped at step 2, the round resumes from its checkpoint without a second charge. Decoupled,
    stopped in its update phase: resumes from the bank it kept, refused without it; once released, refused even
    with the artifact deleted (never a fresh draw)."""
    path, out = _secure_site(site_builder, schedule="interleaved")
    distill_site(load_site_config(path), console=_quiet(), stop_after=2)
    ledger = (out / "privacy_ledger.json").read_bytes()
    assert distill_site(load_site_config(path), console=_quiet()).resumed_from == 2
    assert (out / "privacy_ledger.json").read_bytes() == ledger and (out / "synthetic.npz").is_file()

    path, out = _secure_site(site_builder, "out-decoupled", schedule="decoupled", inner_steps=2)
    distill_site(load_site_config(path), console=_quiet(), stop_after=6)  # 4 paid statistics, then 2 of 8 updates
    bank = out / "checkpoints" / "round-1-bank.safetensors"
    kept = bank.read_bytes()
    bank.unlink()
    with pytest.raises(SecureNoiseReplay, match="not kept"):
        distill_site(load_site_config(path), console=_quiet())
    bank.write_bytes(kept)
    assert distill_site(load_site_config(path), console=_quiet()).resumed_from == 6
    assert (out / "synthetic.npz").is_file() and not bank.exists()
    (out / "synthetic.npz").unlink()
    with pytest.raises(SecureNoiseReplay, match="no checkpoint"):
        distill_site(load_site_config(path), console=_quiet())


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # a count noise of 1e5 costs ~0
def test_a_secure_record_count_is_fresh_and_never_redrawn_once_used(site_builder, tmp_path):
    """Two sites with the same seed draw different secure counts; a lost count file is redrawn only while no round has
    used it, and refused after."""
    path, _ = _secure_site(site_builder)
    estimates = []
    for name in ("one", "two"):
        cfg = load_site_config(path).model_copy(update={"output": tmp_path / name})
        cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"count_noise": 1e5})})
        ledger = PrivacyLedger.open(cfg.output_dir / "privacy_ledger.json", site_id=cfg.site_id, epsilon=4.0,
                                    delta=1e-5, accountant="rdp", unit="scan")
        estimates.append(private_record_count(cfg, ledger, n=10**7, seed=0))
    assert estimates[0] != estimates[1]
    (cfg.output_dir / COUNT_FILE).unlink()  # lost before any round used it: the lost draw was never released
    again = private_record_count(cfg, ledger, n=10**7, seed=0)
    assert again != estimates[1] and len(ledger.entries) == 1
    ledger.charge(Charge(5.0, 0.01, 10, round=1, purpose="distill", release="r"))
    (cfg.output_dir / COUNT_FILE).unlink()
    with pytest.raises(SecureNoiseReplay, match="backup"):
        private_record_count(cfg, ledger, n=10**7, seed=0)
