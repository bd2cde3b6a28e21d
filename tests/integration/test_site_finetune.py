"""`site evaluate` with the site's own models: the global model fine-tuned on the site's training patients and a
local-only one, scored next to it; trained on training records only, kept at the site, never part of an offer."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

import medfdd.site.evaluate as site_evaluation
from medfdd.artifacts import META_KEYS, NPZ_KEYS, load_agreed_model, load_model, save_model
from medfdd.cli import main
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.data.site_data import load_site_data
from medfdd.training import TrainSettings, evaluate, train_classifier

SMALL_RECIPE = {"finetune": True, "epochs": 2, "batch_size": 128}


@pytest.fixture
def finetuning_site(digits_consortium, tmp_path):
    """A digits site with a CI-sized fine-tuning recipe, and a stand-in global model of width 16 trained a little
    on the other site's records."""
    paths = load_coordinator_config(digits_consortium(sites=2)).site_paths
    raw = yaml.safe_load(paths[0].read_text())
    raw["evaluate"] = SMALL_RECIPE
    paths[0].write_text(yaml.safe_dump(raw, sort_keys=False))
    other = load_site_data(load_site_config(paths[1]))
    model = train_classifier(other.images, other.labels, 10, TrainSettings(epochs=2, width=16), seed=0)
    return paths[0], save_model(tmp_path / "global_model.safetensors", model)


def test_site_evaluate_fine_tunes_on_training_records_only_and_scores_three_models(finetuning_site, monkeypatch):
    cfg_path, model_path = finetuning_site
    global_bytes = model_path.read_bytes()
    seen = []
    real = site_evaluation.train_classifier

    def spy(images, labels, num_classes, settings, **kw):
        seen.append((np.array(images), np.array(labels), settings, kw.get("init")))
        return real(images, labels, num_classes, settings, **kw)

    monkeypatch.setattr(site_evaluation, "train_classifier", spy)
    assert main(["site", "evaluate", str(cfg_path), "--model", str(model_path)]) == 0

    cfg = load_site_config(cfg_path)
    data = load_site_data(cfg)
    train = np.union1d(data.train, data.unused)
    assert len(data.holdout) and not set(data.rows[data.holdout]) & set(data.rows[train])
    # exactly the training records, in order, for both site models: the holdout never reaches training
    assert len(seen) == 2
    for images, labels, settings, _ in seen:
        assert np.array_equal(images, data.images[train]) and np.array_equal(labels, data.labels[train])
        assert (settings.epochs, settings.batch_size, settings.width) == (2, 128, 16)  # width of the global model
    assert [init is not None for *_, init in seen] == [True, False]  # fine-tuned from the global model, then scratch
    assert model_path.read_bytes() == global_bytes

    report = json.loads((cfg.output_dir / "evaluation.json").read_text())
    assert list(report["models"]) == ["global", "fine_tuned", "local_only"]
    assert report["results"] == report["models"]["global"]["results"]
    # the fine-tuned model file: safetensors of the agreed architecture, the one that was scored
    tuned_path = cfg.output_dir / site_evaluation.FINE_TUNED_FILE
    assert report["fine_tuned_model"]["sha256"] == hashlib.sha256(tuned_path.read_bytes()).hexdigest()
    tuned = load_agreed_model(tuned_path, in_channels=1, num_classes=10, spatial_size=data.images.shape[2:])
    glob = load_model(model_path)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), glob.state_dict().values(),
                                                       strict=True))
    for name, model in (("global", glob), ("fine_tuned", tuned)):
        for group, idx in (("holdout", data.holdout), ("training", train)):
            got = report["models"][name]["results"][group]
            want = evaluate(model, data.images[idx], data.labels[idx], 10)
            assert got["n"] == len(idx) and got["accuracy"] == pytest.approx(want["accuracy"])
            assert got["confusion_matrix"] == want["confusion_matrix"]
    assert set(report["models"]["local_only"]["results"]) == {"holdout", "training"}
    png = (cfg.output_dir / "evaluation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_site_evaluate_without_finetune_scores_the_global_model_only(finetuning_site):
    cfg_path, model_path = finetuning_site
    raw = yaml.safe_load(cfg_path.read_text())
    raw["evaluate"] = {"finetune": False}
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["site", "evaluate", str(cfg_path), "--model", str(model_path)]) == 0
    out = load_site_config(cfg_path).output_dir
    assert list(json.loads((out / "evaluation.json").read_text())["models"]) == ["global"]
    assert not (out / site_evaluation.FINE_TUNED_FILE).exists()


def test_the_site_models_never_enter_an_offer(finetuning_site):
    """After `site evaluate` has fine-tuned, the site's next offer is the allow-listed synthetic set and nothing
    else: the allow-list is the one it always was, and no byte of the fine-tuned model or its scores is in it."""
    from medfdd.messages import Broadcast
    from medfdd.site.offer import make_offer

    cfg_path, model_path = finetuning_site
    assert main(["site", "evaluate", str(cfg_path), "--model", str(model_path)]) == 0
    cfg = load_site_config(cfg_path)
    tuned = (cfg.output_dir / site_evaluation.FINE_TUNED_FILE).read_bytes()

    offer = make_offer(load_site_config(cfg_path), Broadcast(round=1))
    assert NPZ_KEYS == ("images", "labels") and set(offer.arrays) == set(NPZ_KEYS)
    assert META_KEYS == ("site_id", "round", "method", "ipc", "classes", "spatial_size", "channels", "epsilon",
                         "epsilon_round", "delta", "accountant", "noise_multiplier", "sample_rate", "steps",
                         "clip_norm", "dp", "medfdd_version", "class_evidence", "allocation", "privacy_unit", "noise_source")
    assert set(offer.meta) <= set(META_KEYS)
    sent = b"".join(a.data for a in offer.arrays.values()) + json.dumps(offer.meta, default=str).encode()
    assert tuned[-256:] not in sent  # the last weights of the fine-tuned model
    assert b"fine_tuned" not in sent and b"local_only" not in sent
    n_synthetic = offer.meta["ipc"] * len(cfg.data.classes)
    assert offer.arrays["images"].shape[0] == offer.arrays["labels"].shape[0] <= n_synthetic
