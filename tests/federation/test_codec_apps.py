"""The ClientApp and ServerApp handlers without a running Flower app (Message is replaced by a stand-in)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common.constant import ErrorCode
from rich.console import Console

from medfdd.coordinator.validate import Reason
from medfdd.federation.flower import client_app, codec, server_app
from medfdd.messages import Broadcast, SiteOffer, to_wire

QUIET = Console(quiet=True)


def _offer(site_id="hospital-a", round_=1) -> SiteOffer:
    return SiteOffer(site_id=site_id, round=round_, meta={"site_id": site_id, "round": round_},
                     arrays={"images": to_wire(np.zeros((2, 1, 16, 16), np.float32)),
                             "labels": to_wire(np.array([0, 1], np.int64))})


@pytest.fixture
def site_yaml(site_builder):
    """A site config that loads (the handlers load it before the site task runs)."""
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    return s.write()


def test_client_handler_decodes_the_broadcast_and_returns_the_offer(monkeypatch, site_yaml):
    seen = {}

    def fake_make_offer(path, broadcast, *, console=None, no_dp=False):
        seen.update(path=path.source, broadcast=broadcast)
        return _offer(round_=broadcast.round)

    monkeypatch.setattr("medfdd.site.offer.make_offer", fake_make_offer)
    out = client_app.handle(codec.broadcast_to_records(Broadcast(2, b"weights")),
                            {"site-config": str(site_yaml)}, console=QUIET)
    assert seen == {"path": site_yaml.resolve(), "broadcast": Broadcast(2, b"weights")}
    assert codec.records_to_offer(out).round == 2


def test_client_errors_leave_the_site_as_a_code_only(monkeypatch, capsys, site_yaml):
    def failing(path, broadcast, **kw):
        raise ValueError("cannot read /data/hospital-a/PA-0042/scan.dcm (PatientName=DOE^JANE)")

    monkeypatch.setattr("medfdd.site.offer.make_offer", failing)
    with pytest.raises(client_app.SiteTaskFailed) as e:
        client_app.handle(codec.broadcast_to_records(Broadcast(1)), {"site-config": str(site_yaml)}, console=QUIET)
    assert str(e.value) == "site-failed"
    assert "PA-0042" in capsys.readouterr().err  # the full message stays in the site's own log
    # failures before any record is read keep a code of their own: it depends on the message or the config only
    for content, node_config, code in ((codec.broadcast_to_records(Broadcast(1)), {}, "site-not-configured"),
                                       (codec.broadcast_to_records(Broadcast(1)), {"site-config": "/x.yaml"},
                                        "site-not-configured"),
                                       (codec.empty_reply(), {"site-config": str(site_yaml)}, "bad-broadcast")):
        with pytest.raises(client_app.SiteTaskFailed) as e:
            client_app.handle(content, node_config, console=QUIET)
        assert str(e.value) == code


class FakeRun:
    def __init__(self, bindings):
        self.bindings, self.site_timeout_s, self.calls, self.bytes_down, self.bytes_up = bindings, 5.0, [], {}, {}

    def sent(self, recipient, nbytes):
        self.bytes_down[recipient] = nbytes

    def broadcast(self):
        return Broadcast(2, b"m")

    def receive(self, offer, *, sender):
        self.calls.append(("receive", offer.site_id, sender))
        return True

    def no_answer(self, site, reason, *, code=Reason.NO_ANSWER, nbytes=0):
        self.calls.append(("no_answer", site, code))
        self.bytes_up[site] = nbytes

    def finish_round(self):
        self.calls.append(("finish",))
        return {}


SUPERLINK = 1  # the node id the SuperLink signs its own replies with (an expired task, a node gone away)


def _task(content, dst_node_id, message_type, ttl):
    """A stand-in for flwr's Message: the grid gives it an id when pushed; a task expires with the round."""
    return SimpleNamespace(content=content, message_type=message_type, ttl=ttl,
                           metadata=SimpleNamespace(dst_node_id=dst_node_id, message_id=f"task-{dst_node_id}"))


def _reply(node, content=None, error=None, *, to=None, src=None, code=ErrorCode.UNKNOWN):
    """`node`'s reply to the task sent to `to` (default: its own), signed by `src` (default: `node`)."""
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=src or node, reply_to_message_id=f"task-{to or node}"),
                           has_error=lambda: error is not None, error=SimpleNamespace(reason=error, code=code),
                           content=content)


