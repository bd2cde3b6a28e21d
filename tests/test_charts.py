"""The charts people look at (`medfdd.charts`), drawn from known numbers: a run's accuracy and epsilon per round,
distillation and fine-tuning rounds told apart, and a non-private site named instead of drawn."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from medfdd.charts import budget_png, loss_png, progress_png, run_progress

RUN = {"rounds": [{"round": 1, "metrics": {"accuracy": 0.4}, "epsilon": {"a": 0.3, "b": "inf"}},
                  {"round": 2, "metrics": {"accuracy": 0.6}, "epsilon": {"a": 0.6, "b": "inf"}}],
       "finetune": {"rounds": [{"round": 1, "metrics": {"accuracy": 0.7}, "epsilon": {"a": 0.9}}]}}


def _pixels(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_run_progress_reads_distillation_then_fine_tuning_rounds_from_run_json():
    points = run_progress(RUN)
    assert [(p["label"], p["kind"], p["accuracy"]) for p in points] == [
        ("1", "distill", 0.4), ("2", "distill", 0.6), ("ft 1", "finetune", 0.7)]
    assert points[0]["epsilon"] == {"a": 0.3, "b": math.inf}  # json_safe's "inf" read back
    assert run_progress({"rounds": [{"round": 1, "metrics": None, "epsilon": {}}]})[0]["accuracy"] is None
    assert run_progress({}) == []


def test_the_progress_chart_draws_both_kinds_of_round_in_their_colours():
    both = _pixels(progress_png(run_progress(RUN), {"a": 1.0, "b": math.inf}))
    distill_only = _pixels(progress_png(run_progress({"rounds": RUN["rounds"]}), {"a": 1.0, "b": math.inf}))

    def has(img, rgb):  # a marker's colour (KIND_STYLE), anywhere in the picture
        return bool((np.abs(img.astype(int) - rgb).sum(-1) < 30).any())

    orange, blue = (0xd9, 0x8c, 0x00), (0x2e, 0x6f, 0xb5)
    assert has(both, orange) and has(both, blue)
    assert has(distill_only, blue) and not has(distill_only, orange)
    assert both.shape[0] > 300 and both.std() > 10  # two panels, not blank


def test_loss_and_budget_charts_render_without_a_display():
    losses = [(u, 5.0 * math.exp(-u / 40) + 0.1) for u in range(1, 120)]
    assert _pixels(loss_png(losses, "t", "synthetic update")).std() > 10
    charges = [{"round": 1, "purpose": "record-count", "epsilon_after": 0.05},
               {"round": 1, "purpose": "distill", "epsilon_after": 0.5},
               {"round": 2, "purpose": "distill", "epsilon_after": math.inf}]  # a --no-dp charge
    assert _pixels(budget_png(charges, 1.0, "t")).std() > 10
