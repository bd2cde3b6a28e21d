"""CLI habits (issue 38): --version, --json, -q/-v, exit codes, Ctrl-C, no hard wrapping, a log per run, the
coordinator's training progress, `site evaluate` checking --model first, config key suggestions and YAML lines."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import medfdd
from medfdd import exit_codes
from medfdd.artifacts import save_model
from medfdd.cli import main
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.errors import ConfigError
from medfdd.nets import convnet_for
from medfdd.training import TrainSettings, train_classifier

ROOT = Path(__file__).resolve().parents[1]  # the subprocess runs this checkout's medfdd


def _logs(folder: Path, command: str) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted((folder / "logs").glob(f"{command}-*.log"))]


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == exit_codes.OK
    assert capsys.readouterr().out.strip() == f"medfdd {importlib.metadata.version('medfdd')}"
    assert medfdd.__version__ == importlib.metadata.version("medfdd")


def test_exit_codes_are_distinct_and_errors_have_no_traceback_unless_verbose(tmp_path, capsys):
    codes = [exit_codes.OK, exit_codes.PRIVACY_VIOLATION, exit_codes.USAGE, exit_codes.RUNTIME_ERROR,
             exit_codes.INTERRUPTED]
    assert len(set(codes)) == len(codes) and exit_codes.INTERRUPTED == 128 + signal.SIGINT
    with pytest.raises(SystemExit) as e:
        main(["site", "budget", "--no-such-flag", "x.yaml"])
    assert e.value.code == exit_codes.USAGE
    capsys.readouterr()
    missing = str(tmp_path / "missing.yaml")
    assert main(["site", "budget", missing]) == exit_codes.RUNTIME_ERROR
    err = capsys.readouterr().err
    assert "config file not found" in err and "Traceback" not in err
    assert main(["-v", "site", "budget", missing]) == exit_codes.RUNTIME_ERROR
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["site", "distill", "--help"])
    usage = capsys.readouterr().out
    assert "--round ROUND " in usage and "ROUND_" not in usage


@pytest.fixture
def site_config(site_builder, tmp_path):
    """A valid site config whose output folder sits deep enough that its path is longer than a terminal line."""
    b = site_builder()
    for i in range(4):
        b.add_dicom(f"s{i}.dcm", "ab"[i % 2], patient_id=f"p{i}")
    path = b.write()
    raw = yaml.safe_load(path.read_text())
    raw["output"] = str(tmp_path / ("a-rather-long-folder-name-" * 4) / "out")
    path.write_text(yaml.safe_dump(raw))
    load_site_config(path).output_dir.mkdir(parents=True)
    return path


def test_quiet_json_no_hard_wrap_and_a_log_file(site_config, capsys):
    out_dir = load_site_config(site_config).output_dir
    assert main(["site", "budget", str(site_config)]) == exit_codes.OK
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if "no ledger yet" in x)
    assert str(out_dir / "privacy_ledger.json") in line and len(line) > 100  # one line, not wrapped at 80
    assert main(["site", "budget", str(site_config), "-q"]) == exit_codes.OK
    assert capsys.readouterr().out == ""
    assert main(["site", "budget", str(site_config), "--json"]) == exit_codes.OK
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result == {"site_id": load_site_config(site_config).site_id, "spent": 0.0, "budget": 1.0, "rounds": [],
                      "chart": None}
    assert "no ledger yet" in captured.err  # the human message went to stderr
    logs = _logs(out_dir, "site-budget")
    assert len(logs) == 3 and all("no ledger yet" in log for log in logs)  # even the quiet run's


def test_site_evaluate_checks_the_model_before_reading_any_scan(site_config, tmp_path, monkeypatch, capsys):
    import medfdd.site.evaluate as ev

    def no_scans(*args, **kwargs):
        raise AssertionError("scans were loaded before the model was checked")

    monkeypatch.setattr(ev, "load_with_progress", no_scans)
    cfg = load_site_config(site_config)
    wrong = save_model(tmp_path / "wrong.safetensors", convnet_for((1, *cfg.data.spatial_size), 3, width=8, seed=0))
    not_a_model = tmp_path / "junk.safetensors"
    not_a_model.write_bytes(b"not safetensors")
    for model, problem in ((tmp_path / "nothing.safetensors", "model file not found"), (not_a_model, "safetensors"),
                           (wrong, "num_classes")):
        assert main(["site", "evaluate", str(site_config), "--model", str(model)]) == exit_codes.RUNTIME_ERROR
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err and "scans were loaded" not in err


def test_unknown_keys_suggest_the_closest_and_yaml_errors_name_file_and_line(site_config):
    raw = yaml.safe_load(site_config.read_text())
    raw["privacy"]["epsilom"] = 2.0
    raw["data"]["holdout_fractoin"] = 0.1
    site_config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_site_config(site_config)
    assert "did you mean 'epsilon'?" in str(e.value) and "did you mean 'holdout_fraction'?" in str(e.value)
    site_config.write_text("site_id: a\ndata:\n  root: .\n   classes: [a, b]\n")
    with pytest.raises(ConfigError) as e:
        load_site_config(site_config)
    assert str(e.value).startswith(f"{site_config}, line 4")


def test_the_training_callback_leaves_the_numerics_bit_identical():
    rng = np.random.default_rng(0)
    x, y = rng.random((24, 1, 8, 8), dtype=np.float32), np.arange(24) % 3
    settings = TrainSettings(epochs=3, width=8, batch_size=8)
    plain = train_classifier(x, y, 3, settings, seed=1, device=torch.device("cpu"))
    seen = []
    watched = train_classifier(x, y, 3, settings, seed=1, device=torch.device("cpu"), on_epoch=seen.append)
    assert seen == [1, 2, 3]
    for (k, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_json_of_site_check_and_site_evaluate(site_config, capsys):
    cfg = load_site_config(site_config)
    assert main(["site", "check", str(site_config), "--json"]) == exit_codes.OK
    check = json.loads(capsys.readouterr().out)
    assert check["site_id"] == cfg.site_id and check["n_used"] == check["n_rows"] == 4
    assert check["quarantine_path"] == str(cfg.output_dir / "quarantine.json")
    model = save_model(cfg.output_dir / "global_model.safetensors",
                       convnet_for((1, *cfg.data.spatial_size), len(cfg.data.classes), width=8, seed=0))
    assert main(["site", "evaluate", str(site_config), "--model", str(model), "--json"]) == exit_codes.OK
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads((cfg.output_dir / "evaluation.json").read_text())
    assert "recall per class" in captured.err


@pytest.mark.slow
def test_ctrl_c_on_a_real_site_distill_exits_130_and_resumes_without_a_second_charge(digits_consortium, capsys):
    site = load_coordinator_config(digits_consortium(sites=2, distill={"iterations": 600,
                                                                       "checkpoint_every": 5})).site_paths[0]
    out_dir = load_site_config(site).output_dir
    exe = Path(sys.executable).with_name("medfdd")
    proc = subprocess.Popen([str(exe), "site", "distill", str(site)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            # a shell never hands Ctrl-C down ignored; an earlier test in this worker may have
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # the run is mid-way once a checkpoint is written
        if line.startswith("checkpoint: step"):
            break
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)  # a loaded 2-core machine (the other xdist worker) slows the exit
    assert proc.returncode == exit_codes.INTERRUPTED
    assert "Traceback" not in err and "resumes from its last checkpoint" in err
    assert not (out_dir / "synthetic.npz").exists()
    assert main(["-q", "site", "distill", str(site)]) == exit_codes.OK
    ledger = json.loads((out_dir / "privacy_ledger.json").read_text())
    assert [e["purpose"] for e in ledger["entries"]].count("distill") == 1  # one charge for both runs
    assert (out_dir / "synthetic.npz").exists()
    first, second = _logs(out_dir, "site-distill")
    assert "interrupted" in first and "resuming round 1 from step" in second
    capsys.readouterr()
    assert main(["site", "budget", str(site), "--json"]) == exit_codes.OK
    budget = json.loads(capsys.readouterr().out)
    assert [r["purpose"] for r in budget["rounds"]].count("distill") == 1
    assert 0 < budget["spent"] == budget["rounds"][-1]["epsilon_after"] <= budget["budget"]
