"""The embedded engine: every site of the coordinator config runs on this machine, in this process, through the
same site (`make_offer`, `receive_final_model`) and coordinator (`CoordinatorRun`) functions the Flower apps call."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.traceback import Traceback

from medfdd.config import CoordinatorConfig, SiteConfig
from medfdd.coordinator.run import CoordinatorError, CoordinatorRun
from medfdd.coordinator.validate import Reason
from medfdd.errors import MedfddError
from medfdd.federation.consortium import consortium_of, shared_intensity
from medfdd.federation.failures import SiteTaskFailed, site_task
from medfdd.messages import Broadcast, FinetuneRound
from medfdd.site.finetune import finetune_site
from medfdd.site.offer import make_offer, receive_final_model


def open_inprocess(cfg: CoordinatorConfig, *, console: Console | None = None, no_dp: bool = False,
                   engine: str = "inprocess") -> CoordinatorRun:
    """Open (or resume) the run of `cfg` with every listed site config loaded, once, here."""
    spec, sites = consortium_of(cfg)
    if not sites:
        raise CoordinatorError(f"{cfg.base_dir}: sites", "lists no site configs (`sites`)",
                               "an in-process run needs the site config paths; Flower runs use the consortium spec")
    return CoordinatorRun.open(cfg, spec, engine=engine, sites=sites, site_intensity=shared_intensity(cfg, sites),
                               console=console, no_dp=no_dp)


def run_inprocess(cfg: CoordinatorConfig, *, console: Console | None = None, no_dp: bool = False) -> Path:
    """Run all planned rounds (distillation, then hybrid mode's fine-tuning rounds); a site that fails is left out of
    its round (recorded as `site_failed` with its `FailureCode` only; the details stay on the console, which is the
    site's), and the others go on."""
    console = console or Console()
    run = open_inprocess(cfg, console=console, no_dp=no_dp)
    while run.next_round is not None:
        b = run.broadcast()
        console.rule(f"round {b.round} of {run.rounds}")
        for site_id, site_cfg in sorted(run.sites.items()):
            site_round(run, site_id, site_cfg, b, console=console, no_dp=no_dp)
        run.finish_round()
    while run.next_finetune_round is not None:  # hybrid mode: DP fine-tuning from the trained global model
        task = run.finetune_task()
        console.rule(f"fine-tuning round {task.round} of {run.cfg.finetune.rounds}")
        for site_id, site_cfg in sorted(run.sites.items()):
            site_finetune_round(run, site_id, site_cfg, task, console=console, no_dp=no_dp)
        run.finish_finetune_round()
    deliver_final_model(run, console)
    return run.close()


def site_round(run: CoordinatorRun, site_id: str, site_cfg: SiteConfig, b: Broadcast, *, console: Console,
               no_dp: bool = False) -> None:
    """One site's turn in a round: its offer goes to `run.receive`; a failure, whatever raised it, reaches the
    coordinator as its `FailureCode` only (`failures.site_task`), as over Flower."""
    run.sent(site_id, b.nbytes())
    try:
        offer = site_task(site_cfg, lambda cfg: make_offer(cfg, b, console=console, no_dp=no_dp))
    except SiteTaskFailed as e:  # one failing site must not stop the consortium's round
        _log_at_site(console, f"{site_id} failed", e)
        run.no_answer(site_id, f"site error: {e.code}", code=Reason.SITE_FAILED)
        return
    run.receive(offer, sender=site_id)


def site_finetune_round(run: CoordinatorRun, site_id: str, site_cfg: SiteConfig, task: FinetuneRound, *,
                        console: Console, no_dp: bool = False) -> None:
    """One site's turn in a fine-tuning round: its model goes to `run.receive_update`; a failure reaches the
    coordinator as its `FailureCode` only, as in `site_round`."""
    run.sent(site_id, task.nbytes())
    try:
        update = site_task(site_cfg, lambda cfg: finetune_site(cfg, task, console=console, no_dp=no_dp))
    except SiteTaskFailed as e:
        _log_at_site(console, f"{site_id} failed", e)
        run.no_answer(site_id, f"site error: {e.code}", code=Reason.SITE_FAILED)
        return
    run.receive_update(update, sender=site_id)


def _log_at_site(console: Console, what: str, e: SiteTaskFailed) -> None:
    """The full error, on the site's console only."""
    cause = e.__cause__
    if isinstance(cause, MedfddError):
        console.print(f"[red]{what}[/] ({e.code}): {cause}")
    elif cause is not None:
        console.print(f"[red]{what}[/] ({e.code}):")
        console.print(Traceback.from_exception(type(cause), cause, cause.__traceback__, max_frames=5))


def deliver_final_model(run: CoordinatorRun, console: Console) -> None:
    """After the last round every site receives the final global model (`receive_final_model`): it scores the model
    on its own scans and keeps it. A site that fails here is reported (by its code) and the others still receive
    it."""
    final = run.final_model()
    if final is None:
        return
    console.rule("the final global model goes back to the sites")
    for site_id, site_cfg in sorted(run.sites.items()):
        try:
            site_task(site_cfg, lambda cfg: receive_final_model(cfg, final, console=console))
        except SiteTaskFailed as e:  # one site's failure must not keep the model from the others
            _log_at_site(console, f"{site_id} did not take the final model", e)
            continue
        run.delivered(site_id, final.nbytes())
