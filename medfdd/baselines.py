"""Baselines on the same consortium split, for benchmarks and the demo (they read real records: never a product path).

- centralized: one model on every site's training records pooled (non-private upper reference).
- local-only: each site trains on its own records; the mean over sites is reported.
- random real subset: `ipc` real images per class per site, merged (the non-private "distillation" floor).
- FedAvg (McMahan et al. 2017) and DP-FedAvg: sites train the global model locally for a few epochs per round and the
  coordinator averages the weights (weighted by records). DP-FedAvg uses Opacus DP-SGD (Abadi et al. 2016) at each site
  with noise calibrated by Opacus to the site's (epsilon, delta) over all rounds, the same budget a distilling site has.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from medfdd.config import CoordinatorConfig
from medfdd.coordinator.run import load_test_set
from medfdd.federation.consortium import consortium_of, shared_intensity
from medfdd.nets import Classifier, convnet_for, quiet_backward_hooks
from medfdd.training import TrainSettings, evaluate, train_classifier
from privacy.accounting import calibrate_round_noise, epsilon_for


@dataclass
class SiteRecords:
    site_id: str
    x: np.ndarray  # the site's training split
    y: np.ndarray


def load_sites(cfg: CoordinatorConfig) -> tuple[list[SiteRecords], tuple[np.ndarray, np.ndarray], int]:
    """Every in-process site's training split and the coordinator's test split; returns (sites, test, classes)."""
    from medfdd.data.site_data import load_site_data

    spec, configs = consortium_of(cfg)
    sites = []
    for sid, site in sorted(configs.items()):
        data = load_site_data(site)
        sites.append(SiteRecords(sid, data.images[data.train], data.labels[data.train]))
    test = load_test_set(cfg, spec, cfg.output_dir.parent / "baselines", shared_intensity(cfg, configs))
    return sites, test, len(spec.classes)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def centralized(sites: list[SiteRecords], test, k: int, settings: TrainSettings, *, seed: int) -> dict:
    x = np.concatenate([s.x for s in sites])
    y = np.concatenate([s.y for s in sites])
    return evaluate(train_classifier(x, y, k, settings, seed=seed), *test, k)


def local_only(sites: list[SiteRecords], test, k: int, settings: TrainSettings, *, seed: int) -> dict:
    per_site = {s.site_id: evaluate(train_classifier(s.x, s.y, k, settings, seed=seed), *test, k)["accuracy"]
                for s in sites}
    return {"accuracy": float(np.mean(list(per_site.values()))), "per_site": per_site}


def random_subset(sites: list[SiteRecords], test, k: int, settings: TrainSettings, *, ipc: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    keep_x, keep_y = [], []
    for s in sites:
        for c in range(k):
            idx = np.flatnonzero(s.y == c)
            pick = rng.choice(idx, size=min(ipc, len(idx)), replace=False)
            keep_x.append(s.x[pick])
            keep_y.append(s.y[pick])
    x, y = np.concatenate(keep_x), np.concatenate(keep_y)
    return {**evaluate(train_classifier(x, y, k, settings, seed=seed), *test, k), "n_images": int(len(y))}


def _local_sgd(model: Classifier, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int,
               noise_multiplier: float | None, clip: float, seed: int) -> dict[str, torch.Tensor]:
    """Local epochs of SGD (or Opacus DP-SGD with Poisson sampling when noise_multiplier is given)."""
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    loader = DataLoader(ds, batch_size=min(batch_size, len(ds)), shuffle=True, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    net = model
    if noise_multiplier is not None:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        net, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                               noise_multiplier=noise_multiplier, max_grad_norm=clip,
                                               poisson_sampling=True, noise_generator=torch.Generator().manual_seed(seed))
    net.train()
    with quiet_backward_hooks():
        for _ in range(epochs):
            for xb, yb in loader:
                if len(yb) == 0:
                    continue
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(xb), yb).backward()
                opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def poisson_loader_plan(n: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch) of the Poisson loader Opacus's `make_private` builds from our DataLoader of
    `n` records: `DPDataLoader.from_data_loader` samples at 1 / len(loader) for len(loader) = ceil(n / batch) steps,
    which is what must be accounted (batch / n under-counts when batch does not divide n)."""
    batches = math.ceil(n / min(batch_size, n))
    return 1.0 / batches, batches


def fedavg(sites: list[SiteRecords], test, k: int, *, rounds: int, local_epochs: int = 1, lr: float = 0.01,
           batch_size: int = 64, width: int = 128, epsilon: float | None = None, delta: float = 1e-5,
           clip: float = 1.0, seed: int = 0, start: Classifier | None = None,
           already_spent: dict[str, list] | None = None) -> dict:
    """FedAvg, or DP-FedAvg when `epsilon` is given (per-site budget over all rounds, Opacus-calibrated).

    Hybrid (synthetic warm start, then DP fine-tuning): `start` is the initial global model (e.g. trained on the merged
    synthetic sets) and `already_spent[site]` the site's earlier charges (sigma, q, steps); the fine-tuning noise is
    calibrated so that they and all its rounds compose to `epsilon` (Opacus RDP; adaptive composition, Mironov 2017).
    """
    shape = tuple(sites[0].x.shape[1:])
    global_model = copy.deepcopy(start) if start is not None else convnet_for(shape, k, width=width, seed=seed)
    size = model_bytes(global_model)
    sigmas, spent = {}, {}
    for s in sites:
        q, per_epoch = poisson_loader_plan(len(s.y), batch_size)
        steps = rounds * local_epochs * per_epoch
        prior = list((already_spent or {}).get(s.site_id, []))
        if epsilon is not None:
            sigmas[s.site_id] = calibrate_round_noise(epsilon=epsilon, delta=delta, sample_rate=q,
                                                      steps_per_round=steps, rounds=1, already_spent=prior)
            spent[s.site_id] = epsilon_for([*prior, (sigmas[s.site_id], q, steps)], delta=delta)
        else:
            spent[s.site_id] = math.inf
    history = []
    for r in range(1, rounds + 1):
        states, weights = [], []
        for i, s in enumerate(sites):
            local = copy.deepcopy(global_model).train()
            states.append(_local_sgd(local, s.x, s.y, epochs=local_epochs, lr=lr, batch_size=batch_size,
                                     noise_multiplier=sigmas.get(s.site_id), clip=clip, seed=seed * 1000 + r * 100 + i))
            weights.append(len(s.y))
        w = torch.tensor(weights, dtype=torch.float32) / sum(weights)
        avg = {key: sum(wi * st[key].float() for wi, st in zip(w, states, strict=True)).to(states[0][key].dtype)
               for key in states[0]}
        global_model.load_state_dict(avg)
        history.append(evaluate(global_model.eval(), *test, k)["accuracy"])
    metrics = evaluate(global_model.eval(), *test, k)
    n = len(sites)
    return {**metrics, "accuracy_per_round": history, "epsilon_per_site": spent, "noise_multiplier": sigmas,
            "bytes_up_total": size * rounds * n, "bytes_down_total": size * rounds * n, "model_bytes": size}
