"""MONAI networks as the consortium's global model (`train.architecture` in the coordinator config).

Only allow-listed `monai.networks.nets` classes are built: a model file names its architecture in its header, and a
name read from another party must never choose arbitrary code. Each is built with instance normalisation (affine)
and out-of-place activations instead of MONAI's batch norm and in-place ReLU, so that one record's output depends on
that record alone (batch norm mixes a batch's records, which neither a DP mechanism's sensitivity nor Opacus's
per-sample gradients allow: Opacus ModuleValidator) and the hybrid mode's DP-SGD runs on it unchanged.
`embed` is the input of the final linear layer (the features FedDM-style matching uses from round 2 on).
"""

from __future__ import annotations

import torch
from torch import nn

NORM = ("instance", {"affine": True})
ACT = ("relu", {"inplace": False})


def _densenet121(spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, norm=NORM,
                       act=ACT)


# name in the config -> (builder, the `monai.networks.nets` class a MONAI bundle instantiates, its keyword names)
ARCHITECTURES = {
    "densenet121": (_densenet121, "monai.networks.nets.DenseNet121",
                    {"spatial_dims": "spatial_dims", "in_channels": "in_channels", "num_classes": "out_channels"}),
}


class MonaiClassifier(nn.Module):
    """A MONAI classification network with the interface medfdd's code uses: `arch` (what the model file's header
    records), `embed` and `forward`. The MONAI module itself is `net` (its state dict is what a MONAI bundle loads)."""

    def __init__(self, name: str, in_channels: int, num_classes: int, spatial_size: tuple[int, ...]):
        super().__init__()
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown MONAI architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
        if len(spatial_size) not in (2, 3):
            raise ValueError(f"spatial_size must have 2 or 3 entries, got {spatial_size}")
        self.net = ARCHITECTURES[name][0](len(spatial_size), in_channels, num_classes)
        self.arch = {"family": "monai", "name": name, "in_channels": in_channels, "num_classes": num_classes,
                     "spatial_size": list(spatial_size)}
        self.head_name = [name for name, m in self.net.named_modules() if isinstance(m, nn.Linear)][-1]
        self.embed_dim = self.head.in_features

    @property
    def head(self) -> nn.Linear:
        """The final linear layer (a plain lookup: registering it twice would duplicate its weights in the state)."""
        return self.net.get_submodule(self.head_name)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        features: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda _m, args: features.append(args[0]))
        try:
            self.net(x)
        finally:
            hook.remove()
        return features[0].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def bundle_network_def(self) -> dict:
        """The `network_def` of a MONAI bundle's config that builds `net` with MONAI alone."""
        _, target, keys = ARCHITECTURES[self.arch["name"]]
        values = {"spatial_dims": len(self.arch["spatial_size"]), "in_channels": self.arch["in_channels"],
                  "num_classes": self.arch["num_classes"]}
        return {"_target_": target, **{keys[k]: v for k, v in values.items()},
                "norm": [NORM[0], dict(NORM[1])], "act": [ACT[0], dict(ACT[1])]}
