"""Baselines on the same split: centralized, local-only, random subset, FedAvg and DP-FedAvg (Opacus DP-SGD)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfdd.baselines import centralized, fedavg, load_sites, local_only, poisson_loader_plan, random_subset
from medfdd.config import load_coordinator_config
from medfdd.training import TrainSettings


def test_baselines_on_a_small_digits_consortium(digits_consortium):
    cfg = load_coordinator_config(digits_consortium(sites=2))
    sites, test, k = load_sites(cfg)
    assert [s.site_id for s in sites] == ["hospital-a", "hospital-b"] and k == 10
    settings = TrainSettings(epochs=15, width=16)
    central = centralized(sites, test, k, settings, seed=0)
    local = local_only(sites, test, k, settings, seed=0)
    subset = random_subset(sites, test, k, settings, ipc=2, seed=0)
    assert central["accuracy"] > 0.5  # digits pooled is easy; chance is 0.1
    assert set(local["per_site"]) == {"hospital-a", "hospital-b"}
    assert subset["n_images"] <= 2 * 2 * k

    plain = fedavg(sites, test, k, rounds=2, local_epochs=1, width=16, seed=0)
    private = fedavg(sites, test, k, rounds=2, local_epochs=1, width=16, epsilon=1.0, seed=0)
    assert all(math.isinf(e) for e in plain["epsilon_per_site"].values())
    assert all(0.9 < e <= 1.0 + 1e-6 for e in private["epsilon_per_site"].values())  # Opacus-calibrated budget
    assert all(s > 0 for s in private["noise_multiplier"].values())
    assert private["bytes_up_total"] == private["model_bytes"] * 2 * len(sites)  # model x rounds x sites
    assert len(plain["accuracy_per_round"]) == 2 and np.isfinite(plain["accuracy"])


@pytest.mark.parametrize("n,batch", [(250, 100), (1000, 64), (64, 64), (30, 64), (1797, 256)])
def test_dp_fedavg_accounts_the_sampling_opacus_actually_runs(n, batch):
    """DP-FedAvg's epsilon is computed for the sample rate and steps of the loader Opacus builds, not batch / n."""
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=min(batch, n))
    dp_loader = DPDataLoader.from_data_loader(loader)
    assert poisson_loader_plan(n, batch) == (pytest.approx(dp_loader.sample_rate), len(dp_loader))
