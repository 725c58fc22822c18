"""Fisher-weighted averaging: the diagonal Fisher of a classifier, and the merge it weights."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from fedmerge.align.spec import check_finite, check_same_shapes
from fedmerge.merge.average import INTEGER_RULES, normalise_weights, weighted_average

__all__ = ["FISHER_FLOORS", "FISHER_LABELS", "diagonal_fisher", "fisher_merge"]

#: Where the labels of :func:`diagonal_fisher` come from.
FISHER_LABELS: tuple[str, ...] = ("sampled", "exact", "empirical")

#: Which models' Fishers :func:`fisher_merge` floors at ``eps``.
FISHER_FLOORS: tuple[str, ...] = ("all", "first")

StateDict = dict[str, torch.Tensor]


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    *,
    labels: str = "sampled",
    generator: torch.Generator | None = None,
) -> StateDict:
    r"""Diagonal Fisher information of a classifier's parameters, from per-sample gradients.

    .. math::

        \hat F = \frac{1}{N} \sum_{n=1}^N
        \mathbb{E}_{y \sim q(y \mid x_n)}
        \left[\left(\nabla_\theta \log p_\theta(y \mid x_n)\right)^2\right]

    where :math:`q` is, by ``labels``: one label drawn from the model's
    predictive distribution :math:`p_\theta(\cdot \mid x_n)` (``"sampled"``,
    the paper), the exact expectation over all classes under it
    (``"exact"``, the reference code), or the data's label (``"empirical"``,
    the empirical Fisher).

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits, shape (B, C). It is evaluated in eval
        mode (BatchNorm uses its running statistics, dropout is off) and
        restored to its mode afterwards; its weights are not changed.
    batches : iterable of Tensor or of (Tensor, Tensor)
        Inputs, shape (B, ...), or (inputs, labels of shape (B,)) pairs;
        labels are required with ``labels="empirical"``.
    labels : {"sampled", "exact", "empirical"} (default: "sampled")
        Where the label of each squared gradient comes from (see above).
    generator : torch.Generator, optional
        Seeded generator of the sampled labels (``labels="sampled"``); the
        labels are drawn on its device (a CPU generator serves a CUDA model).

    Returns
    -------
    dict of str to Tensor
        One tensor per parameter of ``model`` (``named_parameters`` names and
        shapes), the mean over all samples of the squared gradients.

    Raises
    ------
    ValueError
        If ``labels`` is unknown, no sample is given, or labels are missing.
    """
    if labels not in FISHER_LABELS:
        raise ValueError(f"labels: got {labels!r}; allowed: {', '.join(FISHER_LABELS)}")
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0

    def log_probs(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.log_softmax(logits, dim=-1).squeeze(0)

    def log_prob_of(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return log_probs(p, x).gather(0, y.reshape(1)).squeeze(0)

    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x, y = batch if isinstance(batch, tuple | list) else (batch, None)
            if labels == "exact":
                jac = vmap(jacrev(log_probs), in_dims=(None, 0))(params, x)  # (B, C, ...)
                with torch.no_grad():
                    probs = F.softmax(model(x), dim=-1)  # (B, C)
                for name, g in jac.items():
                    w = probs.reshape(*probs.shape, *([1] * (g.dim() - 2)))
                    total[name] += (w * g.square()).sum((0, 1))
            else:
                if labels == "sampled":
                    with torch.no_grad():
                        probs = F.softmax(model(x), dim=-1)
                    where = generator.device if generator is not None else probs.device
                    y = torch.multinomial(probs.to(where), 1, generator=generator)
                    y = y.squeeze(1).to(probs.device)
                elif y is None:
                    raise ValueError(
                        "batches: got inputs without labels; allowed with "
                        "labels='empirical': (inputs, labels) pairs"
                    )
                grads = vmap(grad(log_prob_of), in_dims=(None, 0, 0))(params, x, y)
                for name, g in grads.items():
                    total[name] += g.square().sum(0)
            count += len(x)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("batches: got no samples; allowed: at least one input")
    return {name: t / count for name, t in total.items()}


def fisher_merge(
    states: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    eps: float = 1e-6,
    floor: str = "all",
    normalise_fishers: bool = True,
    integers: str = "mean",
) -> StateDict:
    r"""Fisher-weighted average of models, parameter by parameter.

    .. math::

        \theta^{p} = \frac{\sum_i w_i \tilde F_i^{p}\, \theta_i^{p}}
        {\sum_i w_i \tilde F_i^{p}},
        \qquad \tilde F_i^p = \frac{\max(F_i^p, \epsilon)}{c_i},
        \quad c_i = \lVert F_i \rVert_2 \ \text{or}\ 1

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        The ``K`` models (same keys and shapes).
    fishers : sequence of mapping of str to Tensor
        Each model's diagonal Fisher (:func:`diagonal_fisher`): non-negative
        tensors of the parameters' shapes, for every key merged by Fisher
        weighting (the same keys for every model; a subset of the states').
    weights : sequence of float, optional
        :math:`w_i`, ``K`` non-negative numbers (e.g. sample counts,
        normalised); equal when ``None``.
    eps : float (default: 1e-6)
        :math:`\epsilon`, the floor of the Fisher values (the reference
        code's ``fisher_floor``); > 0, so that a parameter no model is
        sensitive to gets the weighted mean.
    floor : {"all", "first"} (default: "all")
        Floor every model's Fisher, or only the first model's (the reference
        code's ``favor_target_model``; the others' zeros stay zeros).
    normalise_fishers : bool (default: True)
        Divide each model's Fisher by its L2 norm over all parameters first
        (the reference code's default ``normalize_fishers``), so that models
        weigh by ``w_i`` overall and by Fisher only relative to each other.
    integers : str (default: "mean")
        Integer buffers, as in :func:`~fedmerge.merge.weighted_average`.

    Returns
    -------
    dict of str to Tensor
        The merged model. Keys without a Fisher (BatchNorm running statistics
        and other buffers) are the weighted mean of the models',
        as :func:`~fedmerge.merge.weighted_average` computes it; each tensor
        in the first state's dtype and device.

    Raises
    ------
    ValueError
        If the weights, Fishers or an option are invalid.
    ShapeMismatchError, NonFiniteWeightsError
        If the state dicts differ in keys or shapes, or hold NaN or inf.

    Notes
    -----
    With equal Fishers the result is the weighted mean (FedAvg). The paper
    (Matena & Raffel) merges with :math:`\epsilon`-floored Fishers; the
    reference code (mmatena/model_merging) floors only the "target" model's
    Fisher by default and normalises each Fisher to unit L2 norm. A server
    has no target model, so ``floor="all"`` is the default here.

    References
    ----------
    .. [1] M. Matena and C. Raffel, "Merging Models with Fisher-Weighted
       Averaging", NeurIPS 2022. https://arxiv.org/abs/2111.09832
    """
    if floor not in FISHER_FLOORS:
        raise ValueError(f"floor: got {floor!r}; allowed: {', '.join(FISHER_FLOORS)}")
    if integers not in INTEGER_RULES:
        raise ValueError(f"integers: got {integers!r}; allowed: {', '.join(INTEGER_RULES)}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: got {eps!r}; allowed: a number > 0")
    w = normalise_weights(weights, len(states))
    if len(fishers) != len(states):
        raise ValueError(f"fishers: got {len(fishers)} Fishers for {len(states)} state dicts")
    first = states[0]
    keys = list(fishers[0])
    for k, (state, fisher) in enumerate(zip(states, fishers, strict=True)):
        if k:
            check_same_shapes(first, state)
        check_finite(state, name=f"states[{k}]")
        if list(fisher) != keys:
            raise ValueError(f"fishers[{k}]: got keys {sorted(fisher)}; allowed: {sorted(keys)}")
        for name, f in fisher.items():
            if name not in first or f.shape != first[name].shape:
                raise ValueError(
                    f"fishers[{k}].{name}: got shape {tuple(f.shape)}; allowed: the shape of "
                    "the state's tensor of that name"
                )
            if not torch.isfinite(f).all() or (f < 0).any():
                raise ValueError(f"fishers[{k}].{name}: got negative or non-finite values")
    norms = [
        math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))
        if normalise_fishers
        else 1.0
        for fisher in fishers
    ]
    merged: dict[str, torch.Tensor] = {}
    for name in keys:
        ref = first[name]
        dtype = torch.promote_types(ref.dtype, torch.float32)
        num = torch.zeros(ref.shape, dtype=dtype, device=ref.device)
        den = torch.zeros_like(num)
        for k, (wk, state, fisher) in enumerate(zip(w, states, fishers, strict=True)):
            f = fisher[name].to(ref.device, dtype)
            if floor == "all" or k == 0:
                f = f.clamp_min(eps)
            coef = f * (wk / norms[k] if norms[k] > 0 else wk)
            num += coef * state[name].to(ref.device, dtype)
            den += coef
        merged[name] = torch.where(den > 0, num / den.clamp_min(1e-30), ref.to(dtype)).to(ref.dtype)
    rest = [name for name in first if name not in merged]
    if rest:
        merged.update(
            weighted_average([{n: s[n] for n in rest} for s in states], w, integers=integers)
        )
    return {name: merged[name] for name in first}
