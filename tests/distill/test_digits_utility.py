"""Utility floor: three digits hospitals from `medfdd prepare`, DP-DM at epsilon 1 per site, merged synthetic sets.

Each site's noise is keyed by its secret `noise_key` (random bytes from the OS), so this test pins the keys to make
its outcome reproducible. Measured with this configuration (2-core CPU, seed 0, conv without bias), the mean over
the two evaluation trainings for six pinned key sets: 0.56-0.57 (the set used here, two runs), 0.50, 0.58, 0.47,
0.52, 0.57; two unpinned runs 0.61 and 0.48. Chance is 0.10; without feature centring it was 0.13. Each site holds
only ~35 training images per class, so epsilon 1 leaves little signal; the floor sits below every measured key set,
leaves room for floating-point differences between machines (two evaluation trainings of one set differ by up to
0.09), and still fails if the mechanism drowns the signal or the pipeline breaks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import pin_noise_keys
from rich.console import Console

from medfdd.artifacts import load_synthetic
from medfdd.config import load_site_config
from medfdd.data.site_data import load_site_data
from medfdd.prepare.consortium import prepare_consortium
from medfdd.site.distill import distill_site
from medfdd.training import TrainSettings, evaluate, train_classifier

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

FLOOR = 0.45
SETTINGS = {"iterations": 10, "inner_steps": 10, "batch_size": 256, "lr": 1.0, "width": 32, "ipc": 10,
            "allocation": "uniform"}


def test_dp_dm_eps1_three_digits_sites_beats_the_floor(tmp_path: Path):
    quiet = Console(quiet=True)
    res = prepare_consortium(source="digits", out=tmp_path / "c", sites=3, alpha=0.5, fmt="dicom", seed=0,
                             epsilon=1.0, delta=1e-5, ipc=10, iterations=10, rounds=1, method="dm", dp=True, console=quiet)
    images, labels, spent = [], [], []
    pin_noise_keys(res.site_configs)  # see the docstring
    for path in res.site_configs:
        cfg = yaml.safe_load(path.read_text())
        cfg["distill"].update(SETTINGS)
        path.write_text(yaml.safe_dump(cfg))
        out = distill_site(load_site_config(path), console=quiet)
        syn = load_synthetic(load_site_config(path).output_dir)
        images.append(syn.images)
        labels.append(syn.labels)
        spent.append(out.meta["epsilon"])
    assert all(0 < e <= 1.0 for e in spent)

    test_cfg = yaml.safe_load(res.site_configs[0].read_text())
    test_cfg["data"].update(root=str(res.test_dir), holdout_fraction=0.0)
    test_cfg["output"] = str(tmp_path / "test-out")
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test_cfg))
    test = load_site_data(load_site_config(tmp_path / "test.yaml"))

    x, y = np.concatenate(images), np.concatenate(labels)
    accs = [evaluate(train_classifier(x, y, 10, TrainSettings(epochs=200, width=64), seed=s), test.images,
                     test.labels, 10)["accuracy"] for s in range(2)]
    assert np.mean(accs) >= FLOOR, accs
