"""Batched, seeded image augmentations for self-supervised training (small grayscale images).

Every random draw comes from the ``torch.Generator`` passed in (on the CPU),
one vector per batch, and the whole batch is transformed by a handful of
tensor operations: one ``affine_grid`` + ``grid_sample`` for crop and flip,
two broadcast operations for brightness and contrast, and one grouped
convolution for the optional blur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of :func:`augment` (see :class:`~fedmerge.tasks.TaskConfig`)."""

    crop_scale: float = 0.5
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    blur: float = 0.0


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment(x: torch.Tensor, config: AugmentConfig, *, generator: torch.Generator) -> torch.Tensor:
    r"""One random view of every image of ``x``.

    Per image: a random resized crop (area fraction in ``[crop_scale, 1]``,
    aspect ratio in ``[3/4, 4/3]``, resized back bilinearly), a horizontal
    flip with probability 1/2, a contrast factor
    :math:`c \in [1 - \text{contrast}, 1 + \text{contrast}]` around the image
    mean and an additive brightness shift in ``[-brightness, brightness]``,
    then, with probability ``blur``, a 3x3 Gaussian blur of standard deviation
    in [0.1, 2].

    Parameters
    ----------
    x : Tensor, shape (batch, channels, height, width)
        Images (normalised or not; brightness is in the same units).
    config : AugmentConfig
        Strengths.
    generator : torch.Generator
        CPU generator of every random draw (same state, same views).

    Returns
    -------
    Tensor, shape (batch, channels, height, width)
        The views, on the device of ``x``.

    Notes
    -----
    SimCLR's colour distortion (hue, saturation) has no meaning for grayscale
    images; brightness and contrast are what is left of it.
    """
    if x.dim() != 4:
        raise ValueError(
            f"x: got shape {tuple(x.shape)}; allowed: (batch, channels, height, width)"
        )
    n = x.shape[0]
    area = _uniform(n, config.crop_scale, 1.0, generator)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), generator)
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (2 * torch.rand(n, generator=generator) - 1) * (1 - sx)
    ty = (2 * torch.rand(n, generator=generator) - 1) * (1 - sy)
    flip = (
        torch.rand(n, generator=generator) < 0.5
        if config.flip
        else torch.zeros(n, dtype=torch.bool)
    )
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    c = _uniform(n, 1 - config.contrast, 1 + config.contrast, generator)
    b = _uniform(n, -config.brightness, config.brightness, generator)
    c = c.to(x.device, x.dtype).view(n, 1, 1, 1)
    b = b.to(x.device, x.dtype).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * c + mean + b
    if config.blur > 0:
        out = _blur(out, config.blur, generator)
    return out


def _blur(x: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """3x3 Gaussian blur of a random subset of the images (one grouped convolution)."""
    n, ch, h, w = x.shape
    apply = torch.rand(n, generator=generator) < probability
    sigma = _uniform(n, 0.1, 2.0, generator)
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    g = torch.exp(-(offsets.view(1, 3) ** 2) / (2 * sigma.view(n, 1) ** 2))
    g = g / g.sum(dim=1, keepdim=True)
    identity = torch.tensor([0.0, 1.0, 0.0]).expand(n, 3)
    g = torch.where(apply.view(n, 1), g, identity)
    kernel = (g.view(n, 3, 1) * g.view(n, 1, 3)).to(x.device, x.dtype)
    kernel = kernel.repeat_interleave(ch, dim=0).view(n * ch, 1, 3, 3)
    out = F.conv2d(
        F.pad(x.reshape(1, n * ch, h, w), (1, 1, 1, 1), mode="replicate"), kernel, groups=n * ch
    )
    return out.view(n, ch, h, w)
