"""One peer's merge step in decentralized training (DIMAT and its baselines)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedmerge.align.activation_matching import activation_matching
from fedmerge.align.permute import apply_permutation, count_moved_units
from fedmerge.align.spec import PermutationSpec
from fedmerge.align.weight_matching import weight_matching
from fedmerge.merge.average import weighted_average
from fedmerge.merge.batchnorm import has_batchnorm, reset_bn_state

__all__ = ["PEER_ALIGN", "PeerMergeInfo", "consensus_distance", "mean_state", "peer_merge"]

#: How :func:`peer_merge` aligns the neighbours.
PEER_ALIGN: tuple[str, ...] = ("activation", "weight", "none")

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PeerMergeInfo:
    """What one merge step did.

    Attributes
    ----------
    weights : dict of int to float
        Mixing weight actually used per neighbour (renormalised over those
        present); the peer's own weight is ``self_weight``.
    self_weight : float
        The peer's own weight after renormalisation.
    moved : dict of int to int
        Units moved by the alignment of each neighbour (0 without alignment).
    bn_reset : bool
        Whether BatchNorm statistics were re-estimated on local data.
    """

    weights: dict[int, float] = field(default_factory=dict)
    self_weight: float = 1.0
    moved: dict[int, int] = field(default_factory=dict)
    bn_reset: bool = False


def peer_merge(
    model: nn.Module,
    own: StateDict,
    neighbours: Mapping[int, StateDict],
    mixing: Mapping[int, float],
    self_weight: float,
    *,
    align: str = "activation",
    spec: PermutationSpec | None = None,
    batches: Sequence[torch.Tensor] = (),
    reset_bn: bool = True,
    method: str = "correlation",
    dead_units: str = "weights",
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], PeerMergeInfo]:
    r"""Align the neighbours to this peer, then take the weighted mix.

    .. math::

        \theta_i \leftarrow \tilde W_{ii}\,\theta_i + \sum_{j \in N_i}
        \tilde W_{ij}\, \pi_j(\theta_j), \qquad
        \tilde W_{ij} = \frac{W_{ij}}{W_{ii} + \sum_{k \in N_i} W_{ik}}

    where :math:`\pi_j` permutes neighbour :math:`j`'s hidden units to match
    peer :math:`i`'s (activation matching on :math:`i`'s local data as in
    DIMAT, weight matching, or the identity for plain gossip averaging) and
    the sum runs over the neighbours present this round.

    Parameters
    ----------
    model : nn.Module
        A model of the architecture (alignment and BatchNorm re-estimation
        work on copies of it); not modified.
    own : mapping of str to Tensor
        This peer's state :math:`\theta_i`.
    neighbours : mapping of int to state dict
        Neighbour id -> its state, for the neighbours that answered.
    mixing : mapping of int to float
        Neighbour id -> :math:`W_{ij}` (ids missing from ``neighbours`` are
        ignored, and the weights renormalised).
    self_weight : float
        :math:`W_{ii}`.
    align : {"activation", "weight", "none"} (default: "activation")
        How neighbours are aligned.
    spec : PermutationSpec, optional
        Required unless ``align == "none"``.
    batches : sequence of Tensor
        Local input batches: activation statistics and BatchNorm re-estimation.
    reset_bn : bool (default: True)
        Re-estimate BatchNorm running statistics on ``batches`` after mixing
        (when the model has BatchNorm and batches are given).
    method : str (default: "correlation")
        Activation matching similarity ("correlation" or "cross-moment").
    dead_units : {"weights", "arbitrary"} (default: "weights")
        Activation matching's pairing of units dead on ``batches`` (see
        :func:`fedmerge.align.activation_matching`).
    rng : numpy.random.Generator, optional
        Order of weight matching's coordinate descent.

    Returns
    -------
    state : dict of str to Tensor
        The merged state.
    info : PeerMergeInfo
        Mixing weights used, units moved, and whether BatchNorm was reset.

    Raises
    ------
    ValueError
        If ``align`` is unknown, ``spec`` is missing, or the weights of the
        present peers do not sum to a positive number.

    Notes
    -----
    The mix is computed in float64 and rounded once to each tensor's dtype
    (``weighted_average(..., accumulate="float64")``); integer buffers are
    this peer's own. The states are not checked for finite values.
    """
    if align not in PEER_ALIGN:
        raise ValueError(f"align: got {align!r}; allowed: {', '.join(PEER_ALIGN)}")
    if align != "none" and spec is None:
        raise ValueError("spec: required when align is not 'none'")
    present = {j: float(mixing[j]) for j in sorted(neighbours) if j in mixing}
    total = self_weight + sum(present.values())
    if total <= 0:
        raise ValueError(f"mixing: weights sum to {total}; allowed: a positive sum")
    weights = {j: w / total for j, w in present.items()}
    own_w = self_weight / total
    aligned: dict[int, dict[str, torch.Tensor]] = {}
    moved: dict[int, int] = {}
    if align == "activation" and present:
        model_a = copy.deepcopy(model)
        model_a.load_state_dict(own)
        model_b = copy.deepcopy(model)
    for j in present:
        state = dict(neighbours[j])
        if align == "none" or spec is None:  # spec is None only with align "none" (checked)
            aligned[j], moved[j] = state, 0
            continue
        if align == "activation":
            model_b.load_state_dict(state)
            perm, _ = activation_matching(
                spec, model_a, model_b, batches, method=method, dead_units=dead_units
            )
        else:
            perm, _ = weight_matching(spec, own, state, rng=rng)
        aligned[j] = apply_permutation(spec, perm, state)
        moved[j] = int(sum(count_moved_units(perm).values()))
    merged = weighted_average(
        [own, *(aligned[j] for j in weights)],
        [own_w, *weights.values()],
        integers="first",
        accumulate="float64",
        normalise=False,
        check=False,
    )
    did_reset = reset_bn and bool(batches) and has_batchnorm(model)
    if did_reset:
        merged = reset_bn_state(model, merged, batches)
    return merged, PeerMergeInfo(weights, own_w, moved, did_reset)


def mean_state(states: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    r"""Unweighted mean of the peers' states, without alignment.

    .. math::

        \bar\theta = \frac{1}{n} \sum_{i=1}^n \theta_i

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        The peers' state dicts (same keys and shapes).

    Returns
    -------
    dict of str to Tensor
        The mean of every floating tensor, computed in float64 and rounded
        once to its dtype; other tensors are the first state's.
    """
    return weighted_average(states, integers="first", accumulate="float64", check=False)


def consensus_distance(states: Sequence[StateDict]) -> float:
    r"""Mean L2 distance of the peers to their average.

    .. math::

        \frac{1}{n} \sum_{i=1}^n \lVert \theta_i - \bar\theta \rVert_2,
        \qquad \bar\theta = \frac{1}{n}\sum_i \theta_i

    over all floating tensors of the state dicts (BatchNorm statistics included).
    """
    avg = mean_state(states)
    keys = [k for k, v in avg.items() if v.is_floating_point()]
    dists = [
        float(
            torch.stack([((s[k].double() - avg[k].double()) ** 2).sum() for k in keys]).sum().sqrt()
        )
        for s in states
    ]
    return float(np.mean(dists))
