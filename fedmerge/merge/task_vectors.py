r"""Merging task vectors: task arithmetic and TIES-Merging.

A client's update in federated learning is a task vector
:math:`\tau_i = \theta_i - \theta_0` relative to the global model
:math:`\theta_0`, so both operators merge client models on the server (and a
peer's neighbours relative to the peer's own model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedmerge.align.spec import check_finite, check_same_shapes
from fedmerge.merge.average import normalise_weights, weighted_average

__all__ = [
    "BN_STAT_RULES",
    "TIES_TRIM_SCOPES",
    "is_bn_stat",
    "task_arithmetic",
    "ties_merge",
    "trim_mask",
]

#: How BatchNorm running statistics are merged (see :func:`task_arithmetic`).
BN_STAT_RULES: tuple[str, ...] = ("average", "merge")

#: Over what :func:`ties_merge` keeps the top-k entries of a task vector.
TIES_TRIM_SCOPES: tuple[str, ...] = ("model", "tensor")

_BN_STATS = ("running_mean", "running_var")

StateDict = dict[str, torch.Tensor]


def is_bn_stat(name: str) -> bool:
    """Whether ``name`` is a BatchNorm running statistic (``running_mean``/``running_var``)."""
    return name.rsplit(".", 1)[-1] in _BN_STATS


def _check(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    bn_stats: str,
) -> None:
    if bn_stats not in BN_STAT_RULES:
        raise ValueError(f"bn_stats: got {bn_stats!r}; allowed: {', '.join(BN_STAT_RULES)}")
    if not states:
        raise ValueError("states: got an empty sequence; allowed: at least one state dict")
    check_finite(base, name="base")
    for k, state in enumerate(states):
        check_same_shapes(base, state)
        check_finite(state, name=f"states[{k}]")


def _merged_keys(base: Mapping[str, torch.Tensor], bn_stats: str) -> list[str]:
    """Floating tensors merged as task vectors (BN statistics only with ``bn_stats="merge"``)."""
    return [
        name
        for name, t in base.items()
        if t.is_floating_point() and (bn_stats == "merge" or not is_bn_stat(name))
    ]


def _finish(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    w: list[float],
    merged: dict[str, torch.Tensor],
    integers: str,
) -> StateDict:
    """Add the averaged rest (BN statistics, integers) to ``merged``, in ``base``'s key order."""
    rest = [name for name in base if name not in merged]
    if rest:
        averaged = weighted_average(
            [{n: s[n] for n in rest} for s in states], w, integers=integers, check=False
        )
        merged.update(averaged)
    return {name: merged[name] for name in base}


def task_arithmetic(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    scale: float = 1.0,
    normalise: bool = True,
    bn_stats: str = "average",
    integers: str = "mean",
) -> StateDict:
    r"""Add the weighted sum of the task vectors to the base model.

    .. math::

        \theta = \theta_0 + \lambda \sum_{i=1}^K w_i\,(\theta_i - \theta_0)

    Parameters
    ----------
    base : mapping of str to Tensor
        The base model :math:`\theta_0` (the global model of the round).
    states : sequence of mapping of str to Tensor
        The ``K`` fine-tuned models :math:`\theta_i` (same keys and shapes).
    weights : sequence of float, optional
        :math:`w_i`, ``K`` non-negative numbers; all 1 when ``None``.
    scale : float (default: 1.0)
        :math:`\lambda`, the scaling coefficient; finite.
    normalise : bool (default: True)
        Divide the weights by their sum (so that ``scale=1`` is the weighted
        mean of the models, i.e. FedAvg). The paper sums the task vectors:
        ``normalise=False`` with ``weights=None``.
    bn_stats : {"average", "merge"} (default: "average")
        BatchNorm running statistics: the weighted mean of the models' (with
        the normalised weights, as :func:`~fedmerge.merge.weighted_average`),
        or merged like every other floating tensor.
    integers : str (default: "mean")
        Integer buffers (``num_batches_tracked``), as in
        :func:`~fedmerge.merge.weighted_average`.

    Returns
    -------
    dict of str to Tensor
        The merged model, each tensor in the base tensor's dtype and device.

    Raises
    ------
    ValueError
        If the weights, ``scale`` or an option are invalid.
    ShapeMismatchError, NonFiniteWeightsError
        If the state dicts differ in keys or shapes, or hold NaN or inf.

    Notes
    -----
    Ilharco et al. sum the task vectors and tune :math:`\lambda` on held-out
    data; with ``normalise=True`` (the default) the paper's :math:`\lambda`
    for ``K`` equally weighted models is ``scale / K``.

    References
    ----------
    .. [1] G. Ilharco, et al., "Editing Models with Task Arithmetic", ICLR
       2023. https://arxiv.org/abs/2212.04089
    """
    _check(base, states, bn_stats)
    if not math.isfinite(scale):
        raise ValueError(f"scale: got {scale!r}; allowed: a finite number")
    w = _weights(weights, len(states), normalise)
    merged: dict[str, torch.Tensor] = {}
    for name in _merged_keys(base, bn_stats):
        ref = base[name]
        dtype = torch.promote_types(ref.dtype, torch.float32)
        b = ref.to(dtype)
        acc = torch.zeros_like(b)
        for wk, state in zip(w, states, strict=True):
            acc.add_(state[name].to(ref.device, dtype) - b, alpha=wk)
        merged[name] = (b + scale * acc).to(ref.dtype)
    return _finish(base, states, normalise_weights(w, len(states)), merged, integers)


