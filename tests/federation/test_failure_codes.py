"""An error raised at a site because of its data crosses either transport as the generic `site-failed` code only
(issue 36, item 6): no class name, no message, nothing that depends on the records beyond that one code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from rich.console import Console

from medfdd.config import load_site_config
from medfdd.coordinator.validate import Reason
from medfdd.errors import MedfddError
from medfdd.federation.failures import FailureCode, code_in
from medfdd.federation.flower import client_app, codec, server_app
from medfdd.federation.inprocess import site_round
from medfdd.messages import Broadcast
from medfdd.site.offer import make_offer

QUIET = Console(quiet=True)


def _delta_above_one_over_n(s):
    for k in range(4):
        s.add_dicom(f"x{k}.dcm", "ab"[k % 2], patient_id=f"P{k}")
    return s.write(privacy={"dp": True, "epsilon": 1.0, "delta": 0.5, "accountant": "rdp"})


def _empty_training_split(s):
    s.add("missing.dcm", "a", "P0")  # quarantined: nothing is left to train on
    return s.write()


CASES = {"delta >= 1/n": (_delta_above_one_over_n, "1/"), "empty training split": (_empty_training_split, "empty")}


class Recorder:
    """The coordinator's side of a round, recording what each site's failure told it."""

    def __init__(self):
        self.bindings, self.site_timeout_s, self.rejected = {}, 5.0, []

    def sent(self, site, nbytes):
        pass

    def broadcast(self):
        return Broadcast(1)

    def receive(self, offer, *, sender):
        raise AssertionError("a failing site offered")

    def no_answer(self, site, reason, *, code=Reason.NO_ANSWER, nbytes=0):
        self.rejected.append((site, reason, code))

    def finish_round(self):
        return {}


def _flower_reason(ex: Exception) -> str:
    """The error text Flower's SuperNode builds from what the ClientApp raised (flwr run_clientapp)."""
    return str(type(ex)) + ":<'" + str(ex) + "'>"


@pytest.mark.parametrize("case", list(CASES))
def test_a_data_dependent_site_error_crosses_the_transports_as_the_generic_code(site_builder, monkeypatch, case):
    make, fact = CASES[case]
    cfg_path = make(site_builder(holdout_fraction=0.0))
    with pytest.raises(MedfddError) as direct:  # at the site the error is typed and names the data fact
        make_offer(load_site_config(cfg_path), Broadcast(1), console=QUIET)
    cls, text = type(direct.value).__name__, str(direct.value)
    assert fact in text

    run = Recorder()  # in-process engine
    site_round(run, "hospital-a", cfg_path, Broadcast(1), console=QUIET)
    ((site, detail, code),) = run.rejected
    assert (site, code) == ("hospital-a", Reason.SITE_FAILED) and code_in(detail) == FailureCode.SITE_FAILED
    assert cls not in detail and fact not in detail and "Error" not in detail

    with pytest.raises(client_app.SiteTaskFailed) as e:  # Flower: the ClientApp, then the wire, then the ServerApp
        client_app.handle(codec.broadcast_to_records(Broadcast(1)), {"site-config": str(cfg_path)}, console=QUIET)
    wire = _flower_reason(e.value)
    assert str(e.value) == "site-failed" and cls not in wire and fact not in wire and text not in wire
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained error rides along

    task = SimpleNamespace(metadata=SimpleNamespace(dst_node_id=7, message_id="t7"))
    reply = SimpleNamespace(metadata=SimpleNamespace(src_node_id=7, reply_to_message_id="t7"), has_error=lambda: True,
                            error=SimpleNamespace(reason=wire), content=None)
    monkeypatch.setattr(server_app, "Message", lambda *a, **kw: task)
    grid = SimpleNamespace(get_node_ids=lambda: [7], get_nodes=lambda: [SimpleNamespace(node_id=7, name="hospital-a")],
                           send_and_receive=lambda msgs, timeout: [reply])
    server = Recorder()
    server_app.run_round(grid, server, QUIET)
    assert server.rejected == [("hospital-a", "site error: site-failed", Reason.SITE_FAILED)]


def test_only_the_fixed_codes_are_read_from_a_site_error():
    assert code_in("<class 'x.SiteTaskFailed'>:<'site-not-configured'>") == "site-not-configured"
    assert code_in("DistillError: delta 0.5 is not below 1/4 at /data/PA-0042") == "unrecognised"


class Clock:
    """A stand-in for `time` in the ClientApp: the site task advances it; sleeping is recorded, not done."""

    def __init__(self):
        self.now, self.slept = 100.0, []

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


@pytest.mark.parametrize("fails", [False, True])
def test_reply_after_holds_the_reply_whatever_the_outcome(site_builder, monkeypatch, fails):
    """`medfdd site join --reply-after S`: an offer and a failure both leave S seconds after the task arrived, so
    the reply's time no longer tells how long the site's turn took (the timing channel)."""
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    cfg_path = s.write()
    clock = Clock()
    monkeypatch.setattr(client_app, "time", clock)

    def turn(path, broadcast, **kw):
        clock.now += 3.0  # the site's turn takes 3 s
        if fails:
            raise ValueError("the training split is empty")
        return SimpleNamespace()

    monkeypatch.setattr("medfdd.site.offer.make_offer", turn)
    monkeypatch.setattr(codec, "offer_to_records", lambda offer: "records")
    node = {"site-config": str(cfg_path), "reply-after-s": 10}
    if fails:
        with pytest.raises(client_app.SiteTaskFailed, match="^site-failed$"):
            client_app.handle(codec.broadcast_to_records(Broadcast(1)), node, console=QUIET)
    else:
        assert client_app.handle(codec.broadcast_to_records(Broadcast(1)), node, console=QUIET) == "records"
    assert clock.slept == [7.0] and clock.now == 110.0
    with pytest.raises(client_app.SiteTaskFailed, match="^site-not-configured$"):  # a bad pad fails loudly
        client_app.handle(codec.broadcast_to_records(Broadcast(1)), {**node, "reply-after-s": "soon"}, console=QUIET)


def test_site_join_passes_the_pad_to_the_supernode(tmp_path):
    from medfdd.federation.flower import deploy

    (tmp_path / "a.yaml").write_text("site_id: a\n")
    argv = deploy.supernode_argv(site_config=tmp_path / "a.yaml", superlink="127.0.0.1:9093",
                                 security=deploy.Security(insecure=True), private_key=None, reply_after_s=3000)
    from flwr.common.config import parse_config_args  # how the SuperNode reads its --node-config

    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert node_config == {"site-config": str((tmp_path / "a.yaml").resolve()), "reply-after-s": 3000.0}
    assert client_app.reply_after(node_config) == 3000.0 and client_app.reply_after({}) == 0.0
