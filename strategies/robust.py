"""The robust step of server-side strategies: clipping and a robust aggregator over client models.

Every server-side strategy ends with a mean over client models (FedAvg's
sample-weighted mean; for ``aligned`` and ``ot`` the mean of the clients
after they were moved onto the global model's units; for L-DAWA the mean of
the cosine-weighted layers). :func:`robust_combine` replaces that mean by the
aggregator of :class:`~fedmerge.merge.RobustConfig`, on the same models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedmerge.merge import (
    RobustConfig,
    clip_updates,
    coordinate_median,
    krum_select,
    median_of,
    trimmed_mean,
    update_norms,
)

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
#: ``mean(states, counts)``: the strategy's own mean of client models.
MeanFn = Callable[[list[StateDict], list[int]], StateDict]
#: ``terms(states, counts)``: the per-client terms whose plain mean is the strategy's merge.
TermsFn = Callable[[list[StateDict], list[int]], list[StateDict]]


def robust_combine(
    config: RobustConfig,
    global_state: StateDict,
    states: Sequence[StateDict],
    counts: Sequence[int],
    partitions: Sequence[int],
    *,
    mean: MeanFn,
    terms: TermsFn | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """The strategy's mean of ``states``, made robust as ``config`` says.

    1. Clipping (``clip_norm`` or ``clip_to_median``): every update
       ``W_k - W_g`` is clipped to the norm (:func:`fedmerge.merge.clip_updates`).
    2. ``robust = "none"``: ``mean(states, counts)``.
       ``"krum"`` / ``"multi-krum"``: ``mean`` of the 1 / ``krum_m`` (0:
       ``K - krum_f``) models that :func:`fedmerge.merge.krum_select` keeps.
       ``"median"`` / ``"trimmed-mean"``: the coordinate-wise median or
       trimmed mean of ``terms(states, counts)`` (the models themselves when
       ``terms`` is ``None``).

    Parameters
    ----------
    config : RobustConfig
        The robust options.
    global_state : dict of str to Tensor
        The global model the clients started from.
    states : sequence of dict of str to Tensor
        The client models, as the strategy would average them.
    counts : sequence of int
        Their sample counts.
    partitions : sequence of int
        Their partition ids (for the per-round extras).
    mean : callable
        The strategy's own mean.
    terms : callable, optional
        For strategies whose merge is a plain mean of per-client terms
        (L-DAWA: cosine-weighted layers); the median and trimmed mean apply
        to those terms.

    Returns
    -------
    tuple of (dict of str to Tensor, dict)
        The new global state and per-round extras: ``clipped`` (partitions
        whose update was clipped) and ``krum_kept`` (partitions Krum kept).
    """
    states, counts = list(states), list(counts)
    extras: dict[str, Any] = {}
    if config.clips:
        norms = update_norms(global_state, states)
        limit = median_of(norms) if config.clip_to_median else config.clip_norm
        states = clip_updates(global_state, states, limit)
        extras["clipped"] = [p for p, n in zip(partitions, norms, strict=True) if n > limit]
    if config.robust == "none":
        return mean(states, counts), extras
    if config.robust in ("krum", "multi-krum"):
        f = config.krum_f
        if len(states) <= 2 * f + 2:
            logger.warning(
                "krum: %d client models for krum_f = %d; Krum needs more than 2 f + 2 = %d",
                len(states), f, 2 * f + 2,
            )  # fmt: skip
        m = 1 if config.robust == "krum" else config.krum_m or max(1, len(states) - f)
        kept = sorted(krum_select(states, f, m))
        extras["krum_kept"] = [partitions[i] for i in kept]
        return mean([states[i] for i in kept], [counts[i] for i in kept]), extras
    values = terms(states, counts) if terms is not None else states
    if config.robust == "median":
        return coordinate_median(values), extras
    return trimmed_mean(values, config.trim_fraction), extras
