"""ServerApp run by the coordinator's SuperLink: the in-process loop of `medfdd.federation.inprocess`, over Flower.

Per round: `CoordinatorRun.broadcast()` goes to every connected SuperNode; each reply is decoded to a `SiteOffer`
and handed to `run.receive(offer, sender=str(node_id))` (an offer for another site than the one the node's key was
registered for is rejected as spoofed first); nodes that did not answer within `site_timeout_s` (or
answered with an error, or whose SuperNode stopped reporting mid-round) are reported with `run.no_answer`; then
`run.finish_round()`, which stops the run when fewer than `min_sites` offers were accepted (the quorum). Hybrid mode: then the
fine-tuning rounds, the same way (`run_finetune_round`: `run.finetune_task()` out, `run.receive_update` per model,
`run.finish_finetune_round()`). After the last round the
final global model goes to the nodes that answered it (`evaluate.final_model`). The coordinator config path
comes from the run config (`flwr run ... --run-config 'coordinator-config="/abs/coordinator.yaml"'`).
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from medfdd.coordinator.validate import Reason
from medfdd.errors import MedfddError
from medfdd.federation.failures import code_in
from medfdd.federation.flower import codec
from medfdd.federation.flower.client_app import FINAL_MESSAGE_TYPE, FINETUNE_MESSAGE_TYPE, MESSAGE_TYPE

RUN_CONFIG_KEY = "coordinator-config"

app = ServerApp()


class ServerAppError(MedfddError):
    """The ServerApp cannot start the run as configured."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float, console: Console) -> list[int]:
    """Wait until `expected` SuperNodes are connected or `timeout` passes; return the connected ones."""
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    console.print(f"{len(nodes)} of {expected} site(s) connected")
    return nodes


def registered_names(grid: Grid) -> dict[int, str]:
    """node id -> the site id its key was registered under (`medfdd coordinator register --site`); empty when the
    SuperLink runs without SuperNode authentication."""
    return {int(n.node_id): str(n.name) for n in grid.get_nodes() if getattr(n, "name", "")}


def _label(run, sender: str, names: dict[int, str]) -> str:
    """The site a SuperNode's key is registered for, else the site it is bound to in this run (from an earlier
    accepted offer), else `node-<id>`."""
    return names.get(int(sender)) or run.bindings.get(sender) or f"node-{sender}"


def replies_by_node(msgs: list[Message], replies: list[Message]) -> tuple[dict[int, Message], dict[int, Error]]:
    """Pair each reply with the node its task was sent to, by `reply_to_message_id` (ids are set when the grid
    pushes `msgs`): (node -> the node's own reply, node -> the error the SuperLink answered with in its place). The
    SuperLink itself replies for a task that expired or a node that went away (source: its own node id); that is
    silence from the site, not an answer, and a reply to no task of this batch is ignored."""
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    answers: dict[int, Message] = {}
    stand_ins: dict[int, Error] = {}
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id)
        if node is None:
            continue
        if reply.metadata.src_node_id == node:
            answers[node] = reply
        elif reply.has_error():
            stand_ins[node] = reply.error
    return answers, stand_ins


def silence(stand_in: Error | None, timeout_s: float) -> tuple[Reason, str]:
    """Why a node sent nothing, as (code, detail): `site_unavailable` when the SuperLink stood in because the node
    stopped sending heartbeats (its SuperNode died or lost the network mid-round), else `no_answer` (the timeout).
    Both depend on the site's machine, not on its records; the SuperLink's own text goes into the detail."""
    if stand_in is not None and stand_in.code == ErrorCode.NODE_UNAVAILABLE:
        return Reason.SITE_UNAVAILABLE, f"its SuperNode stopped reporting during the round ({stand_in.reason})"
    return Reason.NO_ANSWER, f"no answer within {timeout_s:g} s" + (f" ({stand_in.reason})" if stand_in else "")


def _exchange(grid: Grid, run, encode, message_type: str, nbytes: int, decode, what: str, spoofed: str, receive):
    """Send `encode()` to every connected SuperNode and hand each decoded reply to `receive(reply, sender=...)`; a
    site error, an unreadable `what` or one for another site than the node's key is registered for (`spoofed`: what
    it did instead) goes to `run.no_answer`. Returns (nodes, node -> registered site, node -> answer, node -> SuperLink
    stand-in, start time)."""
    nodes = sorted(grid.get_node_ids())
    names = registered_names(grid)
    # the task expires with the round: a site that picks it up later must not distill or fine-tune (and pay) for a
    # round the coordinator has already closed
    msgs = [Message(encode(), dst_node_id=n, message_type=message_type, ttl=run.site_timeout_s) for n in nodes]
    for n in nodes:  # per SuperNode reached: its registered site, the site it answered for before, or its node id
        run.sent(_label(run, str(n), names), nbytes)
    t0 = time.monotonic()
    answers, stand_ins = replies_by_node(msgs, list(grid.send_and_receive(msgs, timeout=run.site_timeout_s)))
    for node, reply in answers.items():
        sender = str(node)
        if reply.has_error():
            run.no_answer(_label(run, sender, names), f"site error: {code_in(reply.error.reason)}",
                          code=Reason.SITE_FAILED)
            continue
        try:
            got = decode(reply.content)
        except MedfddError as e:
            run.no_answer(_label(run, sender, names), f"unreadable {what}: {e}", code=Reason.MALFORMED,
                          nbytes=codec.content_nbytes(reply.content))
            continue
        except Exception as e:  # noqa: BLE001 - one site's bytes must never end the consortium's run
            run.no_answer(_label(run, sender, names), f"unreadable {what} ({type(e).__name__})", code=Reason.MALFORMED,
                          nbytes=codec.content_nbytes(reply.content))
            continue
        name = names.get(node)
        if name and name != got.site_id:  # the key registered for one hospital answers for another
            run.no_answer(_label(run, sender, names), f"SuperNode {node} is registered as {name!r} but {spoofed} "
                          f"for {got.site_id!r}", code=Reason.SPOOFED_SITE, nbytes=got.nbytes())
            continue
        receive(got, sender=sender)
    return nodes, names, answers, stand_ins, t0


