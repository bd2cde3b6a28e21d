"""The distillation algorithms, free of any site bookkeeping: DP distribution matching (`distribution_matching`,
Zhao & Bilen 2023, with the Gaussian mechanism of `mechanism`) and DP gradient matching (`gradient_matching`, Zhao et
al. 2021), over the shared state and warm start of `base`. The site runner (`medfdd.site.distill`), the audit's shadow
pipelines and the benchmarks all build theirs through `create_distiller`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfdd.config import DistillConfig
    from medfdd.distill.base import Distiller, PrivacyPlan


def create_distiller(cfg: DistillConfig, plan: PrivacyPlan, **kwargs: Any) -> Distiller:
    """The distiller `cfg.method` names (`dm` or `gm`), built with `plan` and Distiller's keyword arguments
    (num_classes, image_shape, seed, round_, device, matching_net, start)."""
    if cfg.method == "gm":
        from medfdd.distill.gradient_matching import GradientMatching as cls
    else:
        from medfdd.distill.distribution_matching import DistributionMatching as cls
    return cls(cfg, plan, **kwargs)