def test_server_round_maps_replies_errors_and_silence_to_the_core(monkeypatch):
    monkeypatch.setattr(server_app, "Message", _task)
    sent = {}

    class Grid:
        def get_node_ids(self):
            return [5, 4, 3, 2, 11, 6, 7]

        def get_nodes(self):  # names the keys were registered under (`medfdd coordinator register --site`)
            return [SimpleNamespace(node_id=11, name="hospital-a"), SimpleNamespace(node_id=6, name="hospital-f"),
                    SimpleNamespace(node_id=2, name=""), SimpleNamespace(node_id=5, name="hospital-e")]

        def send_and_receive(self, msgs, timeout):
            sent.update(nodes=[m.metadata.dst_node_id for m in msgs], timeout=timeout, ttls={m.ttl for m in msgs},
                        rounds=[codec.records_to_broadcast(m.content).round for m in msgs])
            bad = codec.offer_to_records(_offer("hospital-c", 2))
            bad["extra"] = bad.config_records["offer"]
            return [_reply(11, codec.offer_to_records(_offer("hospital-a", 2))),
                    _reply(2, error="BudgetExceeded at the site"),
                    _reply(3, bad),
                    _reply(6, codec.offer_to_records(_offer("hospital-a", 2))),  # hospital-f's key claims a
                    # the SuperLink answers for tasks that expired: silence from those sites, not a site named
                    # after the SuperLink's own node id
                    _reply(SUPERLINK, error="message expired", to=4), _reply(SUPERLINK, error="node gone", to=5, code=ErrorCode.NODE_UNAVAILABLE),
                    _reply(7, codec.offer_to_records(_offer("hospital-g", 2)), to=99)]  # no task of this round

    run = FakeRun({"2": "hospital-b", "3": "hospital-c", "4": "hospital-d"})
    assert server_app.run_round(Grid(), run, QUIET) == {11, 2, 3, 6}
    assert sent == {"nodes": [2, 3, 4, 5, 6, 7, 11], "timeout": 5.0, "ttls": {5.0}, "rounds": [2] * 7}
    assert run.calls == [("receive", "hospital-a", "11"),
                         ("no_answer", "hospital-b", Reason.SITE_FAILED),
                         ("no_answer", "hospital-c", Reason.MALFORMED),
                         ("no_answer", "hospital-f", Reason.SPOOFED_SITE),  # named by its registered key
                         ("no_answer", "hospital-d", Reason.NO_ANSWER),  # bound earlier in this run, silent now
                         # registered, never answered, and its SuperNode stopped reporting mid-round
                         ("no_answer", "hospital-e", Reason.SITE_UNAVAILABLE),
                         ("finish",)]  # node 7 never answered in this run: finish_round names silent sites
    # bytes down per SuperNode reached, under its registered site, its binding in this run, or its node id
    assert run.bytes_down == {s: Broadcast(2, b"m").nbytes() for s in
                              ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e", "hospital-f",
                               "node-7")}


def test_client_keeps_the_final_model_at_the_site_and_replies_with_nothing(monkeypatch, site_yaml):
    seen = {}
    monkeypatch.setattr("medfdd.site.offer.receive_final_model",
                        lambda path, final, *, console=None: seen.update(path=path.source, final=final))
    out = client_app.handle_final(codec.broadcast_to_records(Broadcast(3, b"final")),
                                  {"site-config": str(site_yaml)}, console=QUIET)
    assert seen == {"path": site_yaml.resolve(), "final": Broadcast(3, b"final")}
    assert list(out.keys()) == []  # the site's scores stay at the site

    def refusing(path, final, **kw):
        raise ValueError("model at /data/hospital-a/received/global-final-round-3.safetensors is not agreed")

    monkeypatch.setattr("medfdd.site.offer.receive_final_model", refusing)
    with pytest.raises(client_app.SiteTaskFailed) as e:
        client_app.handle_final(codec.broadcast_to_records(Broadcast(3, b"x")), {"site-config": str(site_yaml)},
                                console=QUIET)
    assert str(e.value) == "site-failed"


def test_server_sends_the_final_model_to_the_nodes_that_answered_the_last_round(monkeypatch):
    monkeypatch.setattr(server_app, "Message", _task)
    sent = {}

    class Grid:
        def get_nodes(self):
            return [SimpleNamespace(node_id=11, name="hospital-a")]

        def send_and_receive(self, msgs, timeout):
            sent.update(nodes=[m.metadata.dst_node_id for m in msgs], types={m.message_type for m in msgs},
                        ttls={m.ttl for m in msgs}, finals=[codec.records_to_broadcast(m.content) for m in msgs])
            return [_reply(11, codec.empty_reply()), _reply(2, error="ArtifactError at the site"),
                    _reply(3, error="message expired", src=SUPERLINK),  # the SuperLink's stand-in: not taken
                    _reply(7, codec.empty_reply())]  # a reply to no task of this batch is not counted

    run = FakeRun({"2": "hospital-b", "3": "hospital-c"})
    run.final_bytes_down = {}
    run.final_model = lambda: Broadcast(2, b"final")
    run.delivered = lambda site, nbytes: run.final_bytes_down.update({site: nbytes})
    server_app.deliver_final_model(Grid(), run, {2, 3, 11, 9}, QUIET)  # node 9: known as no site
    assert sent == {"nodes": [2, 3, 11], "types": {client_app.FINAL_MESSAGE_TYPE}, "ttls": {5.0},
                    "finals": [Broadcast(2, b"final")] * 3}
    assert run.final_bytes_down == {"hospital-a": Broadcast(2, b"final").nbytes()}  # b refused it: not counted
    sent.clear()
    server_app.deliver_final_model(Grid(), run, set(), QUIET)  # nobody answered the last round: nothing sent
    assert sent == {}
