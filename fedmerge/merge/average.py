"""Weighted mean of state dicts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedmerge.align.spec import check_finite, check_same_shapes

__all__ = ["INTEGER_RULES", "normalise_weights", "weighted_average"]

#: How :func:`weighted_average` combines integer tensors.
INTEGER_RULES: tuple[str, ...] = ("mean", "max", "first")


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Return ``weights`` divided by their sum (equal weights when ``None``).

    Raises
    ------
    ValueError
        If the number of weights is not ``count``, a weight is negative or not
        finite, or all weights are zero.
    """
    if count < 1:
        raise ValueError("states: got an empty sequence; allowed: at least one state dict")
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"weights: got {len(values)} weights for {count} state dicts")
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"weights: got {bad[0]!r}; allowed: finite numbers >= 0")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"weights: got {values}, which sum to 0; allowed: a positive sum")
    return [w / total for w in values]


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    integers: str = "mean",
) -> dict[str, torch.Tensor]:
    r"""Weighted mean of state dicts with equal keys and shapes.

    .. math::

        \bar W = \sum_k \frac{w_k}{\sum_j w_j} W_k

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        The state dicts (``K`` of them).
    weights : sequence of float, optional
        Non-negative weights, ``K`` of them (sample counts work: they are
        normalised); equal weights when ``None``.
    integers : str (default: "mean")
        How integer tensors (BatchNorm's ``num_batches_tracked``) are combined:
        ``"mean"`` (weighted mean rounded to the nearest integer), ``"max"`` or
        ``"first"`` (the first state's value). Boolean tensors are taken from
        the first state.

    Returns
    -------
    dict of str to Tensor
        The mean, each tensor in the dtype and on the device of the first
        state's tensor. Floating tensors are accumulated in at least float32.

    Raises
    ------
    ShapeMismatchError
        If the state dicts differ in keys or shapes (the message names the
        parameter and both shapes).
    NonFiniteWeightsError
        If a state holds NaN or infinite values.
    ValueError
        If the weights or ``integers`` are invalid.
    """
    if integers not in INTEGER_RULES:
        raise ValueError(f"integers: got {integers!r}; allowed: {', '.join(INTEGER_RULES)}")
    w = normalise_weights(weights, len(states))
    first = states[0]
    for k, state in enumerate(states):
        if k:
            check_same_shapes(first, state)
        check_finite(state, name=f"states[{k}]")
    out: dict[str, torch.Tensor] = {}
    for key, ref in first.items():
        values = [s[key].to(ref.device) for s in states]
        if ref.is_floating_point() or ref.is_complex():
            dtype = torch.promote_types(ref.dtype, torch.float32)
            acc = torch.zeros(ref.shape, dtype=dtype, device=ref.device)
            for wk, value in zip(w, values, strict=True):
                if wk:
                    acc.add_(value.to(dtype), alpha=wk)
            out[key] = acc.to(ref.dtype)
        elif ref.dtype == torch.bool or integers == "first":
            out[key] = ref.clone()
        elif integers == "max":
            out[key] = torch.stack(values).amax(0)
        else:
            acc64 = sum(wk * value.double() for wk, value in zip(w, values, strict=True))
            out[key] = torch.round(torch.as_tensor(acc64)).to(ref.dtype)
    return out
