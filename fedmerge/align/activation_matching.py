"""Activation matching: align hidden units by the similarity of their activations."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from fedmerge.align.activations import collect_activation_stats
from fedmerge.align.spec import PermutationSpec, check_finite, check_same_shapes
from fedmerge.errors import ShapeMismatchError

__all__ = ["ACTIVATION_METHODS", "ActivationMatchingInfo", "activation_matching"]

logger = logging.getLogger(__name__)

#: Similarities :func:`activation_matching` can maximise.
ACTIVATION_METHODS: tuple[str, ...] = ("correlation", "cross-moment")


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
    """

    num_samples: dict[str, int]
    similarity: dict[str, float]


def activation_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    *,
    method: str = "correlation",
    eps: float = 1e-8,
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
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_same_shapes(state_a, state_b)
    sizes = spec.perm_sizes(state_a)
    check_finite(state_a, name="model_a")
    check_finite(state_b, name="model_b")
    stats = collect_activation_stats(spec, model_a, model_b, batches)
    device = next(iter(state_a.values())).device
    perm: dict[str, torch.Tensor] = {}
    similarity: dict[str, float] = {}
    for name, group in stats.items():
        sim = group.correlation(eps) if method == "correlation" else group.cross_moment()
        if sim.shape != (sizes[name], sizes[name]):
            raise ShapeMismatchError(
                f"permutation {name!r}: activations have {tuple(sim.shape)} units, the weights "
                f"{sizes[name]}"
            )
        rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
        perm[name] = torch.as_tensor(cols, dtype=torch.int64, device=device)
        similarity[name] = float(sim[rows, cols].mean())
    logger.debug("activation matching similarities: %s", similarity)
    info = ActivationMatchingInfo({n: s.num_samples for n, s in stats.items()}, similarity)
    return perm, info
