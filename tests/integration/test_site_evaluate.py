"""`medfdd site evaluate`: a hospital scores the global model on its own DICOM scans; nothing leaves the site."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medfdd.artifacts import save_model
from medfdd.cli import main
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.data.site_data import load_site_data
from medfdd.nets import convnet_for
from medfdd.training import TrainSettings, evaluate, train_classifier


@pytest.fixture
def site_and_model(digits_consortium, tmp_path):
    """A digits site from `prepare` and a model trained a little on another site's records (a stand-in for the
    global model: any model of the agreed architecture)."""
    paths = load_coordinator_config(digits_consortium(sites=2)).site_paths
    other = load_site_data(load_site_config(paths[1]))
    model = train_classifier(other.images, other.labels, 10, TrainSettings(epochs=5, width=16), seed=0)
    return paths[0], save_model(tmp_path / "global_model.safetensors", model)


def test_site_evaluate_scores_holdout_and_training_patients_separately(site_and_model, capsys):
    cfg_path, model_path = site_and_model
    assert main(["site", "evaluate", str(cfg_path), "--model", str(model_path)]) == 0
    printed = capsys.readouterr().out
    assert "audit holdout (never used)" in printed and "recall per class" in printed

    cfg = load_site_config(cfg_path)
    report = json.loads((cfg.output_dir / "evaluation.json").read_text())
    data = load_site_data(cfg)
    from medfdd.artifacts import load_model

    model = load_model(model_path)
    for group, idx in (("holdout", data.holdout), ("training", np.union1d(data.train, data.unused))):
        expected = evaluate(model, data.images[idx], data.labels[idx], 10)
        got = report["results"][group]
        assert got["n"] == len(idx) > 0
        assert got["accuracy"] == pytest.approx(expected["accuracy"])
        assert got["confusion_matrix"] == expected["confusion_matrix"]
        assert list(got["per_class_recall"]) == cfg.data.classes
    assert report["site_id"] == cfg.site_id and len(report["model_sha256"]) == 64
    png = (cfg.output_dir / "evaluation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize("spoil, problem", [
    ("classes", "architecture does not match"),
    ("nan", "NaN/Inf"),
])
def test_site_evaluate_refuses_a_model_that_is_not_the_agreed_one(site_and_model, tmp_path, capsys, spoil, problem):
    cfg_path, _ = site_and_model
    model = convnet_for((1, 16, 16), 3 if spoil == "classes" else 10, width=16, seed=0)
    if spoil == "nan":
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    bad = save_model(tmp_path / "bad.safetensors", model)
    assert main(["site", "evaluate", str(cfg_path), "--model", str(bad)]) != 0
    err = capsys.readouterr().err.replace("\n", "")  # the console wraps long lines
    assert "bad.safetensors" in err and problem in err
    assert not (load_site_config(cfg_path).output_dir / "evaluation.json").exists()


def test_site_evaluate_with_one_class_reports_auc_as_undefined(site_builder, tmp_path):
    b = site_builder(holdout_fraction=0.0)
    for i in range(4):
        b.add_dicom(f"a{i}.dcm", "a", patient_id=f"p{i}")
    path = b.write()
    model_path = save_model(tmp_path / "m.safetensors", convnet_for((1, 16, 16), 2, width=8, seed=0))
    assert main(["site", "evaluate", str(path), "--model", str(model_path)]) == 0
    report = json.loads((load_site_config(path).output_dir / "evaluation.json").read_text())
    assert list(report["results"]) == ["training"]  # no holdout at this site
    assert report["results"]["training"]["auc"] is None and report["results"]["training"]["n"] == 4
