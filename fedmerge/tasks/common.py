"""Pieces the self-supervised tasks share: augmentation options, client subsets, FedProx."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedmerge.tasks.augment import AugmentConfig
from fedmerge.tasks.config import TaskConfig


def augment_config(config: TaskConfig) -> AugmentConfig:
    """The augmentation strengths of a task configuration."""
    return AugmentConfig(
        crop_scale=config.crop_scale,
        flip=config.flip,
        brightness=config.brightness,
        contrast=config.contrast,
        blur=config.blur,
    )


def fixed_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``min(k, n)`` of ``n`` samples drawn with ``seed`` (all for ``k = 0``)."""
    if k == 0 or k >= n:
        return torch.arange(n)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False)))


def proximal_anchors(
    net: nn.Module, prox_mu: float, global_state: Mapping[str, torch.Tensor] | None
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, global value)`` pairs of FedProx's term (empty for ``prox_mu = 0``).

    Raises
    ------
    ValueError
        If ``prox_mu`` is negative or not finite, or positive without ``global_state``.
    """
    if not (math.isfinite(prox_mu) and prox_mu >= 0):
        raise ValueError(f"prox_mu: got {prox_mu!r}; allowed: a finite number >= 0")
    if prox_mu == 0:
        return []
    if global_state is None:
        raise ValueError(
            f"global_state: got None; required when prox_mu > 0 (prox_mu is {prox_mu!r})"
        )
    device = next(net.parameters()).device
    return [(p, global_state[name].to(device)) for name, p in net.named_parameters()]


def proximal_term(anchors: list[tuple[nn.Parameter, torch.Tensor]]) -> torch.Tensor:
    r""":math:`\lVert w - w_g \rVert_2^2` over the anchored parameters."""
    total = anchors[0][0].new_zeros(())
    for p, g in anchors:
        total = total + ((p - g) ** 2).sum()
    return total
