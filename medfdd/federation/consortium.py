"""What an engine reads from the site configs a coordinator config lists (`sites`): the consortium spec when the
config gives none, and the intensity scaling the sites share (the coordinator's test split must be scaled alike).
Engines load the site configs once, here, and hand the coordinator typed configs."""

from __future__ import annotations

from medfdd.config import ConsortiumConfig, CoordinatorConfig, Intensity, SiteBudget, SiteConfig, load_site_config
from medfdd.coordinator.run import CoordinatorError


def consortium_of(cfg: CoordinatorConfig) -> tuple[ConsortiumConfig, dict[str, SiteConfig]]:
    """The agreed spec (given, or derived from the listed site configs) and site_id -> loaded site config."""
    sites: dict[str, SiteConfig] = {}
    for p in cfg.site_paths:
        sc = load_site_config(p)
        if sc.site_id in sites:
            raise CoordinatorError(f"{cfg.base_dir}: sites", f"site id {sc.site_id!r} appears twice",
                                   "give every hospital its own site_id")
        sites[sc.site_id] = sc
    if cfg.consortium is not None:
        return cfg.consortium, sites
    first = next(iter(sites.values())).data
    spec = ConsortiumConfig(
        classes=first.classes, spatial_size=first.spatial_size, channels=first.channels,
        ipc=max(s.distill.ipc for s in sites.values()),
        sites={s.site_id: SiteBudget(dp=s.privacy.dp, epsilon=s.privacy.epsilon, delta=s.privacy.delta,
                                     unit=s.privacy.unit) for s in sites.values()})
    return spec, sites


def shared_intensity(cfg: CoordinatorConfig, sites: dict[str, SiteConfig]) -> Intensity | None:
    """The intensity scaling every listed site uses, for a test split without its own `test.intensity` (None when
    there is no test split, it sets its own, or no site is listed). Sites that disagree make it ambiguous."""
    if cfg.test is None or cfg.test.intensity is not None:
        return None
    used = {s.data.intensity.model_dump_json(): s.data.intensity for s in sites.values()}
    if len(used) > 1:
        raise CoordinatorError(f"{cfg.base_dir}: test.intensity", "the sites scale intensities differently "
                               f"({', '.join(sorted(used))}), so the test split's scaling is ambiguous",
                               "set `test.intensity` in the coordinator config (and agree one setting across sites)")
    return next(iter(used.values()), None)
