"""Differentiable augmentation for 2D and 3D images (DSA, Zhao & Bilen, ICML 2021).

Single mode as in DSA/DM: each call picks one family (color, crop, cutout, scale, rotate[, flip]) and draws
per-image parameters from the given generator. The randomness never depends on the data, so applying it to real
records is part of the per-record function and does not change the privacy analysis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FAMILIES = ("color", "crop", "cutout", "scale", "rotate")


def _u(n: int, g: torch.Generator, device, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(n, generator=g, device="cpu").to(device) * (hi - lo) + lo


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _identity(n: int, dims: int, device) -> torch.Tensor:
    return torch.eye(dims, dims + 1, device=device).unsqueeze(0).repeat(n, 1, 1)


def color(x, g):
    n, shape = x.shape[0], (-1,) + (1,) * (x.dim() - 1)
    x = x + (_u(n, g, x.device, -0.25, 0.25)).view(shape)  # brightness
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x - mean) * _u(n, g, x.device, 0.5, 1.5).view(shape) + mean  # contrast


def crop(x, g, ratio: float = 0.125):
    n, dims = x.shape[0], x.dim() - 2
    theta = _identity(n, dims, x.device)
    for d in range(dims):
        theta[:, d, dims] = _u(n, g, x.device, -2 * ratio, 2 * ratio)  # translate by up to ratio of the size
    return _affine(x, theta)


def scale(x, g, ratio: float = 1.2):
    n, dims = x.shape[0], x.dim() - 2
    theta = _identity(n, dims, x.device)
    for d in range(dims):
        theta[:, d, d] = _u(n, g, x.device, 1 / ratio, ratio)
    return _affine(x, theta)


def rotate(x, g, degrees: float = 15.0):
    """In-plane rotation (the last two axes: H, W; for volumes every slice rotates alike)."""
    n, dims = x.shape[0], x.dim() - 2
    a = _u(n, g, x.device, -degrees, degrees) * math.pi / 180
    theta = _identity(n, dims, x.device)
    # affine_grid's coordinate order is (W, H[, D]): rotate the first two
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    return _affine(x, theta)


def cutout(x, g, ratio: float = 0.5):
    n, spatial = x.shape[0], x.shape[2:]
    mask = torch.ones_like(x)
    for i in range(n):
        sl = [slice(None), slice(None)]
        for s in spatial:
            size = max(1, int(s * ratio + 0.5))
            start = int(torch.randint(0, s - size + 1, (1,), generator=g))
            sl.append(slice(start, start + size))
        mask[i][tuple(sl[1:])] = 0
    return x * mask


def flip(x, g):
    keep = (_u(x.shape[0], g, x.device) < 0.5).view((-1,) + (1,) * (x.dim() - 1))
    return torch.where(keep, x, x.flip(-1))


OPS = {"color": color, "crop": crop, "cutout": cutout, "scale": scale, "rotate": rotate, "flip": flip}


def choose_family(g: torch.Generator, families: tuple[str, ...] = FAMILIES) -> str | None:
    """One augmentation family drawn uniformly (None when augmentation is off)."""
    return families[int(torch.randint(0, len(families), (1,), generator=g))] if families else None


def apply_family(x: torch.Tensor, g: torch.Generator, name: str | None) -> torch.Tensor:
    """Apply the named family with per-image parameters drawn from `g` (None: identity)."""
    return x if name is None or x.shape[0] == 0 else OPS[name](x, g)


def augment(x: torch.Tensor, g: torch.Generator, families: tuple[str, ...] = FAMILIES) -> torch.Tensor:
    """Apply one randomly chosen augmentation family with per-image parameters (DSA 'single' mode)."""
    if not families or x.shape[0] == 0:
        return x
    return apply_family(x, g, choose_family(g, families))
