"""`site check` advises the large-site distillation settings only where they were measured to help."""

from __future__ import annotations

import pytest

from medfdd.config import SiteConfig, load_site_config
from medfdd.site.check import LARGE_SITE_PER_CLASS, check_site, settings_hints


def _cfg(privacy: dict | None = None, **distill) -> SiteConfig:
    return SiteConfig.model_validate({"site_id": "s", "output": "out", "distill": distill, "privacy": privacy or {},
                                      "data": {"root": "d", "manifest": "m.csv", "classes": ["a", "b", "c"],
                                               "spatial_size": [16, 16]}})


LARGE = {"a": 3 * LARGE_SITE_PER_CLASS, "b": 2 * LARGE_SITE_PER_CLASS, "c": 40}


def test_large_site_overriding_the_defaults_gets_all_three_hints():
    hints = settings_hints(_cfg(batch_size=256, inner_steps=5, allocation="uniform"), LARGE)
    assert len(hints) == 3
    assert "batch_size = 256" in hints[0] and "batch_size: 384" in hints[0]
    assert f"about {2 * LARGE_SITE_PER_CLASS} per class" in hints[0]
    assert "inner_steps = 5: try 10" in hints[1]
    assert "allocation = uniform: try evidence" in hints[2]
    assert "batch_size = 300" in settings_hints(_cfg(batch_per_class=100), LARGE)[0]


def test_the_defaults_are_the_large_site_settings():
    assert settings_hints(_cfg(), LARGE) == []
    assert settings_hints(_cfg(batch_size=384, inner_steps=10, allocation="evidence"), LARGE) == []


@pytest.mark.parametrize("counts", [{"a": LARGE_SITE_PER_CLASS - 1, "b": 10 * LARGE_SITE_PER_CLASS, "c": 5},
                                    {"a": 35, "b": 35, "c": 35}, {"a": 0, "b": 0, "c": 0}])
def test_small_or_empty_sites_keep_the_defaults(counts):
    assert settings_hints(_cfg(), counts) == []


@pytest.mark.parametrize("distill", [{"method": "gm"}, {"schedule": "interleaved"}])
def test_no_hint_outside_dm_decoupled(distill):
    assert settings_hints(_cfg(**distill), LARGE) == []


def test_no_hint_without_dp():
    assert settings_hints(_cfg(privacy={"dp": False}), LARGE) == []


def test_site_check_of_a_tiny_site_prints_no_hint(site_builder):
    s = site_builder()
    for i in range(4):
        s.add_dicom(f"{i}.dcm", "ab"[i % 2])
    assert check_site(load_site_config(s.write())).hints == []
