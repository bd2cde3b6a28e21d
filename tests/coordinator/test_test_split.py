"""The coordinator's test split is scaled like the sites' scans: a model trained on windowed images is evaluated on
windowed images, whatever `medfdd prepare` or the operator wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from medfdd.config import MinMax, Percentile, load_coordinator_config
from medfdd.coordinator.run import CoordinatorError, load_test_set
from medfdd.federation.consortium import consortium_of, shared_intensity
from medfdd.prepare.consortium import prepare_consortium


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split")
    res = prepare_consortium(source="digits", out=out, sites=2, alpha=1.0, fmt="dicom", seed=0, epsilon=1.0,
                             delta=1e-5, ipc=2, iterations=4, rounds=1, method="dm", dp=True, max_per_class=8,
                             console=Console(quiet=True))
    return res.coordinator_config


def _edit(path: Path, change) -> None:
    cfg = yaml.safe_load(path.read_text())
    change(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _set_site_intensity(coord: Path, intensities: list[dict]) -> None:
    for p, intensity in zip(load_coordinator_config(coord).site_paths, intensities, strict=True):
        _edit(p, lambda c, i=intensity: c["data"].update(intensity=i))


def test_the_test_split_uses_the_sites_intensity_scaling(prepared, tmp_path):
    window = {"mode": "percentile", "lower": 20.0, "upper": 80.0}
    _set_site_intensity(prepared, [window, window])
    cfg = load_coordinator_config(prepared)
    spec, sites = consortium_of(cfg)
    assert shared_intensity(cfg, sites) == Percentile(**window)
    scaled = load_test_set(cfg, spec, tmp_path / "a", shared_intensity(cfg, sites))
    _edit(prepared, lambda c: c["test"].update(intensity={"mode": "minmax"}))  # the operator's explicit choice wins
    cfg = load_coordinator_config(prepared)
    assert shared_intensity(cfg, sites) is None and cfg.test.intensity == MinMax()
    plain = load_test_set(cfg, spec, tmp_path / "b", Percentile(**window))  # the test split's own setting wins
    assert np.array_equal(scaled[1], plain[1])
    clipped = (scaled[0] == 0).mean() + (scaled[0] == 1).mean()
    assert clipped > (plain[0] == 0).mean() + (plain[0] == 1).mean()  # 20-80 % clipping saturates more pixels
    _edit(prepared, lambda c: c["test"].pop("intensity"))


def test_sites_that_scale_differently_need_an_explicit_test_intensity(prepared):
    _set_site_intensity(prepared, [{"mode": "minmax"}, {"mode": "ct_window", "center": 40.0, "width": 400.0}])
    with pytest.raises(CoordinatorError, match="test.intensity"):
        shared_intensity(cfg := load_coordinator_config(prepared), consortium_of(cfg)[1])
    _set_site_intensity(prepared, [{"mode": "minmax"}, {"mode": "minmax"}])
