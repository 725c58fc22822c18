"""Pieces the self-supervised tasks share: augmentation options, client subsets, FedProx."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from fedmerge.optim import LocalOptimizer
from fedmerge.tasks.augment import AugmentConfig, augment
from fedmerge.tasks.config import TaskConfig
from fedmerge.training import TrainConfig, TrainResult, batch_starts


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


def two_view_epochs(
    x: torch.Tensor,
    train: TrainConfig,
    config: TaskConfig,
    optimizer: LocalOptimizer,
    loss_of: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    generator: torch.Generator,
    epochs: int,
    anchors: list[tuple[nn.Parameter, torch.Tensor]],
    prox_mu: float,
    after_step: Callable[[], None] | None = None,
) -> TrainResult:
    """The self-supervised tasks' local loop: shuffled batches, two augmented views each.

    Every batch of ``b >= 2`` samples becomes ``views`` (the two views
    stacked, shape ``(2b, ...)``); ``loss_of(views, b)`` is the task's loss,
    to which FedProx's term is added when ``anchors`` is not empty;
    ``after_step`` runs after each optimiser step (BYOL's EMA). The reported
    loss is the last epoch's sample-weighted mean of the task loss.
    """
    n = len(x)
    if n == 0:
        return TrainResult(loss=float("nan"), num_examples=0, num_steps=0)
    device = optimizer.params[0].device
    aug = augment_config(config)
    steps, epoch_loss = 0, float("nan")
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total, seen = torch.zeros((), device=device), 0
        for start in batch_starts(n, train):
            idx = order[start : start + train.batch_size]
            b = len(idx)
            if b < 2:
                continue  # BatchNorm cannot train on one sample
            xb = x[idx].to(device, non_blocking=True)
            views = torch.cat(
                [augment(xb, aug, generator=generator), augment(xb, aug, generator=generator)]
            )
            loss = loss_of(views, b)
            total += loss.detach() * b
            seen += b
            if anchors:
                loss = loss + 0.5 * prox_mu * proximal_term(anchors)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            if after_step is not None:
                after_step()
            steps += 1
        epoch_loss = float(total) / seen if seen else float("nan")
    return TrainResult(loss=epoch_loss, num_examples=n, num_steps=steps)
