"""The embedded engine: every site of the coordinator config runs on this machine, in this process, through the
same site (`make_offer`, `receive_final_model`) and coordinator (`CoordinatorRun`) functions the Flower apps call."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from medfdd.coordinator.run import CoordinatorError, CoordinatorRun
from medfdd.coordinator.validate import Reason
from medfdd.errors import MedfddError
from medfdd.federation.site import make_offer, receive_final_model


def run_inprocess(config_path: Path, *, console: Console | None = None, no_dp: bool = False) -> Path:
    """Run all planned rounds; a site that fails is left out of its round (recorded as `site_failed` with the
    error's class; the details stay on the console, which is the site's), and the others go on."""
    console = console or Console()
    run = CoordinatorRun.open(Path(config_path), engine="inprocess", console=console, no_dp=no_dp)
    if not run.site_configs:
        raise CoordinatorError(str(config_path), "lists no site configs (`sites`)",
                               "an in-process run needs the site config paths; Flower runs use the consortium spec")
    while run.next_round is not None:
        b = run.broadcast()
        console.rule(f"round {b.round} of {run.rounds}")
        for site_id, site_cfg in sorted(run.site_configs.items()):
            run.sent(site_id, b.nbytes())
            try:
                offer = make_offer(site_cfg, b, console=console, no_dp=no_dp)
            except Exception as e:  # one failing site must not stop the consortium's round
                # the details (which may name site paths) stay on the site's console; run.json gets the class only
                if isinstance(e, MedfddError):
                    console.print(f"[red]{site_id} failed[/]: {e}")
                else:
                    console.print_exception(max_frames=5)
                run.no_answer(site_id, f"the site failed with {type(e).__name__} (details in the site's log)",
                              code=Reason.SITE_FAILED)
                continue
            run.receive(offer, sender=site_id)
        run.finish_round()
    deliver_final_model(run, console)
    return run.close()


def deliver_final_model(run: CoordinatorRun, console: Console) -> None:
    """After the last round every site receives the final global model (`receive_final_model`): it scores the model
    on its own scans and keeps it. A site that fails here is reported and the others still receive it."""
    final = run.final_model()
    if final is None:
        return
    console.rule("the final global model goes back to the sites")
    for site_id, site_cfg in sorted(run.site_configs.items()):
        try:
            receive_final_model(site_cfg, final, console=console)
        except Exception as e:  # noqa: BLE001 - one site's failure must not keep the model from the others
            console.print(f"[red]{site_id} did not take the final model[/]: {type(e).__name__}: {e}")
            continue
        run.delivered(site_id, final.nbytes())
