"""Weighted mean of state dicts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedmerge.align.spec import check_finite, check_same_shapes

__all__ = ["ACCUMULATE_MODES", "INTEGER_RULES", "normalise_weights", "weighted_average"]

#: How :func:`weighted_average` combines integer tensors.
INTEGER_RULES: tuple[str, ...] = ("mean", "max", "first")

#: Arithmetics of :func:`weighted_average` for floating tensors (see its Notes).
ACCUMULATE_MODES: tuple[str, ...] = ("float32", "float64", "native")


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
    accumulate: str = "float32",
    normalise: bool = True,
    check: bool = True,
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
    accumulate : str (default: "float32")
        Arithmetic of floating tensors, one of :data:`ACCUMULATE_MODES`:
        ``"float32"``, ``"float64"`` or ``"native"`` (see Notes).
    normalise : bool (default: True)
        Divide the weights by their sum. With ``False`` the weights are
        required and used as given (an affine combination: they may be
        negative and need not sum to 1), for callers that normalised them.
    check : bool (default: True)
        Check that the state dicts have equal keys and shapes, that they hold
        only finite values, and that unnormalised weights are finite. With
        ``False`` nothing is checked (for callers that checked already).

    Returns
    -------
    dict of str to Tensor
        The mean, each tensor in the dtype and on the device of the first
        state's tensor, with the first state's keys in its order.

    Raises
    ------
    ShapeMismatchError
        If the state dicts differ in keys or shapes (the message names the
        parameter and both shapes).
    NonFiniteWeightsError
        If a state holds NaN or infinite values.
    ValueError
        If the weights or an option are invalid.

    Notes
    -----
    The three arithmetics round differently, so each caller keeps the one its
    results were recorded with (a switch would change results in the last
    bits and so the runs' outputs):

    - ``"float32"``: one accumulator in at least float32
      (``promote_types(dtype, float32)``), starting at zero and updated in
      place with ``acc.add_(W_k, alpha=w_k)``, which may use a fused
      multiply-add; zero weights are skipped. FedAvg, MergeMany and the
      aligned strategies.
    - ``"float64"``: every term :math:`w_k W_k` is formed in float64 and the
      terms are summed left to right (no fused multiply-add), then rounded
      once to the tensor's dtype. With ``weights=None`` the mean is
      :math:`(\sum_k W_k) / K` (``torch.mean``), which does not round
      :math:`1/K`. A peer's merge step and the mean of the peers.
    - ``"native"``: as ``"float64"`` with ``weights`` given, but in the
      tensor's own dtype. OTFusion's :func:`~fedmerge.align.ot_fuse`.

    Complex tensors count as floating.
    """
    if integers not in INTEGER_RULES:
        raise ValueError(f"integers: got {integers!r}; allowed: {', '.join(INTEGER_RULES)}")
    if accumulate not in ACCUMULATE_MODES:
        raise ValueError(f"accumulate: got {accumulate!r}; allowed: {', '.join(ACCUMULATE_MODES)}")
    if normalise:
        w = normalise_weights(weights, len(states))
    else:
        w = _given_weights(weights, len(states), check=check)
    first = states[0]
    if check:
        for k, state in enumerate(states):
            if k:
                check_same_shapes(first, state)
            check_finite(state, name=f"states[{k}]")
    out: dict[str, torch.Tensor] = {}
    for key, ref in first.items():
        values = [s[key].to(ref.device) for s in states]
        if ref.is_floating_point() or ref.is_complex():
            if accumulate == "float32":
                out[key] = _fused_sum(values, w, ref)
            elif accumulate == "float64" and weights is None:
                out[key] = torch.stack([v.double() for v in values]).mean(0).to(ref.dtype)
            else:
                dtype = torch.float64 if accumulate == "float64" else ref.dtype
                out[key] = _sum_of_terms(values, w, dtype).to(ref.dtype)
        elif ref.dtype == torch.bool or integers == "first":
            out[key] = ref.clone()
        elif integers == "max":
            out[key] = torch.stack(values).amax(0)
        else:
            acc64 = sum(wk * value.double() for wk, value in zip(w, values, strict=True))
            out[key] = torch.round(torch.as_tensor(acc64)).to(ref.dtype)
    return out


def _given_weights(weights: Sequence[float] | None, count: int, *, check: bool) -> list[float]:
    """The weights as given (``normalise=False``): their count, and finiteness if ``check``."""
    if weights is None:
        raise ValueError("weights: got None; allowed with normalise=False: one weight per state")
    values = [float(x) for x in weights]
    if count < 1:
        raise ValueError("states: got an empty sequence; allowed: at least one state dict")
    if len(values) != count:
        raise ValueError(f"weights: got {len(values)} weights for {count} state dicts")
    bad = [x for x in values if not math.isfinite(x)]
    if check and bad:
        raise ValueError(f"weights: got {bad[0]!r}; allowed: finite numbers")
    return values


def _fused_sum(values: list[torch.Tensor], w: list[float], ref: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k values_k`` in at least float32, in place, skipping zero weights."""
    dtype = torch.promote_types(ref.dtype, torch.float32)
    acc = torch.zeros(ref.shape, dtype=dtype, device=ref.device)
    for wk, value in zip(w, values, strict=True):
        if wk:
            acc.add_(value.to(dtype), alpha=wk)
    return acc.to(ref.dtype)


def _sum_of_terms(values: list[torch.Tensor], w: list[float], dtype: torch.dtype) -> torch.Tensor:
    """``w_0 v_0 + w_1 v_1 + ...`` in ``dtype``, left to right, one product per term."""
    acc = values[0].to(dtype) * w[0]
    for wk, value in zip(w[1:], values[1:], strict=True):
        acc = acc + value.to(dtype) * wk
    return acc
