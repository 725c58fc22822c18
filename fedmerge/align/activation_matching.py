"""Activation matching: align hidden units by the similarity of their activations."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedmerge.align.activations import collect_activation_stats
from fedmerge.align.permute import _assignment
from fedmerge.align.spec import PermutationSpec, check_finite, check_same_shapes
from fedmerge.errors import ShapeMismatchError

__all__ = [
    "ACTIVATION_METHODS",
    "DEAD_UNIT_RULES",
    "ActivationMatchingInfo",
    "activation_matching",
    "unit_weight_similarity",
]

logger = logging.getLogger(__name__)

#: Similarities :func:`activation_matching` can maximise.
ACTIVATION_METHODS: tuple[str, ...] = ("correlation", "cross-moment")
#: How :func:`activation_matching` pairs units that are dead on the alignment data.
DEAD_UNIT_RULES: tuple[str, ...] = ("weights", "arbitrary")
#: Scale of the weight similarity that breaks ties between dead units (below any live signal).
DEAD_TIE_SCALE = 1e-6


@dataclass(frozen=True)
class ActivationMatchingInfo:
    """What :func:`activation_matching` measured.

    Attributes
    ----------
    num_samples : dict of str to int
        Samples per site of each group (batch entries times spatial positions).
    similarity : dict of str to float
        Mean similarity of the matched pairs of units of each group (for
        ``"correlation"``, the mean correlation: 1 for identical models).
    dead : dict of str to tuple of int
        Units of each group with zero activation on every input, in A and in B.
    """

    num_samples: dict[str, int]
    similarity: dict[str, float]
    dead: dict[str, tuple[int, int]] = field(default_factory=dict)


def activation_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    *,
    method: str = "correlation",
    eps: float = 1e-8,
    dead_units: str = "weights",
) -> tuple[dict[str, torch.Tensor], ActivationMatchingInfo]:
    r"""Find the permutation of B's units whose activations best match A's.

    For every permutation group :math:`p`, with :math:`a_i` and :math:`b_j`
    the activations of unit :math:`i` of A and :math:`j` of B on the same
    inputs, solve the linear assignment

    .. math::

        \max_{\pi_p} \sum_i S_p[i, \pi_p(i)], \qquad
        S_p[i, j] = \frac{\operatorname{cov}(a_i, b_j)}{\sigma_{a_i}\sigma_{b_j} + \epsilon}
        \ \text{(correlation)} \quad\text{or}\quad
        S_p[i, j] = \mathbb{E}[a_i b_j]\ \text{(cross-moment)} .

    Groups are independent (a unit's activations do not depend on how the
    other layers are ordered), so each is solved once.

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the architecture (see :func:`permutation_spec_for`).
    model_a : nn.Module
        The reference model.
    model_b : nn.Module
        The model to align to ``model_a``; same architecture and widths.
    batches : iterable
        Batches of inputs, each a Tensor ``(batch, *input_shape)`` or a tuple
        whose first item is one; iterated once.
    method : str (default: "correlation")
        ``"correlation"`` (Pearson correlation, the paper's choice; scale
        invariant) or ``"cross-moment"`` (uncentred :math:`\mathbb{E}[ab]`,
        which also rewards matching magnitudes).
    eps : float (default: 1e-8)
        Added to the product of standard deviations; units that never vary
        get similarity 0.
    dead_units : {"weights", "arbitrary"} (default: "weights")
        Units whose activation is zero on every input (dead ReLUs on these
        inputs) have similarity 0 to every unit, so the assignment pairs them
        arbitrarily. ``"weights"`` breaks those ties by the cosine similarity
        of the units' own parameters (:func:`unit_weight_similarity`), scaled
        by :data:`DEAD_TIE_SCALE` so that it never outweighs an activation
        similarity; ``"arbitrary"`` leaves them to the solver (Git Re-Basin's
        and DIMAT's behaviour; ``"weights"`` is a departure from both).

    Returns
    -------
    perm : dict of str to LongTensor
        One permutation per group, shape ``(n_units,)``, on the device of
        ``model_a``: ``apply_permutation(spec, perm, model_b.state_dict())``.
    info : ActivationMatchingInfo
        Samples seen and the mean matched similarity per group.

    Raises
    ------
    ValueError
        If ``method`` is unknown or ``batches`` is empty.
    ShapeMismatchError
        If the models' state dicts differ in keys or shapes.
    NonFiniteWeightsError
        If a weight is NaN or infinite.

    Notes
    -----
    Git Re-Basin [1]_ records each layer's post-activation output. Here a
    group's units are observed at the inputs of the layers that consume them:
    for a hidden layer that is its post-activation output (after pooling and
    flattening, where the model pools), for a residual stream the output of
    every block of the stage. With several sites per group the similarity is
    the mean of the sites' similarities.

    References
    ----------
    .. [1] S. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: Merging
       Models modulo Permutation Symmetries", ICLR 2023.
       https://arxiv.org/abs/2209.04836
    """
    if method not in ACTIVATION_METHODS:
        raise ValueError(f"method: got {method!r}; allowed: {', '.join(ACTIVATION_METHODS)}")
    if dead_units not in DEAD_UNIT_RULES:
        raise ValueError(f"dead_units: got {dead_units!r}; allowed: {', '.join(DEAD_UNIT_RULES)}")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_same_shapes(state_a, state_b)
    sizes = spec.perm_sizes(state_a)
    check_finite(state_a, name="model_a")
    check_finite(state_b, name="model_b")
    stats = collect_activation_stats(spec, model_a, model_b, batches)
    device = next(iter(state_a.values())).device
    perm: dict[str, torch.Tensor] = {}
    similarity: dict[str, float] = {}
    dead: dict[str, tuple[int, int]] = {}
    for name, group in stats.items():
        sim = group.correlation(eps) if method == "correlation" else group.cross_moment()
        if sim.shape != (sizes[name], sizes[name]):
            raise ShapeMismatchError(
                f"permutation {name!r}: activations have {tuple(sim.shape)} units, the weights "
                f"{sizes[name]}"
            )
        abs_a, abs_b = group.mean_abs()
        dead_a, dead_b = abs_a == 0, abs_b == 0
        dead[name] = (int(dead_a.sum()), int(dead_b.sum()))
        solve = sim
        if dead_units == "weights" and bool(dead_a.any() or dead_b.any()):
            ties = dead_a[:, None] | dead_b[None, :]
            cos = unit_weight_similarity(spec, name, state_a, state_b).to(sim)
            solve = torch.where(ties, DEAD_TIE_SCALE * cos, sim)
        rows, cols = _assignment(solve.cpu().numpy())
        perm[name] = torch.as_tensor(cols, dtype=torch.int64, device=device)
        similarity[name] = float(sim[rows, cols].mean())
    logger.debug("activation matching similarities: %s", similarity)
    info = ActivationMatchingInfo({n: s.num_samples for n, s in stats.items()}, similarity, dead)
    return perm, info


def unit_weight_similarity(
    spec: PermutationSpec,
    name: str,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Cosine similarity of the own parameters of group ``name``'s units in A and B.

    A unit's own parameters are the slices along axis 0 of every tensor whose
    axis 0 the group permutes (weight rows, biases, normalisation
    parameters and statistics), concatenated. Shape ``(n_a, n_b)``; a unit
    whose parameters are all zero has similarity 0.
    """
    feats_a: list[torch.Tensor] = []
    feats_b: list[torch.Tensor] = []
    for key, axes in spec.axes.items():
        first = axes[0] if axes else None
        if first is None or first.perm != name or first.block != 1:
            continue
        a, b = state_a[key], state_b[key]
        if not a.is_floating_point():
            continue
        feats_a.append(a.reshape(a.shape[0], -1).double())
        feats_b.append(b.reshape(b.shape[0], -1).double())
    if not feats_a:
        n_a = spec.perm_sizes(dict(state_a))[name]
        n_b = spec.perm_sizes(dict(state_b))[name]
        return torch.zeros(n_a, n_b, dtype=torch.float64)
    fa = F.normalize(torch.cat(feats_a, dim=1), dim=1)
    fb = F.normalize(torch.cat(feats_b, dim=1), dim=1)
    return fa @ fb.T
