"""ZipIt!: merge correlated features within and across models (Stoica et al., ICLR 2024)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmerge.align.activations import _features, _find_sites, first_tensor
from fedmerge.align.spec import PermutationSpec, check_finite, check_same_shapes
from fedmerge.merge.average import weighted_average

__all__ = ["ZipItResult", "zipit_match", "zipit_merge"]

StateDict = dict[str, torch.Tensor]


def zipit_match(
    corr: torch.Tensor, num_models: int, *, alpha: float = 0.3, beta: float = 0.125
) -> torch.Tensor:
    r"""Greedy ZipIt! matching of the features of ``num_models`` models into one model's width.

    The ``O = N n`` features (model ``i``'s in rows ``i n .. (i+1) n - 1``)
    are merged pairwise, most correlated pair first, until ``n`` remain. A
    merged feature's similarity to every other feature is the minimum of its
    parts', multiplied by :math:`\alpha`; pairs from the same model (a
    within-model merge) are allowed until each model has used its budget of
    :math:`\lfloor \beta \lfloor (O - n) / N \rfloor \rfloor` such merges.

    Parameters
    ----------
    corr : Tensor, shape (O, O)
        Correlations of the concatenated features, symmetric.
    num_models : int
        :math:`N`; ``O`` must be a multiple of it.
    alpha : float (default: 0.3)
        :math:`\alpha` in [0, 1]; at 0 a merged feature is never merged again
        with a feature of the models it came from. The reference code's default.
    beta : float (default: 0.125)
        :math:`\beta` in [0, 1], the share of merges each model may spend
        within itself (0: only across models). The reference code's default.

    Returns
    -------
    Tensor, shape (O, n)
        The unmerge matrix :math:`U`: ``U[f, m] = 1`` if feature ``f``
        belongs to merged feature ``m`` (merged features in the order of their
        lowest member). The merge matrix is
        :math:`M = (U \operatorname{diag}(\mathbf{1}^\top U)^{-1})^\top`.

    Notes
    -----
    Follows the reference code's ``match_tensors_zipit`` except: merged
    features are masked instead of removed from the matrix; with
    :math:`\alpha = 0` the masked features are those currently coming from
    the two parts' models (the reference indexes the shrunken matrix with the
    original model blocks); and a budget of 0 forbids within-model merges
    from the start (the reference allows one before it checks the budget).
    When every remaining pair is masked (possible with :math:`\alpha = 0`),
    the two lowest remaining features are merged.
    """
    total = corr.shape[0]
    if corr.shape != (total, total) or total % num_models:
        raise ValueError(
            f"corr: got shape {tuple(corr.shape)}; allowed: (O, O) with O a multiple of "
            f"num_models={num_models}"
        )
    for key, value in (("alpha", alpha), ("beta", beta)):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{key}: got {value!r}; allowed: a number in [0, 1]")
    n = total // num_models
    sims = corr.detach().to(torch.float64).clone()
    sims.fill_diagonal_(-math.inf)
    origin = torch.arange(total, device=sims.device) // n
    alive = torch.ones(total, dtype=torch.bool, device=sims.device)
    owner = torch.arange(total, device=sims.device)  # merged feature of each feature
    budget = [int(((total - n) // num_models) * beta + 1e-4)] * num_models
    for model in range(num_models):
        if budget[model] <= 0:
            same = origin == model
            sims[same[:, None] & same[None, :]] = -math.inf
    # The best entry of every row, kept up to date: a step changes rows i and j and
    # columns i and j only, so only the rows whose best was i or j are searched again.
    rowmax, rowarg = sims.max(1)
    for _ in range(total - n):
        i = int(torch.argmax(rowmax))
        j = int(rowarg[i])
        if not math.isfinite(float(rowmax[i])):
            i, j = _any_pair(alive)
        i, j = min(i, j), max(i, j)
        oi, oj = int(origin[i]), int(origin[j])
        owner[owner == j] = i
        sims[:, i] = torch.minimum(sims[:, i], sims[:, j])
        sims[i, :] = torch.minimum(sims[i, :], sims[j, :])
        if alpha <= 0:
            related = alive & ((origin == oi) | (origin == oj))
            sims[related, i] = -math.inf
            sims[i, related] = -math.inf
        else:
            sims[:, i] *= alpha
            sims[i, :] *= alpha
        sims[i, i] = -math.inf
        alive[j] = False
        sims[j, :] = -math.inf
        sims[:, j] = -math.inf
        stale = (rowarg == i) | (rowarg == j)
        stale[i] = stale[j] = True
        if oi == oj:
            budget[oi] -= 1
            if budget[oi] <= 0:
                same = alive & (origin == oi)
                sims[same[:, None] & same[None, :]] = -math.inf
                stale |= same
        better = (sims[:, i] > rowmax) & ~stale
        rowmax = torch.where(better, sims[:, i], rowmax)
        rowarg = torch.where(better, torch.full_like(rowarg, i), rowarg)
        rows = torch.nonzero(stale).squeeze(1)
        rowmax[rows], rowarg[rows] = sims[rows].max(1)
    kept = torch.nonzero(alive).squeeze(1)
    column = torch.full((total,), -1, dtype=torch.int64, device=sims.device)
    column[kept] = torch.arange(len(kept), device=sims.device)
    unmerge = torch.zeros(total, len(kept), dtype=torch.float64, device=sims.device)
    unmerge[torch.arange(total, device=sims.device), column[owner]] = 1.0
    return unmerge


def _any_pair(alive: torch.Tensor) -> tuple[int, int]:
    """The first two alive features (when every remaining similarity is masked)."""
    idx = torch.nonzero(alive).squeeze(1)
    return int(idx[0]), int(idx[1])


@dataclass(frozen=True)
class ZipItResult:
    """What :func:`zipit_merge` returns.

    Attributes
    ----------
    states : list of dict of str to Tensor
        One state dict per model. With every group zipped, all are the same
        merged model (one object); with partial zipping, model ``i``'s entry
        holds the shared zipped layers and its own unzipped layers, whose
        first layer reads the zipped features through :math:`U_i` (average
        their outputs for the paper's partially zipped multi-head model).
    merge, unmerge : dict of str to Tensor
        Per zipped group, :math:`M` (shape (n, N n)) and :math:`U` (shape (N n, n)).
    within : dict of str to int
        Per zipped group, merged features with two or more members from the
        same model.
    """

    states: list[StateDict]
    merge: dict[str, torch.Tensor]
    unmerge: dict[str, torch.Tensor]
    within: dict[str, int]


def zipit_merge(
    spec: PermutationSpec,
    models: Sequence[nn.Module],
    batches: Iterable[Any],
    *,
    alpha: float = 0.3,
    beta: float = 0.125,
    stop: int | None = None,
    eps: float = 1e-8,
) -> ZipItResult:
    r"""Zip ``N`` models of one architecture and width into one (ZipIt!).

    For every permutation group (a layer's units, or a residual stream) the
    ``N n`` features of all models are matched by :func:`zipit_match` on the
    correlations of their activations on ``batches``, within and across
    models. A tensor whose axes are indexed by zipped groups becomes

    .. math::

        W = \sum_{i=1}^N c_i\, M_i^{(p)} W_i\, U_i^{(q)},
        \qquad M_i = M[:, i n : (i+1) n], \quad U_i = U[i n : (i+1) n, :]

    with :math:`M_i` on produced axes (axis 0, and the axis of a bias or a
    BatchNorm vector), :math:`U_i` on the consumed axis (axis 1 of a weight),
    and :math:`c_i = 1/N` when axis 0 is not a zipped group (the output layer:
    its outputs are averaged), else 1. Tensors of no group are averaged.

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the architecture (:func:`~fedmerge.align.permutation_spec_for`).
        Axis 1 of a tensor with two or more axes is taken as its input axis.
    models : sequence of nn.Module
        The ``N >= 2`` models; same architecture and widths; not modified.
    batches : iterable
        Input batches (tensors, or tuples whose first item is one) on which
        activations are observed (at the inputs of the layers that consume a
        group, as :func:`~fedmerge.align.collect_activation_stats` observes
        them); every model sees every batch once.
    alpha, beta : float (default: 0.3, 0.125)
        The paper's :math:`\alpha` and :math:`\beta` (:func:`zipit_match`).
    stop : int, optional
        Partial zipping: zip only the first ``stop`` groups in forward order
        (the layers up to that point); all when ``None``.
    eps : float (default: 1e-8)
        Added to products of standard deviations in the correlations.

    Returns
    -------
    ZipItResult
        The merged state dict(s), merge and unmerge matrices, within-model merges.

    Raises
    ------
    ValueError
        If fewer than two models are given, ``stop`` is out of range, or an
        option is invalid.
    ShapeMismatchError, NonFiniteWeightsError
        If the models differ in shapes, or hold NaN or inf.

    Notes
    -----
    ZipIt! merges features by plain averaging (:math:`M` divides by the
    number of members) and so do we: client sample counts play no part. The
    reference code adds ``1e-5`` to that count; here it divides exactly, so
    zipping a model with itself returns it unchanged. Re-estimating
    BatchNorm statistics afterwards (the paper resets them) is left to the
    caller (:func:`~fedmerge.merge.reset_bn_state`).

    References
    ----------
    .. [1] G. Stoica, D. Bolya, J. Bjorner, P. Ramesh, T. Hearn, J. Hoffman,
       "ZipIt! Merging Models from Different Tasks without Training", ICLR
       2024. https://arxiv.org/abs/2305.03053
    """
    num = len(models)
    if num < 2:
        raise ValueError(f"models: got {num}; allowed: at least 2 models")
    states = [dict(m.state_dict()) for m in models]
    for k, state in enumerate(states):
        if k:
            check_same_shapes(states[0], state)
        check_finite(state, name=f"models[{k}]")
    sizes = spec.perm_sizes(states[0])
    groups = list(spec.perms)
    if stop is not None and not 1 <= stop <= len(groups):
        raise ValueError(f"stop: got {stop!r}; allowed: an integer in [1, {len(groups)}]")
    zipped = groups if stop is None else groups[:stop]
    corr = _correlations(spec, models, list(batches), zipped, sizes, eps)
    unmerge = {g: zipit_match(corr[g], num, alpha=alpha, beta=beta) for g in zipped}
    merge = {g: (u / u.sum(0, keepdim=True)).T for g, u in unmerge.items()}
    within = {g: _within(u, num) for g, u in unmerge.items()}
    full = stop is None or stop == len(groups)
    out = [_transform(spec, states, i, merge, unmerge, sizes, full) for i in range(num)]
    if full:
        merged = out[0]
        for other in out[1:]:
            for key in merged:
                merged[key] = merged[key] + other[key]
        rest = [k for k in states[0] if not any(spec.axes[k])]
        averaged = weighted_average([{k: s[k] for k in rest} for s in states], check=False)
        merged = {
            k: (averaged[k] if k in averaged else merged[k].to(states[0][k].dtype))
            for k in states[0]
        }
        return ZipItResult([merged] * num, merge, unmerge, within)
    heads = [{k: v.to(states[0][k].dtype) for k, v in o.items()} for o in out]
    trunk = [k for k in states[0] if _is_trunk(spec, k, set(zipped))]
    for key in trunk:
        shared = sum(h[key].double() for h in heads)
        for h in heads:
            h[key] = torch.as_tensor(shared).to(states[0][key].dtype)
    return ZipItResult(heads, merge, unmerge, within)


def _is_trunk(spec: PermutationSpec, key: str, zipped: set[str]) -> bool:
    """A tensor indexed only by zipped groups (and by at least one)."""
    entries = [e for e in spec.axes[key] if e is not None]
    return bool(entries) and all(e.perm in zipped for e in entries)


def _within(unmerge: torch.Tensor, num: int) -> int:
    n = unmerge.shape[1]
    per_model = unmerge.reshape(num, unmerge.shape[0] // num, n).sum(1)  # (N, n)
    return int((per_model > 1).any(0).sum())


def _correlations(
    spec: PermutationSpec,
    models: Sequence[nn.Module],
    batches: list[Any],
    groups: list[str],
    sizes: dict[str, int],
    eps: float,
) -> dict[str, torch.Tensor]:
    """Per group, the (N n, N n) correlations of all models' features (one pass per model).

    A group is observed where :func:`~fedmerge.align.collect_activation_stats`
    observes it (the inputs of the layers that consume it); with several
    sites the correlation is the mean of the sites'.
    """
    sites = _find_sites(spec, models[0])
    paths = sorted({s.module for g in groups for s in sites[g]})
    mods = [dict(m.named_modules()) for m in models]
    seen: list[dict[str, torch.Tensor]] = [{} for _ in models]
    uses = {s.module: s.use_input for g in groups for s in sites[g]}

    def hook(store: dict[str, torch.Tensor], path: str, use_input: bool) -> Any:
        def fn(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            store[path] = inputs[0] if use_input else output

        return fn

    handles = [
        mods[k][p].register_forward_hook(hook(seen[k], p, uses[p]))
        for k in range(len(models))
        for p in paths
    ]
    sums: dict[tuple[str, str], list[Any]] = {}  # (group, site) -> [count, sum, cross]
    modes = [{m: m.training for m in model.modules()} for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            for batch in batches:
                x = first_tensor(batch)
                for k, model in enumerate(models):
                    seen[k].clear()
                    model(x.to(next(model.parameters()).device))
                for g in groups:
                    used: list[torch.Tensor] = []
                    for site in sites[g]:
                        if any(seen[0][site.module] is u for u in used):
                            continue  # the same tensor reaches two sites: count it once
                        used.append(seen[0][site.module])
                        feats = torch.cat(
                            [
                                _features(mods[k][site.module], seen[k][site.module], site.block)
                                .double()
                                .cpu()
                                for k in range(len(models))
                            ],
                            dim=1,
                        )
                        acc = sums.setdefault((g, site.module), [0, 0.0, 0.0])
                        acc[0] += feats.shape[0]
                        acc[1] = acc[1] + feats.sum(0)
                        acc[2] = acc[2] + feats.T @ feats
    finally:
        for handle in handles:
            handle.remove()
        for flags in modes:
            for module, flag in flags.items():
                module.train(flag)
    if not batches:
        raise ValueError("batches: got no batch; allowed: a non-empty iterable of input tensors")
    out: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
    for (g, _), (count, total, cross) in sums.items():
        mean = total / count
        cov = cross / count - torch.outer(mean, mean)
        std = torch.diagonal(cov).clamp_min(0).sqrt()
        out[g].append(cov / (torch.outer(std, std) + eps))
    return {g: torch.stack(blocks).mean(0) for g, blocks in out.items()}


def _apply(t: torch.Tensor, axis: int, matrix: torch.Tensor, block: int) -> torch.Tensor:
    """``matrix`` (new, old) applied along ``axis`` of ``t``, each unit ``block`` entries wide."""
    if block > 1:
        eye = torch.eye(block, dtype=matrix.dtype, device=matrix.device)
        matrix = torch.kron(matrix.contiguous(), eye)
    moved = torch.movedim(t, axis, 0).contiguous()
    res = torch.tensordot(matrix.to(t.device), moved, dims=([1], [0]))
    return torch.movedim(res, 0, axis)


def _transform(
    spec: PermutationSpec,
    states: list[StateDict],
    i: int,
    merge: dict[str, torch.Tensor],
    unmerge: dict[str, torch.Tensor],
    sizes: dict[str, int],
    full: bool,
) -> StateDict:
    """Model ``i``'s tensors mapped into the zipped feature spaces (float64)."""
    num = len(states)
    out: StateDict = {}
    for key, value in states[i].items():
        entries = spec.axes[key]
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        t = value.double()
        for axis, entry in enumerate(entries):
            if entry is None or entry.perm not in merge:
                continue
            n = sizes[entry.perm]
            rows = slice(i * n, (i + 1) * n)
            if axis == 1 and t.dim() >= 2:
                t = _apply(t, axis, unmerge[entry.perm][rows, :].T, entry.block)
            else:
                t = _apply(t, axis, merge[entry.perm][:, rows], entry.block)
        first = entries[0] if entries else None
        if full and (first is None or first.perm not in merge):
            t = t / num  # the outputs of this tensor are not zipped: average the models
        out[key] = t
    return out
