"""The NVFlare client of one hospital: the Flower ClientApp's job, as an NVFlare `Executor`.

Task `distill`: broadcast in, the site's allow-listed offer out (`make_offer`: distilled under the site's own ledger);
task `final_model`: the final global model in (kept and scored at the site, `receive_final_model`), an empty reply
out. The site config path is the executor's argument (one per client in the job). A failure is logged in full at the
site; only a `FailureCode` chosen by the phase that failed leaves (`codec.failure_reply`), as over Flower.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from rich.console import Console

from medfdd.federation.failures import FailureCode, SiteTaskFailed, failing_as, site_task
from medfdd.federation.nvflare import codec

DISTILL_TASK = "distill"
FINAL_TASK = "final_model"
log = logging.getLogger("medfdd.site")


def handle(task_name: str, content: Shareable, site_config: Path, *, console: Console | None = None) -> Shareable:
    """One task for the site of `site_config` (the whole executor, minus NVFlare's context)."""
    from medfdd.site.offer import make_offer, receive_final_model

    work, encode = {DISTILL_TASK: (make_offer, codec.offer_to_shareable),
                    FINAL_TASK: (receive_final_model, lambda _: Shareable())}[task_name]
    console = console or Console(stderr=True)
    try:
        with failing_as(FailureCode.BAD_BROADCAST):
            received = codec.shareable_to_broadcast(content)
        return encode(site_task(site_config, lambda cfg: work(cfg, received, console=console)))
    except Exception as e:  # the full error stays in the site's log; only the code leaves
        failed = e if isinstance(e, SiteTaskFailed) else SiteTaskFailed(FailureCode.SITE_FAILED)
        log.error("medfdd site task failed (%s)", failed.code, exc_info=e.__cause__ or e)
        return codec.failure_reply(failed.code)


class SiteExecutor(Executor):
    """Runs this hospital's turn of each round with its site config (`site_config`: an absolute path)."""

    def __init__(self, site_config: str):
        super().__init__()
        self.site_config = site_config

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (DISTILL_TASK, FINAL_TASK):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        return handle(task_name, shareable, Path(self.site_config))
