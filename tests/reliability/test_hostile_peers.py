"""Hostile coordinator: a site refuses a broadcast it cannot trust before anything is charged to its ledger.

(Hostile sites, i.e. offers the coordinator refuses, are in tests/coordinator/test_offers.py; spoofed and unregistered
Flower nodes in tests/integration/test_flower_deployment.py.)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from reliability_helpers import tiny_consortium
from rich.console import Console
from safetensors.torch import save

from medfdd.artifacts import ArtifactError, load_model, save_model
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.messages import Broadcast
from medfdd.nets import ConvNet
from medfdd.site.offer import make_offer, receive_final_model
from privacy.accounting import BudgetExceeded, PrivacyLedger

AGREED = {"in_channels": 1, "num_classes": 10, "spatial_size": (16, 16)}  # what `prepare --source digits` agrees on
MARKER = "unpickled-marker"


def _model_bytes(tmp: Path, in_channels=1, num_classes=10, spatial_size=(16, 16), width=8, poison=None) -> bytes:
    model = ConvNet(in_channels, num_classes, tuple(spatial_size), width)
    if poison is not None:
        with torch.no_grad():
            next(model.parameters()).fill_(poison)
    return save_model(tmp / "m.safetensors", model).read_bytes()


def _no_metadata(tmp: Path) -> bytes:
    model = ConvNet(1, 10, (16, 16), 8)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def _foreign_weights(tmp: Path) -> bytes:
    """The agreed architecture in the header, the weights of another network."""
    other = ConvNet(1, 10, (8, 8), 8)
    arch = {**ConvNet(1, 10, (16, 16), 8).arch}
    return save({k: v.contiguous() for k, v in other.state_dict().items()}, metadata={"arch": json.dumps(arch)})


def _huge_width(tmp: Path) -> bytes:
    """The agreed classes, channels and size, with a header announcing width 60000 (a 130 GB layer to build)."""
    model = ConvNet(1, 10, (16, 16), 8)
    return save({k: v.contiguous() for k, v in model.state_dict().items()},
                metadata={"arch": json.dumps({**model.arch, "width": 60000})})


def _huge_announcement(tmp: Path) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]},
                         "__metadata__": {"arch": json.dumps({**AGREED, "spatial_size": [16, 16], "width": 8})}})
    return struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16


class _Touch:
    """A pickle that creates a file when unpickled: proof that nothing was unpickled if the file never appears."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _pickle_payload(tmp: Path) -> bytes:
    buf = tmp / "model.pt"
    torch.save({"state_dict": ConvNet(1, 10, (16, 16), 8).state_dict(), "x": _Touch(tmp / MARKER)}, buf)
    return buf.read_bytes()


# case -> (description, payload builder, broadcast round, expected error, text the error must contain)
HOSTILE_BROADCASTS = {
    "garbage bytes": ("4 KiB of random bytes as the model", lambda t: bytes(range(256)) * 16, 2, ArtifactError,
                      "not a readable safetensors file"),
    "empty model": ("a zero-byte model", lambda t: b"", 2, ArtifactError, "not a readable safetensors file"),
    "pickled torch model": ("torch.save pickle whose unpickling would create a file", _pickle_payload, 2,
                            ArtifactError, "not a readable safetensors file"),
    "announces a 4 TB tensor": ("safetensors header announcing 10^12 floats, 16 bytes sent", _huge_announcement, 2,
                                ArtifactError, "not a readable safetensors file"),
    "wrong number of classes": ("a ConvNet for 3 classes", lambda t: _model_bytes(t, num_classes=3), 2,
                                ArtifactError, "does not match the agreed one"),
    "wrong spatial size": ("a ConvNet for 8x8 images", lambda t: _model_bytes(t, spatial_size=(8, 8)), 2,
                           ArtifactError, "does not match the agreed one"),
    "wrong channels": ("a ConvNet for RGB input", lambda t: _model_bytes(t, in_channels=3), 2, ArtifactError,
                       "does not match the agreed one"),
    "no architecture metadata": ("safetensors weights without medfdd's arch header", _no_metadata, 2,
                                 ArtifactError, "no architecture metadata"),
    "weights of another network": ("the agreed arch header over an 8x8 network's weights", _foreign_weights, 2,
                                   ArtifactError, "do not match the architecture in the header"),
    "announces width 60000": ("the agreed network's weights under a header announcing width 60000 (nothing is "
                              "built before the shapes are compared)", _huge_width, 2, ArtifactError,
                              "do not match the architecture in the header"),
    "NaN weights": ("the agreed architecture with NaN weights", lambda t: _model_bytes(t, poison=float("nan")), 2,
                    ArtifactError, "NaN/Inf"),
    "Inf weights": ("the agreed architecture with +Inf weights", lambda t: _model_bytes(t, poison=float("inf")), 2,
                    ArtifactError, "NaN/Inf"),
    "round beyond the plan": ("a valid model for round 3 of a 2-round plan", lambda t: _model_bytes(t), 3,
                              BudgetExceeded, "beyond the planned"),
}
BROADCAST_OUTCOME = "typed error before the ledger charge: nothing charged, nothing distilled or released"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    coord = tiny_consortium(tmp_path_factory.mktemp("hostile") / "c", sites=2, rounds=2)
    return load_coordinator_config(coord).site_paths[0]


