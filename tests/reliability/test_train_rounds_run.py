"""`train_rounds`: the coordinator trains round r's global model on the merged sets of the last rounds (released
already: post-processing). The round-2 model of a run with `train_rounds: 0` is retrained here from the run's own
files: it is the model of the union of rounds 1 and 2, not of round 2 alone, and no site paid more for it. The
audit's DCR measures against every round's release, since the model now draws on all of them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from reliability_helpers import tiny_consortium
from rich.console import Console
from safetensors.numpy import load_file

from medfdd.artifacts import load_synthetic
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.coordinator.merge import MergedSet, load_merged, union_of_rounds
from medfdd.data.site_data import load_site_data
from medfdd.federation.inprocess import run_inprocess
from medfdd.io import atomic_save_npz
from medfdd.training import TrainSettings, train_classifier
from privacy.audit.run import CONSORTIUM, audit_run
from privacy.audit.scores import dcr_scores
from privacy.audit.spec import AuditSpec


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


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    coord = tiny_consortium(tmp_path_factory.mktemp("train-rounds") / "c", sites=2, rounds=2, train_rounds=0)
    run_inprocess(load_coordinator_config(coord), console=Console(quiet=True))
    return coord


def test_round_two_trains_on_both_rounds_sets_at_no_extra_charge(coord):
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


def _plant(npz, record: np.ndarray) -> None:
    """Put `record` in place of the first image of a written release (the other arrays unchanged)."""
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["images"][0] = record
    atomic_save_npz(npz, **arrays)


def test_the_audits_dcr_measures_against_every_rounds_release(coord, tmp_path):
    """On a copy of the run, a real record planted in round 1's releases (each site's and the merged set) is what
    DCR finds for that record although the last round's release lies far from it: the audit reads every round."""
    out = tmp_path / "run"
    shutil.copytree(load_coordinator_config(coord).output_dir, out)
    run = json.loads((out / "run.json").read_text())
    sids = sorted(run["sites"])
    pools = {}
    for sid in sids:
        data = load_site_data(load_site_config(run["sites"][sid]["config"]))
        pools[sid] = data.images[np.r_[data.train, data.holdout]]
        _plant(out / "rounds" / "round-1" / "sites" / sid / "synthetic.npz", pools[sid][0])
    _plant(out / "rounds" / "round-1" / "merged.npz", pools[sids[0]][0])
    outcome = audit_run(out, AuditSpec(attacks=["dcr"], targets=["synthetic"]), console=Console(quiet=True))
    rows = {r.site: r for r in outcome.rows}
    assert sorted(rows) == sorted([*sids, CONSORTIUM])
    for sid in sids:
        releases = [load_synthetic(out / "rounds" / f"round-{r}" / "sites" / sid).images for r in (1, 2)]
        latest = load_synthetic(out / "sites" / sid).images
        assert np.array_equal(releases[1], latest)  # the round copy is what the site released
        last_only = dcr_scores(pools[sid], latest)
        assert np.allclose(rows[sid].scores, dcr_scores(pools[sid], np.concatenate(releases)))
        assert rows[sid].scores[0] == rows[sid].scores.max() > last_only[0] + 5  # distance 0: round 1 counted
        assert rows[sid].details == {"released_rounds": [1, 2], "n_synthetic": sum(map(len, releases))}
    merged = np.concatenate([_round_set(out, r).images for r in (1, 2)])
    pool = np.concatenate([pools[sid] for sid in sids])
    assert np.allclose(rows[CONSORTIUM].scores, dcr_scores(pool, merged))
    assert rows[CONSORTIUM].scores[0] > dcr_scores(pool[:1], _round_set(out, 2).images)[0] + 5


def test_the_audit_says_when_its_shadow_pipelines_replay_one_round_of_several(coord):
    out = load_coordinator_config(coord).output_dir
    quiet = Console(quiet=True)
    dcr = audit_run(out, AuditSpec(attacks=["dcr"], targets=["synthetic"]), console=quiet)
    assert not any("replay one round" in n for n in dcr.notes)  # DCR reads every round's release itself
    canary = audit_run(out, AuditSpec(attacks=["canary"], canaries=4), console=quiet)
    assert any("2 rounds" in n and "replay one round" in n for n in canary.notes)
