"""What an engine reads from the site configs a coordinator config lists (`sites`): the consortium spec when the
config gives none, and the intensity scaling the sites share (the coordinator's test split must be scaled alike).
Engines load the site configs once, here, and hand the coordinator typed configs. The agreement a coordinator
publishes for new sites (`medfdd coordinator agreement`) is derived from the same spec."""

from __future__ import annotations

from typing import Any

from medfdd.config import (
    AGREEMENT_VERSION,
    Agreement,
    ConsortiumConfig,
    CoordinatorConfig,
    DataConfig,
    Intensity,
    SiteBudget,
    SiteConfig,
    dump_config,
    load_site_config,
)
from medfdd.coordinator.run import CoordinatorError, scan_intensity


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


def _shared(cfg: CoordinatorConfig, sites: dict[str, SiteConfig], key: str) -> Any:
    """The value of `data.<key>` every listed site uses (the DataConfig default when none is listed)."""
    used = {repr(getattr(s.data, key)): getattr(s.data, key) for s in sites.values()}
    if len(used) > 1:
        raise CoordinatorError(f"{cfg.base_dir}: sites", f"the listed sites set data.{key} differently "
                               f"({', '.join(sorted(used))}), so the agreement's value is ambiguous",
                               f"agree one data.{key} across the site configs")
    return next(iter(used.values()), DataConfig.model_fields[key].get_default(call_default_factory=True))


def agreement_of(cfg: CoordinatorConfig) -> Agreement:
    """What every site must agree to, from the coordinator config alone: the consortium spec (given, or derived from
    the listed sites), the rounds, and the intensity scaling the coordinator's test split uses (`test.intensity`, else
    the one the listed sites share, else minmax); orientation and spacing as the listed sites set them."""
    spec, sites = consortium_of(cfg)
    shared = shared_intensity(cfg, sites) if cfg.test is not None else _shared(cfg, sites, "intensity")
    return Agreement(medfdd_agreement=AGREEMENT_VERSION, classes=spec.classes, spatial_size=spec.spatial_size,
                     channels=spec.channels, intensity=scan_intensity(cfg, shared),
                     orientation=_shared(cfg, sites, "orientation"), spacing=_shared(cfg, sites, "spacing"),
                     ipc=spec.ipc, rounds=cfg.rounds, finetune_rounds=cfg.finetune.rounds, sites=spec.sites)


def agreement_text(agreement: Agreement, source: str) -> str:
    """The agreement file: a header naming where it came from, then the keys (version first)."""
    return (f"# Consortium agreement, published by `medfdd coordinator agreement` from {source}.\n"
            "# Each site builds its config from it: medfdd site init --agreement THIS_FILE --site-id ID --data EXPORT "
            "--out site_configs/ID.yaml\n"
            + dump_config(agreement))
