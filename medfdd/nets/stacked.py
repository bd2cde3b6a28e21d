"""Several networks evaluated as one: G ConvNet-3s of one architecture become one grouped-convolution network.

A synthetic update of DM can match several banked statistics at once, each under its own random network. Stacking
their layers channel-wise (convolutions with `groups=G`, instance norm over G x width channels) computes exactly what
each network computes on its own input: the groups never mix channels, and instance norm and pooling act per
channel and per record. It is one call per layer instead of G, which is what a GPU needs (the per-step network is
too small to fill it); on a CPU it is the same arithmetic. Anything that cannot be stacked (a MONAI global model, a
ConvNet of another width) is evaluated alone behind the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medfdd.nets import Classifier, ConvNet

_CONV = (nn.Conv2d, nn.Conv3d)


class Stacked(nn.Module):
    """G ConvNet-3s of one architecture as one network: `embed([G, B, C, *spatial]) -> [G, B, d]`."""

    def __init__(self, nets: Sequence[ConvNet]):
        super().__init__()
        self.groups = len(nets)
        ref = nets[0]
        if any(n.arch != ref.arch for n in nets):
            raise ValueError("only ConvNet-3s of one architecture can be stacked")
        layers: list[nn.Module] = []
        for same in zip(*(n.features for n in nets), strict=True):
            layer = same[0]
            if isinstance(layer, _CONV):
                conv = type(layer)(layer.in_channels * self.groups, layer.out_channels * self.groups,
                                   layer.kernel_size, padding=layer.padding, bias=False, groups=self.groups)
                conv.weight = nn.Parameter(torch.cat([m.weight for m in same]), requires_grad=False)
                layers.append(conv)
            elif isinstance(layer, nn.GroupNorm):  # one group per channel (instance norm): stays per channel
                norm = nn.GroupNorm(layer.num_groups * self.groups, layer.num_channels * self.groups, eps=layer.eps)
                norm.weight = nn.Parameter(torch.cat([m.weight for m in same]), requires_grad=False)
                norm.bias = nn.Parameter(torch.cat([m.bias for m in same]), requires_grad=False)
                layers.append(norm)
            else:  # ReLU, pooling: stateless and per channel
                layers.append(layer)
        self.features = nn.Sequential(*layers).to(ref.classifier.weight.device)
        self.arch = {**ref.arch, "width": ref.arch["width"] * self.groups}  # what `model_chunk` sizes chunks by

    def embed(self, xs: torch.Tensor) -> torch.Tensor:
        g, b = xs.shape[:2]
        h = self.features(xs.transpose(0, 1).reshape(b, g * xs.shape[2], *xs.shape[3:]))
        return h.reshape(b, g, -1).transpose(0, 1)


class Alone(nn.Module):
    """One network behind the stacked interface: `embed([1, B, C, *spatial]) -> [1, B, d]`."""

    def __init__(self, net: Classifier):
        super().__init__()
        self.net = net
        self.arch = getattr(net, "arch", None)  # what `model_chunk` sizes chunks by

    def embed(self, xs: torch.Tensor) -> torch.Tensor:
        return self.net.embed(xs[0]).unsqueeze(0)


def stack_networks(nets: Sequence[Classifier]) -> list[tuple[Stacked | Alone, list[int]]]:
    """The networks grouped for evaluation: (stacked network, indices into `nets`), ConvNet-3s of one architecture
    together (the same object twice, e.g. the broadcast global model, is stacked with itself), anything else alone;
    a single network always goes alone, exactly as it computes by itself."""
    if len(nets) == 1:
        return [(Alone(nets[0]), [0])]
    by_arch: dict[str, list[int]] = {}
    alone: list[int] = []
    for i, net in enumerate(nets):
        if isinstance(net, ConvNet):
            by_arch.setdefault(repr(sorted(net.arch.items())), []).append(i)
        else:
            alone.append(i)
    groups: list[tuple[Stacked | Alone, list[int]]] = [
        (Stacked([nets[i] for i in idx]) if len(idx) > 1 else Alone(nets[idx[0]]), idx) for idx in by_arch.values()]
    return groups + [(Alone(nets[i]), [i]) for i in alone]

