"""Align many models to one reference and average them (Git Re-Basin's MergeMany)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmerge.align.permute import apply_permutation
from fedmerge.align.spec import PermutationSpec, check_same_shapes
from fedmerge.align.weight_matching import weight_matching
from fedmerge.merge.average import normalise_weights, weighted_average
from fedmerge.merge.batchnorm import has_batchnorm, reset_bn_state

__all__ = ["MERGE_REFERENCES", "MergeManyInfo", "merge_many"]

logger = logging.getLogger(__name__)

#: What :func:`merge_many` aligns the models to.
MERGE_REFERENCES: tuple[str, ...] = ("mean", "anchor")


@dataclass(frozen=True)
class MergeManyInfo:
    """What :func:`merge_many` did.

    Attributes
    ----------
    perms : list of dict of str to LongTensor
        The permutation applied to each model (the identity for the anchor).
    rounds : int
        Passes over the models (1 for ``reference="anchor"``).
    converged : bool
        Whether the last pass changed no permutation (always true for the anchor).
    bn_reset : bool
        Whether BatchNorm statistics were re-estimated.
    """

    perms: list[dict[str, torch.Tensor]]
    rounds: int
    converged: bool
    bn_reset: bool


def merge_many(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    reference: str = "mean",
    anchor: int = 0,
    max_rounds: int = 20,
    max_iter: int = 100,
    rng: np.random.Generator | None = None,
    model: nn.Module | None = None,
    batches: Iterable[Any] | None = None,
    reset_bn: bool = True,
) -> tuple[dict[str, torch.Tensor], MergeManyInfo]:
    r"""Permute N models into one basin and take their weighted mean.

    With ``reference="anchor"`` every model is aligned to model ``anchor`` by
    :func:`weight_matching`. With ``reference="mean"`` (Git Re-Basin's
    MergeMany [1]_) the models are visited in turn and model :math:`k` is
    aligned to the weighted mean of the others as currently aligned,

    .. math::

        \pi_k \leftarrow \operatorname{WM}\Big(\sum_{j \ne k}
        \tfrac{w_j}{\sum_{i \ne k} w_i} \pi_j(\theta_j),\ \theta_k\Big),

    until a pass changes no permutation or ``max_rounds`` passes were made.
    The result is :math:`\sum_k w_k \pi_k(\theta_k)` (:func:`weighted_average`).

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the architecture.
    states : sequence of mapping of str to Tensor
        The models' state dicts (same keys and shapes).
    weights : sequence of float, optional
        Merge weights (normalised; equal when ``None``).
    reference : str (default: "mean")
        ``"mean"`` or ``"anchor"``.
    anchor : int (default: 0)
        Index of the reference model for ``reference="anchor"``; with
        ``"mean"``, the model whose unit order the result keeps.
    max_rounds : int (default: 20)
        Most passes over the models for ``reference="mean"``.
    max_iter : int (default: 100)
        Most sweeps of each weight matching.
    rng : numpy.random.Generator, optional
        Orders the models in each pass and the permutations in each weight
        matching; ``None`` uses index order and forward order.
    model : nn.Module, optional
        A model of the architecture, needed to re-estimate BatchNorm
        statistics; it is copied, not modified.
    batches : iterable, optional
        Input batches for the BatchNorm re-estimation.
    reset_bn : bool (default: True)
        Re-estimate BatchNorm statistics of the merged model where it has
        BatchNorm (:func:`reset_bn_stats`); then ``model`` and ``batches`` are
        required. Ignored for models without BatchNorm.

    Returns
    -------
    merged : dict of str to Tensor
        The merged state dict, in model ``anchor``'s unit order.
    info : MergeManyInfo
        Permutations, passes, convergence, and whether BN was reset.

    Raises
    ------
    ValueError
        If an option is invalid, or BatchNorm must be reset without ``model``
        or ``batches``.
    ShapeMismatchError, SpecCoverageError, NonFiniteWeightsError
        If the state dicts do not fit each other or the spec.

    Notes
    -----
    MergeMany in [1]_ uses equal weights; here the mean of the others uses
    the merge weights renormalised (equal weights reproduce the paper). The
    paper leaves the final unit order free; here the result is expressed in
    model ``anchor``'s order (every permutation is composed with the inverse
    of the anchor's), which does not change the function.

    References
    ----------
    .. [1] S. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: Merging
       Models modulo Permutation Symmetries", ICLR 2023.
       https://arxiv.org/abs/2209.04836
    """
    if reference not in MERGE_REFERENCES:
        raise ValueError(f"reference: got {reference!r}; allowed: {', '.join(MERGE_REFERENCES)}")
    count = len(states)
    w = normalise_weights(weights, count)
    if not 0 <= anchor < count:
        raise ValueError(f"anchor: got {anchor!r}; allowed: an index in [0, {count - 1}]")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds: got {max_rounds!r}; allowed: an integer >= 1")
    for state in states[1:]:
        check_same_shapes(states[0], state)
    needs_bn = reset_bn and (
        has_batchnorm(model) if model is not None else _has_bn_stats(states[0])
    )
    if needs_bn and (model is None or batches is None):
        missing = "model" if model is None else "batches"
        raise ValueError(
            f"{missing}: got None, but the models have BatchNorm statistics to re-estimate "
            "(reset_bn=True); pass model= and batches=, or reset_bn=False"
        )
    if needs_bn and batches is not None:  # an empty iterable is refused before any matching
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            raise ValueError(
                "batches: got no batch, but the models have BatchNorm statistics to "
                "re-estimate (reset_bn=True); pass input batches, or reset_bn=False"
            )
        batches = itertools.chain([first], iterator)

    sizes = spec.perm_sizes(states[0])
    device = next(iter(states[0].values())).device
    identity = {p: torch.arange(n, device=device) for p, n in sizes.items()}
    perms = [dict(identity) for _ in range(count)]
    rounds, converged = 1, True
    if reference == "anchor":
        for k in range(count):
            if k != anchor:
                perms[k], _ = weight_matching(
                    spec, states[anchor], states[k], max_iter=max_iter, rng=rng
                )
    else:
        aligned = [dict(s) for s in states]
        converged = False
        for rounds in range(1, max_rounds + 1):  # noqa: B007 (reported in info)
            order = range(count) if rng is None else rng.permutation(count).tolist()
            changed = False
            for k in order:
                others = [j for j in range(count) if j != k]
                if not any(w[j] for j in others):
                    continue
                target = weighted_average([aligned[j] for j in others], [w[j] for j in others])
                new, _ = weight_matching(
                    spec, target, states[k], max_iter=max_iter, rng=rng, init_perm=perms[k]
                )
                if any(not torch.equal(new[p], perms[k][p]) for p in new):
                    changed = True
                    perms[k] = new
                    aligned[k] = apply_permutation(spec, new, states[k])
            if not changed:
                converged = True
                break
        # express the result in the anchor's unit order: compose with the anchor's inverse
        inverse = {p: torch.argsort(v) for p, v in perms[anchor].items()}
        perms = [{p: v[inverse[p]] for p, v in perm.items()} for perm in perms]
    aligned_states = [apply_permutation(spec, perms[k], states[k]) for k in range(count)]
    merged = weighted_average(aligned_states, w)
    logger.info(
        "merged %d models (reference=%s, rounds=%d, converged=%s)",
        count, reference, rounds, converged,
    )  # fmt: skip
    if needs_bn and model is not None and batches is not None:
        merged = reset_bn_state(model, merged, batches)
    return merged, MergeManyInfo(perms, rounds, converged, needs_bn)


def _has_bn_stats(state: Mapping[str, torch.Tensor]) -> bool:
    return any(key.endswith("running_mean") for key in state)
