"""ClientApp run by a hospital's SuperNode: broadcast in, the site's allow-listed offer out, nothing else; in hybrid
mode, a fine-tuning task in and the site's DP-fine-tuned model out; after the last round the final global model in
(kept and scored at the site) and an empty reply out.

The site config path comes from the SuperNode's node config (`--node-config 'site-config="/abs/site.yaml"'`,
set by `medfdd site join`). A failure is logged in full at the site (the SuperNode's log); only a code of
`medfdd.federation.failures.FailureCode`, chosen by the phase that failed and never by the error, is sent to the
coordinator: an error's class or message may name local files or reveal facts about the records.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from rich.console import Console

from medfdd.federation.failures import FailureCode, SiteTaskFailed, failing_as, site_task
from medfdd.federation.flower import codec

NODE_CONFIG_KEY = "site-config"
REPLY_AFTER_KEY = "reply-after-s"  # optional: hold every reply until this many seconds after the task arrived
MESSAGE_TYPE = "train.distill"
FINAL_MESSAGE_TYPE = "evaluate.final_model"  # after the last round: the final global model, kept and scored locally
FINETUNE_MESSAGE_TYPE = "train.finetune"  # hybrid mode: a DP fine-tuning round of the global model
log = logging.getLogger("medfdd.site")

app = ClientApp()


def site_config_path(node_config: dict) -> Path:
    value = node_config.get(NODE_CONFIG_KEY)
    if not isinstance(value, str) or not value:
        log.error("the SuperNode has no node config %r; start it with `medfdd site join CONFIG ...`", NODE_CONFIG_KEY)
        raise SiteTaskFailed(FailureCode.NOT_CONFIGURED)
    return Path(value)


def reply_after(node_config: dict) -> float:
    """Seconds after a task's arrival before its reply may leave (node config `reply-after-s`, set by
    `medfdd site join --reply-after`; 0 when unset)."""
    value = node_config.get(REPLY_AFTER_KEY, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        log.error("node config %r = %r is not a number of seconds >= 0", REPLY_AFTER_KEY, value)
        raise SiteTaskFailed(FailureCode.NOT_CONFIGURED)
    return float(value)


def handle(content, node_config: dict, *, console: Console | None = None):
    """Broadcast records -> offer records for this site (the whole ClientApp, minus Flower's Message)."""
    from medfdd.site.offer import make_offer

    return _site_turn(content, node_config, codec.records_to_broadcast, make_offer, codec.offer_to_records, console)


def handle_final(content, node_config: dict, *, console: Console | None = None):
    """Final-model records -> an empty reply: the site scores and keeps the model; nothing about it goes back."""
    from medfdd.site.offer import receive_final_model

    return _site_turn(content, node_config, codec.records_to_broadcast, receive_final_model,
                      lambda _: codec.empty_reply(), console)


def handle_finetune(content, node_config: dict, *, console: Console | None = None):
    """Hybrid mode: fine-tuning task records -> this site's locally DP-fine-tuned model (`finetune_site`)."""
    from medfdd.site.finetune import finetune_site

    return _site_turn(content, node_config, codec.records_to_finetune, finetune_site, codec.update_to_records, console)


def _site_turn(content, node_config: dict, decode, work, encode, console: Console | None):
    """`encode(work(site config, decode(content), console=...))` as a site task (`_at_site`); records that
    `decode` refuses fail as `bad-broadcast`."""

    def task():
        with failing_as(FailureCode.BAD_BROADCAST):
            received = decode(content)
        path = site_config_path(node_config)
        return encode(site_task(path, lambda cfg: work(cfg, received, console=console or Console(stderr=True))))

    return _at_site(task, node_config)


def _at_site(task, node_config: dict):
    """Run a site task; a failure leaves the site as its code only (the details stay in the site's log). With
    `reply-after-s` the reply, offer or code, is held until that long after the task arrived, so its time tells the
    coordinator only whether the site's turn took longer (the timing channel, `privacy.report.channels`)."""
    started = time.monotonic()
    hold = reply_after(node_config)
    try:
        return task()
    except Exception as e:  # the full error stays in the site's log; only the code leaves
        failed = e if isinstance(e, SiteTaskFailed) else SiteTaskFailed(FailureCode.SITE_FAILED)
        cause = e.__cause__ if isinstance(e, SiteTaskFailed) else e
        if cause is not None:
            log.error("medfdd site task failed (%s)", failed.code, exc_info=cause)
            Console(stderr=True).print(f"[bold red]site task failed[/] ({failed.code}): {cause}", markup=True,
                                       highlight=False)
        raise failed from None
    finally:
        time.sleep(max(0.0, started + hold - time.monotonic()))


@app.train("distill")
def distill(msg: Message, context: Context) -> Message:
    return Message(handle(msg.content, dict(context.node_config)), reply_to=msg)


@app.evaluate("final_model")
def final_model(msg: Message, context: Context) -> Message:
    return Message(handle_final(msg.content, dict(context.node_config)), reply_to=msg)


@app.train("finetune")
def finetune(msg: Message, context: Context) -> Message:
    return Message(handle_finetune(msg.content, dict(context.node_config)), reply_to=msg)