def _weights(weights: Sequence[float] | None, count: int, normalise: bool) -> list[float]:
    if normalise:
        return normalise_weights(weights, count)
    if weights is None:
        return [1.0] * count
    values = [float(x) for x in weights]
    if len(values) != count:
        raise ValueError(f"weights: got {len(values)} weights for {count} state dicts")
    bad = [x for x in values if not math.isfinite(x) or x < 0]
    if bad:
        raise ValueError(f"weights: got {bad[0]!r}; allowed: finite numbers >= 0")
    if not any(values):
        raise ValueError(f"weights: got {values}, which sum to 0; allowed: a positive sum")
    return values


def trim_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Mask of the top-``density`` entries of ``delta`` by magnitude (ties at the threshold kept).

    ``ceil(density * numel)`` entries are kept, at least one.
    """
    flat = delta.reshape(-1).abs()
    keep = max(1, math.ceil(density * flat.numel()))
    if keep >= flat.numel():
        return torch.ones_like(delta, dtype=torch.bool)
    threshold = torch.topk(flat, keep, sorted=True).values[-1]
    return delta.abs() >= threshold


def ties_merge(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    density: float = 0.2,
    scale: float = 1.0,
    trim_scope: str = "model",
    bn_stats: str = "average",
    integers: str = "mean",
) -> StateDict:
    r"""TIES-Merging: trim, elect sign, disjoint mean of the task vectors.

    With task vectors :math:`\tau_i = \theta_i - \theta_0`:

    1. Trim: :math:`\hat\tau_i` keeps the ``density`` share of the entries of
       :math:`\tau_i` with the largest magnitude and zeroes the rest.
    2. Elect: :math:`\gamma = \operatorname{sgn}\left(\sum_i w_i \hat\tau_i\right)`
       per parameter (the sign of the larger total mass); where the sum is 0,
       the sign of the sum of all elected signs (the majority).
    3. Disjoint mean over the entries that agree with the elected sign,
       :math:`A^p = \{i : \operatorname{sgn}(\hat\tau_i^p) = \gamma^p\}`:

    .. math::

        \tau_m^p = \frac{\sum_{i \in A^p} w_i \hat\tau_i^p}{\sum_{i \in A^p} w_i},
        \qquad \theta = \theta_0 + \lambda\, \tau_m

    (:math:`\tau_m^p = 0` where :math:`A^p` is empty).

    Parameters
    ----------
    base : mapping of str to Tensor
        The base model :math:`\theta_0` (the global model of the round).
    states : sequence of mapping of str to Tensor
        The ``K`` fine-tuned models :math:`\theta_i` (same keys and shapes).
    weights : sequence of float, optional
        :math:`w_i`, ``K`` non-negative numbers (e.g. sample counts); equal
        when ``None`` (the paper).
    density : float (default: 0.2)
        Share of each task vector's entries kept by the trim (the paper's
        :math:`k` = 20 %); in (0, 1].
    scale : float (default: 1.0)
        :math:`\lambda`; finite.
    trim_scope : {"model", "tensor"} (default: "model")
        Rank magnitudes over the whole flattened task vector (the reference
        code) or within each tensor (every tensor keeps its ``density`` share).
    bn_stats : {"average", "merge"} (default: "average")
        BatchNorm running statistics: the weighted mean of the models', or
        trimmed and merged like the parameters.
    integers : str (default: "mean")
        Integer buffers, as in :func:`~fedmerge.merge.weighted_average`.

    Returns
    -------
    dict of str to Tensor
        The merged model, each tensor in the base tensor's dtype and device.

    Raises
    ------
    ValueError
        If ``density``, ``scale``, the weights or an option are invalid.
    ShapeMismatchError, NonFiniteWeightsError
        If the state dicts differ in keys or shapes, or hold NaN or inf.

    Notes
    -----
    Departures from the reference code (prateeky2806/ties-merging):

    - The trim keeps ``ceil(density * d)`` entries of a ``d``-entry vector
      (plus ties at the threshold); the reference thresholds at the
      ``(d - floor(density * d))``-th smallest magnitude, which keeps one
      entry more.
    - Weights: the paper has none. Given weights scale the trimmed vectors in
      the election and make the disjoint mean a weighted mean; equal weights
      give the paper's operator.
    - ``trim_scope="tensor"`` and ``bn_stats="average"`` have no counterpart
      in the reference code, which flattens every parameter of the model into
      one vector; ``trim_scope="model"`` does the same. BatchNorm statistics
      are not parameters of the models the paper merges; averaging them is
      the default here.

    References
    ----------
    .. [1] P. Yadav, et al., "TIES-Merging: Resolving Interference When
       Merging Models", NeurIPS 2023. https://arxiv.org/abs/2306.01708
    """
    _check(base, states, bn_stats)
    if trim_scope not in TIES_TRIM_SCOPES:
        raise ValueError(f"trim_scope: got {trim_scope!r}; allowed: {', '.join(TIES_TRIM_SCOPES)}")
    if not (isinstance(density, int | float) and 0 < density <= 1):
        raise ValueError(f"density: got {density!r}; allowed: a number in (0, 1]")
    if not math.isfinite(scale):
        raise ValueError(f"scale: got {scale!r}; allowed: a finite number")
    w = normalise_weights(weights, len(states))
    names = _merged_keys(base, bn_stats)
    if not names:
        return _finish(base, states, w, {}, integers)
    ref0 = base[names[0]]
    dtype = torch.promote_types(ref0.dtype, torch.float32)
    sizes = [base[n].numel() for n in names]
    b = torch.cat([base[n].reshape(-1).to(ref0.device, dtype) for n in names])
    deltas = torch.stack(
        [torch.cat([s[n].reshape(-1).to(ref0.device, dtype) for n in names]) - b for s in states]
    )  # (K, P)
    trimmed = torch.stack([_trim(row, sizes, density, trim_scope) for row in deltas])
    wt = torch.tensor(w, dtype=dtype, device=b.device)[:, None]
    sign = torch.sign((wt * trimmed).sum(0))
    majority = torch.sign(sign.sum())
    sign = torch.where(sign == 0, majority, sign)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    mass = (wt * agree).sum(0)
    total = (wt * trimmed * agree).sum(0)
    merged_delta = torch.where(mass > 0, total / mass.clamp_min(1e-30), torch.zeros_like(total))
    flat = b + scale * merged_delta
    merged: dict[str, torch.Tensor] = {}
    for name, chunk in zip(names, torch.split(flat, sizes), strict=True):
        ref = base[name]
        merged[name] = chunk.reshape(ref.shape).to(ref.dtype)
    return _finish(base, states, w, merged, integers)


def _trim(row: torch.Tensor, sizes: list[int], density: float, scope: str) -> torch.Tensor:
    """``row`` with all but its top-``density`` entries zeroed (over all of it, or per tensor)."""
    if scope == "model":
        return row * trim_mask(row, density)
    return torch.cat([part * trim_mask(part, density) for part in torch.split(row, sizes)])