def _silent(run, nodes: list[int], names: dict[int, str], answers: dict, stand_ins: dict[int, Error],
            console: Console) -> None:
    """Record each node that sent nothing under its site (registered key, or bound by an earlier offer); a node not
    yet known as a site is only logged (`finish_round` records the expected sites that stayed silent)."""
    for node in nodes:
        if node in answers:
            continue
        code, why = silence(stand_ins.get(node), run.site_timeout_s)
        site = names.get(node) or run.bindings.get(str(node))
        if site is not None:
            run.no_answer(site, why, code=code)
        else:
            console.print(f"SuperNode {node}: {why}")


def run_round(grid: Grid, run, console: Console) -> set[int]:
    """One round over the connected SuperNodes; returns the nodes that answered (offer or error)."""
    broadcast = run.broadcast()
    nodes, names, answers, stand_ins, t0 = _exchange(
        grid, run, lambda: codec.broadcast_to_records(broadcast), MESSAGE_TYPE, broadcast.nbytes(),
        codec.records_to_offer, "offer", "offered", run.receive)
    _silent(run, nodes, names, answers, stand_ins, console)
    console.print(f"round {broadcast.round}: {len(answers)} of {len(nodes)} site(s) answered in "
                  f"{time.monotonic() - t0:.1f} s")
    run.finish_round()
    return set(answers)


def run_finetune_round(grid: Grid, run, console: Console) -> set[int]:
    """Hybrid mode: one DP fine-tuning round over the connected SuperNodes (`run.finetune_task()` out, each site's
    model to `run.receive_update`); returns the nodes that answered (model or error)."""
    task = run.finetune_task()
    nodes, names, answers, stand_ins, t0 = _exchange(
        grid, run, lambda: codec.finetune_to_records(task), FINETUNE_MESSAGE_TYPE, task.nbytes(),
        codec.records_to_update, "model", "sent a model", run.receive_update)
    _silent(run, nodes, names, answers, stand_ins, console)
    console.print(f"fine-tuning round {task.round}: {len(answers)} of {len(nodes)} site(s) answered in "
                  f"{time.monotonic() - t0:.1f} s")
    run.finish_finetune_round()
    return set(answers)


def deliver_final_model(grid: Grid, run, nodes: set[int], console: Console) -> None:
    """After the last round, the final global model goes to the SuperNodes that answered that round (a silent one
    would only cost another timeout); each keeps and scores it at the site and replies with nothing."""
    final = run.final_model()
    names = registered_names(grid)
    targets = sorted(n for n in nodes if n in names or str(n) in run.bindings)  # only nodes known as a site
    if final is None or not targets:
        return
    msgs = [Message(codec.broadcast_to_records(final), dst_node_id=n, message_type=FINAL_MESSAGE_TYPE,
                    ttl=run.site_timeout_s) for n in targets]
    answers, stand_ins = replies_by_node(msgs, list(grid.send_and_receive(msgs, timeout=run.site_timeout_s)))
    for node in stand_ins:
        console.print(f"{_label(run, str(node), names)} did not take the final model: {stand_ins[node].reason}")
    for node, reply in answers.items():
        site = _label(run, str(node), names)
        if reply.has_error():
            console.print(f"{site} did not take the final model: {code_in(reply.error.reason)}")
        else:
            run.delivered(site, final.nbytes())
    console.print(f"final global model delivered to {len(run.final_bytes_down)} of {len(targets)} site(s)")


def serve(grid: Grid, config_path: Path, console: Console | None = None) -> Path:
    from medfdd.config import load_coordinator_config
    from medfdd.coordinator.run import CoordinatorRun
    from medfdd.federation.consortium import consortium_of, shared_intensity

    console = console or Console(stderr=True)
    cfg = load_coordinator_config(config_path)
    spec, sites = consortium_of(cfg)  # site configs listed here (a loopback test) give the spec and their ledgers
    run = CoordinatorRun.open(cfg, spec, engine="flower", sites=sites, site_intensity=shared_intensity(cfg, sites),
                              console=console)
    wait_for_nodes(grid, len(run.expected_sites), run.site_timeout_s, console)
    answered: set[int] = set()
    while run.next_round is not None:
        answered = run_round(grid, run, console)
    while run.next_finetune_round is not None:  # hybrid mode
        answered = run_finetune_round(grid, run, console)
    deliver_final_model(grid, run, answered, console)
    return run.close()


@app.main()
def main(grid: Grid, context: Context) -> None:
    value = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(value, str) or not value:
        raise ServerAppError(f"run config {RUN_CONFIG_KEY!r}", "not set",
                             "start the run with `medfdd coordinator flower-run CONFIG`")
    serve(grid, Path(value))
