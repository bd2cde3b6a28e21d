"""ConvNet-3 (Gidaris & Komodakis 2018, as used by DC/DSA/DM): [conv 3x3 -> instance norm -> ReLU -> avg-pool] x 3.

Instance norm is GroupNorm with one group per channel, which Opacus supports (no batch statistics mixing records).
The convolutions carry no bias: instance norm subtracts it exactly, and with it a blank (all-zero) scan became a
constant channel whose normalised value was rounding noise that depended on the other records in the batch, so
one record's contribution to a private release was no longer a function of that record alone.
2D and 3D variants share the code; `embed` returns the flattened features before the linear classifier.
`model_for` / `model_from_arch` also build the allow-listed MONAI networks (`medfdd.nets.monai_nets`) behind the same
interface (`arch`, `embed`, `forward`). `records_per_chunk` sizes the batches pushed through them at once, so that
peak memory follows the record size (a 64^3 volume's first activation is 4,096 times a 28x28 scan's), never the batch.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from medfdd.nets.monai_nets import ARCHITECTURES, MonaiClassifier

ACTIVATION_BUDGET = 1 << 30  # bytes of a chunk's largest activation (the first convolution's output, fp32)
MAX_CHUNK = 256  # records at once however small they are (the batches 2D sites always ran with)
BACKWARD_FACTOR = 4  # with a backward pass, each layer keeps about this many activations of its size (conv, norm,
# ReLU, pool) until the gradient has passed


def records_per_chunk(image_shape: tuple[int, ...], width: int = 128, *, backward: bool = False,
                      budget: int | None = None, cap: int = MAX_CHUNK) -> int:
    """Records of shape [C, *spatial] to run through a network whose first layer has `width` channels at full
    resolution (ConvNet-3), at once, so that that layer's output (the largest activation) stays within `budget` bytes
    (default `ACTIVATION_BUDGET`; `backward`: all that is kept for the gradient): `cap` (256) for 28x28 scans at width
    128 (with a backward pass too: the batches 2D sites always ran with), 8 for 64^3 volumes (2 with a backward pass),
    32 at width 32 (8). At least 1: a record larger than the budget
    goes alone."""
    budget = budget or ACTIVATION_BUDGET
    per_record = 4 * width * math.prod(image_shape[1:]) * (BACKWARD_FACTOR if backward else 1)
    return max(1, min(cap, budget // max(1, per_record)))


def model_chunk(model: nn.Module, image_shape: tuple[int, ...], *, backward: bool = False, cap: int = MAX_CHUNK) -> int:
    """`records_per_chunk` for a built model: ConvNet-3's width from its `arch`, 128 for a MONAI network (their first
    layers are at most that wide at full resolution)."""
    arch = getattr(model, "arch", None)
    width = int(arch.get("width", 128)) if isinstance(arch, dict) else 128
    return records_per_chunk(image_shape, width, backward=backward, cap=cap)


class ConvNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, spatial_size: tuple[int, ...], width: int = 128,
                 depth: int = 3):
        super().__init__()
        dims = len(spatial_size)
        if dims not in (2, 3):
            raise ValueError(f"spatial_size must have 2 or 3 entries, got {spatial_size}")
        conv, pool = (nn.Conv2d, nn.AvgPool2d) if dims == 2 else (nn.Conv3d, nn.AvgPool3d)
        layers: list[nn.Module] = []
        size = list(spatial_size)
        c = in_channels
        for _ in range(depth):
            layers += [conv(c, width, kernel_size=3, padding=1, bias=False),
                       nn.GroupNorm(width, width, affine=True), nn.ReLU()]  # out of place: Opacus hooks forbid in-place ops
            if min(size) >= 2:
                layers.append(pool(kernel_size=2, stride=2))
                size = [s // 2 for s in size]
            c = width
        self.features = nn.Sequential(*layers)
        self.arch = {"in_channels": in_channels, "num_classes": num_classes, "spatial_size": list(spatial_size),
                     "width": width, "depth": depth}
        self.embed_dim = width * math.prod(size)
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the CPU generator for building a module (restored after; None: leave it alone).

    Modules are built on the CPU, so only the CPU generator is seeded: `torch.manual_seed` also queues a seed for
    every accelerator, recording a stack trace each time, which cost more than building a small network (a
    distillation builds one per step)."""
    if seed is None:
        yield
        return
    saved = torch.default_generator.get_state()
    try:
        torch.default_generator.manual_seed(seed)
        yield
    finally:
        torch.default_generator.set_state(saved)


def convnet_for(images_shape: tuple[int, ...], num_classes: int, width: int = 128, seed: int | None = None
                ) -> ConvNet:
    """A freshly initialised ConvNet-3 for images of shape [C, *spatial]; `seed` makes the init reproducible."""
    with _seeded(seed):
        return ConvNet(images_shape[0], num_classes, tuple(images_shape[1:]), width)


Classifier = ConvNet | MonaiClassifier  # what medfdd trains, broadcasts, fine-tunes and loads
CONVNET = "convnet3"
ARCHITECTURE_NAMES = (CONVNET, *ARCHITECTURES)


def model_from_arch(arch: dict, seed: int | None = None) -> Classifier:
    """A freshly initialised model of the architecture a model file's header records (`model.arch`): ConvNet-3 (no
    `family`, or "convnet") or an allow-listed MONAI network. Raises KeyError / ValueError / TypeError on anything
    else (the caller says which file)."""
    family = arch.get("family", "convnet")
    shape = (int(arch["in_channels"]), *(int(s) for s in arch["spatial_size"]))
    with _seeded(seed):
        if family == "convnet":
            return ConvNet(shape[0], int(arch["num_classes"]), shape[1:], int(arch["width"]), int(arch.get("depth", 3)))
        if family == "monai":
            return MonaiClassifier(str(arch["name"]), shape[0], int(arch["num_classes"]), shape[1:])
    raise ValueError(f"unknown model family {family!r}")


def model_for(images_shape: tuple[int, ...], num_classes: int, *, architecture: str = CONVNET, width: int = 128,
              seed: int | None = None) -> Classifier:
    """A fresh model for images of shape [C, *spatial]: ConvNet-3 at `width`, or the named MONAI network."""
    if architecture == CONVNET:
        return convnet_for(images_shape, num_classes, width=width, seed=seed)
    return model_from_arch({"family": "monai", "name": architecture, "in_channels": images_shape[0],
                            "num_classes": num_classes, "spatial_size": list(images_shape[1:])}, seed=seed)


@contextlib.contextmanager
def quiet_backward_hooks() -> Iterator[None]:
    """Silence torch's "Full backward hook is firing" under Opacus's per-sample hooks: the inputs of a ConvNet never
    require grad, yet the hooks still see every module (harmless)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield
