"""The NVFlare server's workflow: the in-process loop of `medfdd.federation.inprocess`, over NVFlare tasks, as the
Flower ServerApp runs it.

Per round: `CoordinatorRun.broadcast()` goes to every client as task `distill`; each result is decoded to a
`SiteOffer` and handed to `run.receive(offer, sender=client name)`: an offer for another site than the client's own
name (an NVFlare client's name is its provisioned identity) is rejected as spoofed first, an unreadable one as
malformed, a failure code as `site_failed`, silence within `site_timeout_s` as `no_answer`; then
`run.finish_round()`. After the last round the final global model goes to the clients that answered it (task
`final_model`). Hybrid mode (fine-tuning rounds) runs in-process or over Flower only.
"""

from __future__ import annotations

import math
from pathlib import Path

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from rich.console import Console

from medfdd.coordinator.validate import Reason
from medfdd.errors import MedfddError
from medfdd.federation.failures import code_in
from medfdd.federation.nvflare import codec
from medfdd.federation.nvflare.executor import DISTILL_TASK, FINAL_TASK

ENGINE = "nvflare"


class NVFlareJobError(MedfddError):
    """The NVFlare job cannot be built or run as configured, or did not complete."""


def check_supported(cfg, config_path: Path) -> None:
    """The NVFlare job runs distillation rounds; hybrid mode's fine-tuning rounds run in-process or over Flower."""
    if cfg.finetune.rounds:
        raise NVFlareJobError(f"{config_path}: finetune.rounds", "hybrid mode is not part of the NVFlare job",
                              "run hybrid mode in-process or over Flower, or set finetune.rounds: 0")


def _outcome(result) -> tuple[bool, str]:
    """(ok, what to record otherwise) of a client's result, from its return code and medfdd's failure header only:
    no text of the client's reaches the run."""
    try:
        rc = result.get_return_code(ReturnCode.OK)
        failure = result.get_header(codec.FAILURE_HEADER)
    except Exception:  # noqa: BLE001 - headers that are not NVFlare's shape: the body's checks name the problem
        return True, ""
    if rc == ReturnCode.OK:
        return True, ""
    if failure is not None:
        return False, f"site error: {code_in(failure)}"
    known = {v for k, v in vars(ReturnCode).items() if not k.startswith("_")}
    return False, f"no offer (NVFlare: {rc if isinstance(rc, str) and rc in known else 'unrecognised'})"


def take_offer(run, client: str, result: Shareable | None) -> bool:
    """Hand one client's result for the open round to `run` (the checks and reasons of the Flower ServerApp);
    True when it answered at all (an offer or an error code)."""
    if result is None:
        return False
    ok, why = _outcome(result) if isinstance(result, Shareable) else (True, "")
    if not ok:  # a failure code from medfdd's executor, else NVFlare's own error (a crash, a lost connection)
        run.no_answer(client, why, code=Reason.SITE_FAILED if why.startswith("site error") else Reason.NO_ANSWER)
        return True
    try:
        offer = codec.shareable_to_offer(result)
    except MedfddError as e:
        run.no_answer(client, f"unreadable offer: {e}", code=Reason.MALFORMED, nbytes=codec.shareable_nbytes(result))
        return True
    except Exception as e:  # noqa: BLE001 - one site's bytes must never end the consortium's run
        run.no_answer(client, f"unreadable offer ({type(e).__name__})", code=Reason.MALFORMED,
                      nbytes=codec.shareable_nbytes(result))
        return True
    if offer.site_id != client:  # the client provisioned for one hospital answers for another
        run.no_answer(client, f"client {client!r} offered for {offer.site_id!r}", code=Reason.SPOOFED_SITE,
                      nbytes=offer.nbytes())
        return True
    run.receive(offer, sender=client)
    return True


def _timeout(run) -> int:
    return int(math.ceil(run.site_timeout_s))


class CoordinatorController(Controller):
    """Runs the rounds of the coordinator config `coordinator_config` (an absolute path on the server)."""

    def __init__(self, coordinator_config: str):
        super().__init__()
        self.coordinator_config = coordinator_config

    def start_controller(self, fl_ctx: FLContext) -> None:
        pass

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client: Client, task_name: str, client_task_id: str, result: Shareable,
                                       fl_ctx: FLContext) -> None:
        pass  # a late result belongs to a round that is closed: it is dropped

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        serve(self, Path(self.coordinator_config), fl_ctx, abort_signal)


def _exchange(ctl: Controller, name: str, data: Shareable, run, targets: list[str], fl_ctx: FLContext,
              abort_signal: Signal) -> list[ClientTask]:
    """Send task `name` to `targets` and wait for all of them, at most `site_timeout_s`."""
    task = Task(name=name, data=data, timeout=_timeout(run))
    ctl.broadcast_and_wait(task, fl_ctx, targets=targets, min_responses=len(targets), abort_signal=abort_signal)
    return list(task.client_tasks)


def serve(ctl: Controller, config_path: Path, fl_ctx: FLContext, abort_signal: Signal,
          console: Console | None = None) -> Path | None:
    from medfdd.config import load_coordinator_config
    from medfdd.coordinator.run import CoordinatorRun
    from medfdd.federation.consortium import consortium_of, shared_intensity

    console = console or Console(stderr=True)
    cfg = load_coordinator_config(config_path)
    check_supported(cfg, config_path)
    spec, sites = consortium_of(cfg)
    run = CoordinatorRun.open(cfg, spec, engine=ENGINE, sites=sites, site_intensity=shared_intensity(cfg, sites),
                              console=console)
    clients = sorted(c.name for c in fl_ctx.get_engine().get_clients())
    answered: list[str] = []
    while run.next_round is not None:
        if abort_signal.triggered:
            return None
        b = run.broadcast()
        for c in clients:
            run.sent(c, b.nbytes())
        done = _exchange(ctl, DISTILL_TASK, codec.broadcast_to_shareable(b), run, clients, fl_ctx, abort_signal)
        results = {ct.client.name: ct.result for ct in done}
        answered = [c for c in clients if take_offer(run, c, results.get(c))]
        for c in clients:
            if c not in answered:
                run.no_answer(c, f"no answer within {run.site_timeout_s:g} s")
        console.print(f"round {b.round}: {len(answered)} of {len(clients)} site(s) answered")
        run.finish_round()
    final = run.final_model()
    targets = [c for c in answered if c in run.expected_sites]
    if final is not None and targets and not abort_signal.triggered:
        done = _exchange(ctl, FINAL_TASK, codec.broadcast_to_shareable(final), run, targets, fl_ctx, abort_signal)
        for ct in done:
            if isinstance(ct.result, Shareable) and _outcome(ct.result)[0]:
                run.delivered(ct.client.name, final.nbytes())
            else:
                console.print(f"{ct.client.name} did not take the final model")
    return run.close()