@pytest.mark.parametrize("case", list(HOSTILE_BROADCASTS))
def test_site_refuses_a_hostile_broadcast_before_charging(site, tmp_path, case):
    _, payload, round_, error, text = HOSTILE_BROADCASTS[case]
    out = load_site_config(site).output_dir
    with pytest.raises(error) as e:
        make_offer(load_site_config(site), Broadcast(round_, payload(tmp_path)), console=Console(quiet=True))
    assert text in str(e.value) and "Fix:" in str(e.value)
    ledger = out / "privacy_ledger.json"
    assert not ledger.exists() or PrivacyLedger.load(ledger).entries == ()
    assert not (out / "synthetic.npz").exists()
    assert not (tmp_path / MARKER).exists()


FINAL_MODEL_CASES = [c for c, (_, _, _, error, _) in HOSTILE_BROADCASTS.items() if error is ArtifactError]


@pytest.mark.parametrize("case", FINAL_MODEL_CASES)
def test_site_refuses_a_hostile_final_model_and_keeps_nothing(site, tmp_path, case):
    """After the last round the same payloads arrive as the final model: refused before it is kept or scored."""
    _, payload, round_, error, text = HOSTILE_BROADCASTS[case]
    out = load_site_config(site).output_dir
    with pytest.raises(error) as e:
        receive_final_model(load_site_config(site), Broadcast(round_, payload(tmp_path)), console=Console(quiet=True))
    assert text in str(e.value) and "Fix:" in str(e.value)
    assert not (out / "global_model.safetensors").exists() and not (out / "evaluation.json").exists()
    assert not (tmp_path / MARKER).exists()


def test_the_agreed_model_is_accepted_and_charged_once(site, tmp_path):
    """Positive control: the same site takes a well-formed global model and pays for round 2 once."""
    cfg = yaml.safe_load(site.read_text())
    cfg["output"] = str(tmp_path / "out")
    path = site.with_name("positive-control.yaml")
    path.write_text(yaml.safe_dump(cfg))
    offer = make_offer(load_site_config(path), Broadcast(2, _model_bytes(tmp_path)), console=Console(quiet=True))
    assert offer.round == 2 and offer.meta["round"] == 2
    assert [e.round for e in PrivacyLedger.load(tmp_path / "out" / "privacy_ledger.json").entries if e.purpose == "distill"] == [2]


def test_a_global_model_written_with_conv_biases_loads_and_computes_the_same(tmp_path):
    """Models from before the convolutions lost their bias still load: instance norm subtracts a conv bias exactly,
    so dropping it leaves the function unchanged (checked on outputs, not assumed)."""
    model = ConvNet(1, 10, (16, 16), 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for i, m in enumerate(model.features):
        if isinstance(m, torch.nn.Conv2d):
            state[f"features.{i}.bias"] = torch.randn(m.out_channels, generator=g)  # what older writers stored
    with_bias = ConvNet(1, 10, (16, 16), 8)
    for m in with_bias.features:
        if isinstance(m, torch.nn.Conv2d):
            m.bias = torch.nn.Parameter(torch.zeros(m.out_channels))
    with_bias.load_state_dict(state)
    path = tmp_path / "old.safetensors"
    path.write_bytes(save(state, metadata={"arch": json.dumps(model.arch)}))
    loaded = load_model(path)
    x = torch.rand(4, 1, 16, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), with_bias.eval()(x), atol=1e-4, rtol=1e-4)
    state["classifier.extra"] = torch.zeros(1)  # anything else that does not fit is still refused
    path.write_bytes(save(state, metadata={"arch": json.dumps(model.arch)}))
    with pytest.raises(ArtifactError, match="do not match the architecture"):
        load_model(path)
