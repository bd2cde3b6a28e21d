"""A tiny digits consortium for the reliability tests: few images per class and the cheapest model settings."""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console

TINY_DISTILL = {"width": 8, "ipc": 2, "iterations": 4, "batch_size": 32, "inner_steps": 2, "lr": 1.0, "allocation": "uniform",
                "checkpoint_every": 2}
TINY_TRAIN = {"epochs": 2, "width": 8, "batch_size": 64, "augment": False}


def tiny_consortium(out: Path, *, sites: int = 2, rounds: int = 1, per_class: int = 12, distill: dict | None = None,
                    **coordinator) -> Path:
    """`medfdd prepare` digits with `per_class` images per class in all; returns the coordinator.yaml path."""
    from medfdd.prepare.consortium import prepare_consortium

    res = prepare_consortium(source="digits", out=out, sites=sites, alpha=1.0, fmt="dicom", seed=0, epsilon=1.0,
                             delta=1e-5, ipc=2, iterations=4 * rounds, rounds=rounds, method="dm", dp=True, max_per_class=per_class,
                             console=Console(quiet=True))
    for path in res.site_configs:
        cfg = yaml.safe_load(path.read_text())
        cfg["distill"].update({**TINY_DISTILL, **(distill or {})})
        cfg["privacy"]["rounds"] = rounds
        cfg["device"] = "cpu"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    coord = yaml.safe_load(res.coordinator_config.read_text())
    coord["train"].update(TINY_TRAIN)
    coord.update(rounds=rounds, **coordinator)
    res.coordinator_config.write_text(yaml.safe_dump(coord, sort_keys=False))
    return res.coordinator_config
