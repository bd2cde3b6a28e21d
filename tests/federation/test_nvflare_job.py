"""NVFlare engine: the medfdd job in NVFlare's simulator (server + 3 clients on loopback, real subprocesses) gives
the merged set and run.json of the in-process engine for the same site noise keys; hostile client results are
refused with the Flower path's reasons; the codec survives NVFlare's own serialiser (FOBS)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_final_model_delivered, pin_noise_keys, small_digits_consortium
from rich.console import Console

pytest.importorskip("nvflare", reason="the NVFlare engine needs the extra: pip install 'medfdd[nvflare]'")

from nvflare.apis.shareable import Shareable  # noqa: E402

from medfdd.config import load_coordinator_config, load_site_config  # noqa: E402
from medfdd.coordinator.run import CoordinatorRun  # noqa: E402
from medfdd.coordinator.validate import Reason  # noqa: E402
from medfdd.federation.consortium import consortium_of  # noqa: E402
from medfdd.federation.inprocess import run_inprocess  # noqa: E402
from medfdd.federation.nvflare import codec  # noqa: E402
from medfdd.federation.nvflare.controller import take_offer  # noqa: E402
from medfdd.federation.nvflare.executor import DISTILL_TASK, handle  # noqa: E402
from medfdd.federation.nvflare.job import main, run_simulator  # noqa: E402
from medfdd.messages import Broadcast, SiteOffer, to_wire  # noqa: E402

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)
ROOT = Path(__file__).resolve().parents[2]


def _inprocess_copy(coord: Path) -> Path:
    """The same consortium with site outputs and a run folder of its own (site_configs_inprocess/)."""
    src = coord.parent
    dst = src.parent / "site_configs_inprocess"
    dst.mkdir()
    for path in load_coordinator_config(coord).site_paths:
        cfg = yaml.safe_load(path.read_text())
        cfg["output"] = cfg["output"].replace("../runs/", "../runs-inprocess/")
        (dst / path.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    doc = yaml.safe_load(coord.read_text())
    doc["output"] = "../runs-inprocess/coordinator"
    (dst / coord.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst / coord.name


@pytest.fixture(scope="module")
def consortium(tmp_path_factory, shared_preprocess_cache):
    base = tmp_path_factory.mktemp("nvflare")
    return small_digits_consortium(base / "consortium", rounds=1, site_timeout_s=600.0,
                                   cache_dir=shared_preprocess_cache)


@pytest.fixture(scope="module")
def runs(consortium, tmp_path_factory):
    """(NVFlare run dir, in-process run dir, NVFlare site configs by id): one run each, same pinned noise keys."""
    inproc = _inprocess_copy(consortium)
    sites = sorted(load_coordinator_config(consortium).site_paths)
    pin_noise_keys(sites)
    pin_noise_keys(sorted(load_coordinator_config(inproc).site_paths))
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(ROOT))  # the simulator's processes import this checkout's medfdd
    try:
        out = run_simulator(consortium, tmp_path_factory.mktemp("nvflare-workspace"), threads=1)
    finally:
        mp.undo()
    inproc_out = run_inprocess(load_coordinator_config(inproc), console=Console(quiet=True))
    return out, inproc_out, {load_site_config(p).site_id: p for p in sites}


def test_simulator_run_matches_the_inprocess_engine(runs):
    out, inproc_out, sites = runs
    with np.load(out / "merged.npz", allow_pickle=False) as f, \
            np.load(inproc_out / "merged.npz", allow_pickle=False) as i:
        assert f["labels"].size > 0
        np.testing.assert_array_equal(f["labels"], i["labels"])
        np.testing.assert_array_equal(f["images"], i["images"])
    nv = json.loads((out / "run.json").read_text())
    ip = json.loads((inproc_out / "run.json").read_text())
    assert (nv["engine"], ip["engine"], nv["status"]) == ("nvflare", "inprocess", "completed")
    assert [r["accepted"] for r in nv["rounds"]] == [r["accepted"] for r in ip["rounds"]] == [sorted(sites)]
    for a, b in zip(nv["rounds"], ip["rounds"], strict=True):
        assert a["rejected"] == b["rejected"] == []
        assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-12)
        assert (a["n_merged"], a["class_counts"]) == (b["n_merged"], b["class_counts"])
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
    assert nv["final"]["n_merged"] == ip["final"]["n_merged"]
    # the same merged set trains the global model in another process (other thread count, other float sums): the
    # predictions agree, the probabilities to ~1e-6 (measured: the AUC differed by 1.2e-6 once)
    for k in ("accuracy", "balanced_accuracy", "auc"):
        assert nv["final"][k] == pytest.approx(ip["final"][k], abs=1e-4), k
    assert nv["final"]["confusion_matrix"] == ip["final"]["confusion_matrix"]
    assert_final_model_delivered(out, sites)


@pytest.fixture
def open_round(consortium, tmp_path):
    """A real coordinator run of the consortium (its own output folder) with round 1 open, as the server holds it."""
    cfg = load_coordinator_config(consortium).model_copy(update={"output": str(tmp_path / "run")})
    spec, sites = consortium_of(cfg)
    run = CoordinatorRun.open(cfg, spec, engine="nvflare", sites=sites, console=Console(quiet=True))
    run.broadcast()
    return run, sorted(spec.sites)


def _offer(site: str, n: int = 2, shape=(1, 8, 8)) -> SiteOffer:
    return SiteOffer(site, 1, {"images": to_wire(np.zeros((n, *shape), np.float32)),
                               "labels": to_wire(np.zeros(n, np.int64))}, {"site_id": site, "round": 1})


def test_hostile_client_results_get_the_flower_paths_reasons(open_round):
    run, (a, b, c) = open_round
    malformed = codec.offer_to_shareable(_offer(a))
    malformed[codec.ARRAYS]["images"]["shape"] = ["1"]
    oversized = codec.offer_to_shareable(_offer(b))
    oversized[codec.ARRAYS]["images"].update(shape=[10**9, 1, 8, 8], data=b"")  # announces 256 GB, sends nothing
    spoofed = codec.offer_to_shareable(_offer(a))  # client c answers for site a
    failed = codec.failure_reply("/site/secret/path.dcm failed: site-failed")  # only the code may be recorded
    assert [take_offer(run, who, s) for who, s in ((a, malformed), (b, oversized), (c, spoofed))] == [True] * 3
    assert take_offer(run, a, failed) and not take_offer(run, b, None)
    extra = codec.offer_to_shareable(_offer(c))
    extra["patient_ids"] = ["P-001"]  # a key outside the allow-list
    assert take_offer(run, c, extra)
    unsigned = Shareable()  # a non-OK return code without medfdd's failure header: NVFlare's error, or made up
    unsigned.set_return_code("patient P-001 in /data/x.dcm")
    assert take_offer(run, b, unsigned)
    odd = codec.offer_to_shareable(_offer(b))
    odd["__headers__"] = ["not", "a", "dict"]  # NVFlare's header slot in a shape NVFlare never sends
    assert take_offer(run, b, odd)
    reasons = [(r["site_id"], r["reason"]) for r in run.current.rejected]
    assert reasons == [(a, Reason.MALFORMED), (b, Reason.OVERSIZED), (c, Reason.SPOOFED_SITE), (a, Reason.SITE_FAILED),
                       (c, Reason.MALFORMED), (b, Reason.NO_ANSWER), (b, Reason.MALFORMED)]
    assert run.current.rejected[3]["detail"] == "site error: site-failed"
    assert run.current.rejected[5]["detail"] == "no offer (NVFlare: unrecognised)"  # no text of the client's recorded
    assert run.current.accepted == {}


def test_codec_survives_nvflares_serialiser():
    from nvflare.fuel.utils import fobs

    offer = _offer("hospital-a", n=3)
    offer.meta["epsilon"] = float("inf")  # a --no-dp offer's epsilon crosses as JSON Infinity
    got = codec.shareable_to_offer(fobs.loads(fobs.dumps(codec.offer_to_shareable(offer))))
    assert (got.site_id, got.round, got.meta) == (offer.site_id, offer.round, offer.meta)
    assert got.arrays == offer.arrays
    b = Broadcast(round=2, model=b"\x00safetensors")
    assert codec.shareable_to_broadcast(fobs.loads(fobs.dumps(codec.broadcast_to_shareable(b)))) == b


def test_a_broadcast_the_site_cannot_read_leaves_only_its_code(consortium):
    site = load_coordinator_config(consortium).site_paths[0]
    reply = handle(DISTILL_TASK, codec.broadcast_to_shareable(Broadcast(round=0)), site, console=Console(quiet=True))
    assert reply.get_return_code() == "EXECUTION_EXCEPTION"
    assert reply.get_header(codec.FAILURE_HEADER) == "bad-broadcast"
    assert set(reply) == {"__headers__"}  # nothing but NVFlare's headers: no offer, no error text


def test_job_exports_one_client_per_site(consortium, tmp_path, capsys):
    sites = sorted(load_site_config(p).site_id for p in load_coordinator_config(consortium).site_paths)
    assert main(["--config", str(consortium), "--export", str(tmp_path / "listed")]) == 0
    meta = json.loads((tmp_path / "listed" / "medfdd" / "meta.json").read_text())
    assert meta["deploy_map"] == {"app_server": ["server"], **{f"app_{s}": [s] for s in sites}}
    assert not list((tmp_path / "listed").rglob("custom/*"))  # medfdd is installed at every party, not shipped
    # a real deployment: each hospital's client gets its config path as on its own machine
    argv = ["--config", str(consortium), "--export", str(tmp_path / "real"), "--site", f"{sites[0]}=/srv/a/site.yaml"]
    assert main(argv) == 0
    client = json.loads((tmp_path / "real" / "medfdd" / f"app_{sites[0]}" / "config" / "config_fed_client.json")
                        .read_text())
    assert client["executors"][0]["executor"]["args"] == {"site_config": "/srv/a/site.yaml"}
    assert main([*argv[:3], str(tmp_path / "bad"), "--site", "hospital-z=/srv/z.yaml"]) == 1
    assert "['hospital-z'] are not in the consortium" in capsys.readouterr().err
