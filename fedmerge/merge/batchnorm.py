"""Re-estimate BatchNorm running statistics after merging."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fedmerge.align.activations import first_tensor

__all__ = ["has_batchnorm", "reset_bn_state", "reset_bn_stats"]

logger = logging.getLogger(__name__)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer that tracks running statistics."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for m in model.modules()
    )


def reset_bn_stats(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    r"""Recompute the running mean and variance of every BatchNorm layer.

    A merged model's running statistics are averages of its parents'
    statistics, which do not describe the merged model's activations (REPAIR,
    Jordan et al., ICLR 2023, and Git Re-Basin's "reset BN"). Each layer's
    statistics are reset and re-estimated as the cumulative average over the
    given batches (``momentum=None``),

    .. math::

        \hat\mu = \frac{1}{B} \sum_{b=1}^{B} \mu_b, \qquad
        \hat\sigma^2 = \frac{1}{B} \sum_{b=1}^{B} \sigma^2_b,

    in training mode and without gradients. The weights are not changed.

    Parameters
    ----------
    model : nn.Module
        The model; modified in place (only BatchNorm buffers change; the
        layers' momentum and the model's training flags are restored).
    batches : iterable
        Batches of inputs, each a Tensor ``(batch, *input_shape)`` or a tuple
        whose first item is one; iterated once and moved to the model's device.

    Returns
    -------
    nn.Module
        ``model`` itself. A model without BatchNorm is returned unchanged.

    Raises
    ------
    ValueError
        If the model has BatchNorm and ``batches`` is empty.
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return model
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("batches: got no batch; allowed: a non-empty iterable of input tensors")
    momenta = {bn: bn.momentum for bn in bns}
    modes = {m: m.training for m in model.modules()}
    device = next(iter(model.parameters())).device
    count = 0
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        with torch.no_grad():
            for batch in itertools.chain([first], iterator):
                model(first_tensor(batch).to(device))
                count += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for module, flag in modes.items():
            module.train(flag)
    logger.debug("re-estimated %d BatchNorm layers on %d batches", len(bns), count)
    return model


def reset_bn_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], batches: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """Return ``state`` with its BatchNorm statistics re-estimated on ``batches``.

    A copy of ``model`` is loaded with ``state`` and passed to
    :func:`reset_bn_stats`; its state dict is returned.

    Parameters
    ----------
    model : nn.Module
        A model of the architecture of ``state``; not modified (the work is
        done on a deep copy).
    state : mapping of str to Tensor
        The state dict, e.g. a merged model's.
    batches : iterable
        Batches of inputs, as in :func:`reset_bn_stats`; iterated at most once.

    Returns
    -------
    dict of str to Tensor
        A new state dict of detached tensors in which only BatchNorm running
        statistics (and ``num_batches_tracked``) differ from ``state``. When
        ``model`` has no BatchNorm layer that tracks statistics, or
        ``batches`` is empty, the tensors of ``state`` unchanged (a new dict
        holding the same tensors).
    """
    if not has_batchnorm(model):
        return dict(state)
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        return dict(state)
    scratch = copy.deepcopy(model)
    scratch.load_state_dict(state)
    reset_bn_stats(scratch, itertools.chain([first], iterator))
    return {k: v.detach().clone() for k, v in scratch.state_dict().items()}
