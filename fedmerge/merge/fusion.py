"""One-shot fusion of independently trained models, and the ensemble it is compared with.

OTFusion (Singh & Jaggi, NeurIPS 2020, https://arxiv.org/abs/1910.05653)
and Git Re-Basin (Ainsworth et al., ICLR 2023, https://arxiv.org/abs/2209.04836)
fuse models trained apart once: every model is aligned to one of them (the
anchor), then the aligned models are averaged. The ensemble (averaged
predictions) is the reference OTFusion compares the fused model with.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmerge.align.activation_matching import activation_matching
from fedmerge.align.activations import collect_activation_stats
from fedmerge.align.optimal_transport import apply_transport, ot_align
from fedmerge.align.permute import apply_permutation
from fedmerge.align.spec import PermutationSpec
from fedmerge.align.weight_matching import weight_matching
from fedmerge.merge.average import weighted_average
from fedmerge.merge.batchnorm import has_batchnorm, reset_bn_state
from fedmerge.training import eval_batch_size

__all__ = ["FUSION_METHODS", "align_to_anchor", "ensemble_accuracy", "fuse_to_anchor"]

StateDict = Mapping[str, torch.Tensor]

#: How :func:`fuse_to_anchor` aligns each model to the anchor before averaging.
FUSION_METHODS: tuple[str, ...] = ("average", "weight", "activation", "ot-weight", "ot-activation")


def _holding(model: nn.Module, state: StateDict) -> nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m


def fuse_to_anchor(
    spec: PermutationSpec | None,
    model: nn.Module,
    states: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    *,
    method: str = "weight",
    batches: Sequence[Any] = (),
    anchor: int = 0,
    rng: np.random.Generator | None = None,
    reset_bn: bool = True,
) -> dict[str, torch.Tensor]:
    """Align every model to model ``anchor``, then take their weighted mean.

    Parameters
    ----------
    spec : PermutationSpec or None
        Couplings of the architecture; may be ``None`` for ``method="average"``.
    model : nn.Module
        A model of the architecture (copied, not modified).
    states : sequence of mapping of str to Tensor
        The models to fuse (same architecture and width).
    weights : sequence of float, optional
        Merge weights (normalised; equal when ``None``).
    method : {"average", "weight", "activation", "ot-weight", "ot-activation"}
        ``"average"``: no alignment (vanilla averaging); ``"weight"``: Git
        Re-Basin's weight matching; ``"activation"``: activation matching on
        ``batches``; ``"ot-weight"`` / ``"ot-activation"``: exact optimal
        transport (OTFusion) with the weight or activation ground cost.
    batches : sequence of Tensor (default: ())
        Alignment data (activation methods) and BatchNorm re-estimation.
    anchor : int (default: 0)
        The model the others are aligned to; the result keeps its unit order.
    rng : numpy.random.Generator, optional
        Order of the permutations in weight matching.
    reset_bn : bool (default: True)
        Re-estimate BatchNorm statistics of the fused model on ``batches``
        (when it has BatchNorm and ``batches`` is not empty).

    Returns
    -------
    dict of str to Tensor
        The fused state dict.

    Raises
    ------
    ValueError
        For an unknown method, a method that needs ``spec`` or ``batches``
        without them, or an ``anchor`` out of range.
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"method: got {method!r}; allowed: {', '.join(FUSION_METHODS)}")
    if not 0 <= anchor < len(states):
        raise ValueError(f"anchor: got {anchor}; allowed: 0 to {len(states) - 1}")
    if method != "average" and spec is None:
        raise ValueError(f"spec: got None; required with method {method!r}")
    if "activation" in method and not batches:
        raise ValueError(f"batches: got none; required with method {method!r}")
    ref = states[anchor]
    ref_model = _holding(model, ref) if "activation" in method else None
    aligned: list[StateDict] = []
    for i, state in enumerate(states):
        if i == anchor or method == "average" or spec is None:
            aligned.append(state)
        elif method == "weight":
            perm, _ = weight_matching(spec, dict(ref), dict(state), rng=rng)
            aligned.append(apply_permutation(spec, perm, dict(state)))
        elif method == "activation":
            assert ref_model is not None
            perm, _ = activation_matching(spec, ref_model, _holding(model, state), batches)
            aligned.append(apply_permutation(spec, perm, dict(state)))
        else:
            cost = method.removeprefix("ot-")
            acts = None
            if cost == "activation":
                assert ref_model is not None
                acts = collect_activation_stats(spec, ref_model, _holding(model, state), batches)
            plans, _ = ot_align(spec, dict(ref), dict(state), cost=cost, activations=acts)
            aligned.append(apply_transport(spec, plans, dict(state)))
    fused = weighted_average(aligned, None if weights is None else list(weights))
    if reset_bn and batches and has_batchnorm(model):
        fused = reset_bn_state(model, fused, batches)
    return fused


def align_to_anchor(
    spec: PermutationSpec,
    states: Sequence[StateDict],
    *,
    anchor: int = 0,
    rng: np.random.Generator | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Every model permuted onto model ``anchor``'s units by weight matching (anchor as is).

    Measures that compare models unit by unit (their distance, their
    average) then no longer depend on the arbitrary order of each model's
    hidden units.
    """
    if not 0 <= anchor < len(states):
        raise ValueError(f"anchor: got {anchor}; allowed: 0 to {len(states) - 1}")
    ref = dict(states[anchor])
    out: list[dict[str, torch.Tensor]] = []
    for i, state in enumerate(states):
        if i == anchor:
            out.append(dict(state))
            continue
        perm, _ = weight_matching(spec, ref, dict(state), rng=rng)
        out.append(apply_permutation(spec, perm, dict(state)))
    return out


@torch.no_grad()
def ensemble_accuracy(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None
) -> float:
    """Accuracy of the ensemble: the class of the highest mean softmax probability.

    Parameters
    ----------
    models : sequence of nn.Module
        The members (put in eval mode), on one device.
    x : Tensor, shape (n, *input_shape)
    y : Tensor, shape (n,)
    batch_size : int, optional
        ``None``: :func:`fedmerge.training.eval_batch_size` of the models' device.
    """
    if not models:
        raise ValueError("models: got none; allowed: at least one model")
    device = next(models[0].parameters()).device
    batch_size = eval_batch_size(device) if batch_size is None else batch_size
    for m in models:
        m.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        xb = x[start : start + batch_size].to(device)
        probs = torch.stack([m(xb).softmax(dim=1) for m in models]).mean(dim=0)
        correct += int((probs.argmax(1) == y[start : start + batch_size].to(device)).sum())
    return correct / max(len(y), 1)
