"""Hybrid mode over Flower without a running app: the fine-tuning task and the sites' models through the codec, the
ClientApp handler and the ServerApp round (Message replaced by the stand-ins of test_codec_apps)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from test_codec_apps import SUPERLINK, _reply, _task

from medfdd.coordinator.validate import Reason
from medfdd.federation.flower import client_app, codec, server_app
from medfdd.messages import FinetuneRound, LocalUpdate

QUIET = Console(quiet=True)
RECIPE = {"rounds": 2, "local_epochs": 1, "lr": 0.2, "batch_size": 64, "clip_norm": 1.0}


@pytest.fixture
def site_yaml(site_builder):
    """A site config that loads (the handlers load it before the site task runs)."""
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    return s.write()


def _update(site_id="hospital-a", round_=1) -> LocalUpdate:
    return LocalUpdate(site_id, round_, b"local weights", {"site_id": site_id, "round": round_, "epsilon": 0.8,
                                                           "noise_multiplier": 1.2, "sample_rate": 0.1, "steps": 10})


def test_the_task_and_the_update_cross_the_wire_unchanged_and_nothing_else_does():
    task = FinetuneRound(2, b"global weights", dict(RECIPE))
    assert codec.records_to_finetune(codec.finetune_to_records(task)) == task
    update = _update(round_=2)
    assert codec.records_to_update(codec.update_to_records(update)) == update
    bad = codec.update_to_records(update)
    bad["extra"] = bad.config_records["update"]
    with pytest.raises(codec.CodecError, match="unexpected records"):
        codec.records_to_update(bad)
    with pytest.raises(codec.CodecError, match="more than the limit"):
        codec.records_to_update(codec.update_to_records(update), max_model_bytes=4)
    listed = codec.update_to_records(update)
    listed.config_records["update"]["meta-json"] = json.dumps([1, 2])
    with pytest.raises(codec.CodecError, match="expected an object"):
        codec.records_to_update(listed)
    with pytest.raises(codec.CodecError, match="round"):
        codec.records_to_finetune(codec.finetune_to_records(FinetuneRound(0, b"m", {})))


def test_client_handler_fine_tunes_at_the_site_and_returns_only_the_update(monkeypatch, capsys, site_yaml):
    seen = {}

    def fake(path, task, *, console=None, no_dp=False):
        seen.update(path=path.source, task=task)
        return _update(round_=task.round)

    monkeypatch.setattr("medfdd.site.finetune.finetune_site", fake)
    out = client_app.handle_finetune(codec.finetune_to_records(FinetuneRound(1, b"g", dict(RECIPE))),
                                     {"site-config": str(site_yaml)}, console=QUIET)
    assert seen == {"path": site_yaml.resolve(), "task": FinetuneRound(1, b"g", dict(RECIPE))}
    assert codec.records_to_update(out) == _update()

    def failing(path, task, **kw):
        raise ValueError("records of /data/hospital-a/PA-0042 changed")

    monkeypatch.setattr("medfdd.site.finetune.finetune_site", failing)
    with pytest.raises(client_app.SiteTaskFailed) as e:
        client_app.handle_finetune(codec.finetune_to_records(FinetuneRound(1, b"g", {})),
                                   {"site-config": str(site_yaml)}, console=QUIET)
    assert str(e.value) == "site-failed"  # the code only; the message stays in the site's log
    assert "PA-0042" in capsys.readouterr().err
    with pytest.raises(client_app.SiteTaskFailed) as e:
        client_app.handle_finetune(codec.empty_reply(), {"site-config": str(site_yaml)}, console=QUIET)
    assert str(e.value) == "bad-broadcast"


class FakeRun:
    site_timeout_s = 5.0

    def __init__(self, bindings):
        self.bindings, self.calls, self.bytes_down = bindings, [], {}

    def finetune_task(self):
        return FinetuneRound(1, b"warm start", dict(RECIPE))

    def sent(self, recipient, nbytes):
        self.bytes_down[recipient] = nbytes

    def receive_update(self, update, *, sender):
        self.calls.append(("receive", update.site_id, sender))
        return True

    def no_answer(self, site, reason, *, code=Reason.NO_ANSWER, nbytes=0):
        self.calls.append(("no_answer", site, code))

    def finish_finetune_round(self):
        self.calls.append(("finish",))


def test_server_finetune_round_maps_models_errors_spoofs_and_silence_to_the_core(monkeypatch):
    monkeypatch.setattr(server_app, "Message", _task)
    sent = {}

    class Grid:
        def get_node_ids(self):
            return [2, 3, 4, 6, 11]

        def get_nodes(self):
            return [SimpleNode(11, "hospital-a"), SimpleNode(6, "hospital-f")]

        def send_and_receive(self, msgs, timeout):
            sent.update(types={m.message_type for m in msgs},
                        tasks=[codec.records_to_finetune(m.content) for m in msgs])
            return [_reply(11, codec.update_to_records(_update("hospital-a"))),
                    _reply(2, error="site-failed"),
                    _reply(3, codec.finetune_to_records(FinetuneRound(1, b"x", {}))),  # not an update
                    _reply(6, codec.update_to_records(_update("hospital-a"))),  # hospital-f's key claims a
                    _reply(SUPERLINK, error="message expired", to=4)]

    run = FakeRun({"2": "hospital-b", "3": "hospital-c", "4": "hospital-d"})
    assert server_app.run_finetune_round(Grid(), run, QUIET) == {11, 2, 3, 6}
    assert sent["types"] == {client_app.FINETUNE_MESSAGE_TYPE}
    assert sent["tasks"] == [FinetuneRound(1, b"warm start", dict(RECIPE))] * 5
    assert run.calls == [("receive", "hospital-a", "11"), ("no_answer", "hospital-b", Reason.SITE_FAILED),
                         ("no_answer", "hospital-c", Reason.MALFORMED),
                         ("no_answer", "hospital-f", Reason.SPOOFED_SITE),  # named by its registered key
                         ("no_answer", "hospital-d", Reason.NO_ANSWER), ("finish",)]
    assert run.bytes_down["hospital-a"] == FinetuneRound(1, b"warm start", dict(RECIPE)).nbytes()


class SimpleNode:
    def __init__(self, node_id, name):
        self.node_id, self.name = node_id, name
