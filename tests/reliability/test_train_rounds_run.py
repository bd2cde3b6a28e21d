"""`train_rounds`: the coordinator trains round r's global model on the merged sets of the last rounds (released
already: post-processing). The round-2 model of a run with `train_rounds: 0` is retrained here from the run's own
files: it is the model of the union of rounds 1 and 2, not of round 2 alone, and no site paid more for it."""

from __future__ import annotations

import json

import numpy as np
import torch
from reliability_helpers import tiny_consortium
from rich.console import Console
from safetensors.numpy import load_file

from medfdd.config import load_coordinator_config
from medfdd.coordinator.merge import MergedSet, load_merged, union_of_rounds
from medfdd.federation.inprocess import run_inprocess
from medfdd.training import TrainSettings, train_classifier


def _round_set(out, r: int) -> MergedSet:
    return load_merged(out / "rounds" / f"round-{r}" / "merged.npz")


def _weights(cfg, s: MergedSet, seed: int) -> dict[str, np.ndarray]:
    t = cfg.train
    model = train_classifier(s.images, s.labels, 10, TrainSettings(epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                                                                   width=t.width, augment=t.augment),
                             seed=seed, device=torch.device("cpu"), weights=s.training_weights)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_round_two_trains_on_both_rounds_sets_at_no_extra_charge(tmp_path):
    coord = tiny_consortium(tmp_path / "c", sites=2, rounds=2, train_rounds=0)
    run_inprocess(coord, console=Console(quiet=True))
    cfg = load_coordinator_config(coord)
    out = cfg.output_dir
    run = json.loads((out / "run.json").read_text())
    assert [r["trained_on_rounds"] for r in run["rounds"]] == [[1], [1, 2]]
    assert run["rounds"][1]["n_trained_on"] == run["rounds"][0]["n_merged"] + run["rounds"][1]["n_merged"]
    saved = load_file(out / "rounds" / "round-2" / "global_model.safetensors")
    union = union_of_rounds([_round_set(out, 1), _round_set(out, 2)])
    assert abs(float(union.weights.mean()) - 1) < 1e-5
    assert _same(_weights(cfg, union, cfg.seed + 2), saved)
    assert not _same(_weights(cfg, _round_set(out, 2), cfg.seed + 2), saved)
    # the union costs nothing: every site stays within the epsilon 1 it declared (tiny_consortium's budget)
    assert all(eps <= 1.0 + 1e-9 for eps in run["rounds"][1]["epsilon"].values())
