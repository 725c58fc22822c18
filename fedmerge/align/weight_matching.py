"""Weight matching: Git Re-Basin's permutation coordinate descent."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedmerge.align.permute import _assignment, _block_index, _check_perm
from fedmerge.align.spec import PermutationSpec, StateDict, check_finite, check_same_shapes

__all__ = ["WeightMatchingInfo", "weight_matching"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightMatchingInfo:
    r"""What :func:`weight_matching` did.

    Attributes
    ----------
    iterations : int
        Sweeps over the permutations, including the last one that found no
        improvement.
    converged : bool
        Whether a sweep found no improvement before ``max_iter`` ran out.
    solves : int
        Linear assignment problems solved (sweeps skip a permutation whose
        neighbours did not change since it was last solved).
    objective : float
        :math:`\sum_\ell \langle W^A_\ell, \pi(W^B)_\ell \rangle` over the
        permuted tensors, at the returned permutation.
    """

    iterations: int
    converged: bool
    solves: int
    objective: float


class _Term:
    """One tensor axis coupled to a permutation: its share of that permutation's cost.

    ``a`` is ``W^A`` with the axis in front, shape ``(n_units, rest)``; ``b`` is
    ``W^B`` with the axis in front, unflattened so that its other permuted
    axes (``others``: position, permutation, block) can be gathered; the
    ``primary`` term of a tensor (its first permuted axis) counts it in the
    objective. The term's cost matrix is cached with the versions of the
    permutations it was computed with (``stamp``).
    """

    __slots__ = ("a", "b", "cost", "others", "primary", "stamp")

    def __init__(
        self, a: torch.Tensor, b: torch.Tensor, others: list[tuple[int, str, int]], primary: bool
    ) -> None:
        self.a, self.b, self.others, self.primary = a, b, others, primary
        self.cost: torch.Tensor | None = None
        self.stamp: tuple[int, ...] | None = None

    def update(
        self, n: int, perm: Mapping[str, torch.Tensor], version: Mapping[str, int]
    ) -> torch.Tensor:
        """Return the cost, recomputed only if the other permutations changed."""
        stamp = tuple(version[other] for _, other, _ in self.others)
        if self.cost is None or stamp != self.stamp:
            b = self.b
            for axis, other, block in self.others:
                b = torch.index_select(b, axis, _block_index(perm[other], block))
            self.cost = self.a @ b.reshape(n, -1).T
            self.stamp = stamp
        return self.cost


def _build_terms(
    spec: PermutationSpec, state_a: StateDict, state_b: StateDict, sizes: dict[str, int]
) -> tuple[dict[str, list[_Term]], dict[str, torch.Tensor]]:
    """Split every permutation's cost into terms; sum the terms that never change."""
    terms: dict[str, list[_Term]] = {p: [] for p in sizes}
    constant: dict[str, torch.Tensor] = {}
    for name, refs in spec.perm_to_axes.items():
        n = sizes[name]
        for ref in refs:
            wa, wb = state_a[ref.key], state_b[ref.key]
            dtype = torch.promote_types(wa.dtype, torch.float32)
            a = torch.movedim(wa.to(dtype), ref.axis, 0).reshape(n, -1)
            b = torch.movedim(wb.to(dtype), ref.axis, 0)  # a view: gathers copy it anyway
            others = []
            for axis, entry in enumerate(spec.axes[ref.key]):
                if entry is not None and axis != ref.axis:
                    moved = axis + 1 if axis < ref.axis else axis
                    others.append((moved, entry.perm, entry.block))
            if others:
                first = next(i for i, e in enumerate(spec.axes[ref.key]) if e is not None)
                terms[name].append(_Term(a, b, others, primary=ref.axis == first))
            else:  # e.g. a first layer or a norm's vector: independent of other permutations
                c = a @ b.reshape(n, -1).T
                constant[name] = constant[name] + c if name in constant else c
    return terms, constant


def _cost(
    n: int,
    terms: list[_Term],
    constant: torch.Tensor | None,
    perm: Mapping[str, torch.Tensor],
    version: Mapping[str, int],
) -> torch.Tensor:
    """Cost matrix ``C[i, j]``: gain of putting unit ``j`` of B at position ``i``."""
    cost = constant.clone() if constant is not None else None
    for term in terms:
        share = term.update(n, perm, version)
        cost = share.clone() if cost is None else cost.add_(share)
    if cost is None:  # a spec entry without tensors cannot reach here (sizes come from tensors)
        raise RuntimeError("permutation acts on no tensor")
    return cost


def weight_matching(
    spec: PermutationSpec,
    state_a: StateDict,
    state_b: StateDict,
    *,
    max_iter: int = 100,
    rng: np.random.Generator | None = None,
    init_perm: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], WeightMatchingInfo]:
    r"""Find the permutation of B's units that best matches A's weights.

    Git Re-Basin's weight matching [1]_ maximises the inner product of the
    weights over one permutation per group of units,

    .. math::

        \max_{\pi} \sum_\ell \langle W^A_\ell, \pi(W^B)_\ell \rangle ,

    by coordinate descent: for one permutation :math:`\pi_p` at a time, with
    the others fixed, the objective is linear in :math:`\pi_p`,
    :math:`\sum_i C_p[i, \pi_p(i)]` with
    :math:`C_p = \sum_{(\ell, k)} W^A_{\ell,(k)} \, \pi_{-p}(W^B_\ell)_{(k)}^\top`
    summed over the tensors :math:`\ell` whose axis :math:`k` is coupled to
    :math:`p` (:math:`W_{(k)}`: axis :math:`k` in front, the others
    flattened), and ``scipy.optimize.linear_sum_assignment`` solves it
    exactly. A sweep visits every permutation once; the descent stops after
    the first sweep without improvement, or after ``max_iter`` sweeps.

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the architecture (see :func:`permutation_spec_for`).
    state_a : mapping of str to Tensor
        The reference model's state dict (it is not permuted).
    state_b : mapping of str to Tensor
        The state dict to align to ``state_a``; same keys and shapes.
    max_iter : int (default: 100)
        Most sweeps.
    rng : numpy.random.Generator, optional
        Draws the order of the permutations in every sweep, as in the paper.
        ``None`` visits them in the spec's (forward) order every sweep, which
        is deterministic without a generator.
    init_perm : mapping of str to LongTensor, optional
        Starting permutations, shape ``(n_units,)`` each (e.g. last round's);
        the identity by default.

    Returns
    -------
    perm : dict of str to LongTensor
        One permutation per group, shape ``(n_units,)``, on the device of the
        inputs: ``apply_permutation(spec, perm, state_b)`` is B aligned to A.
    info : WeightMatchingInfo
        Sweeps, convergence, assignment solves and the final objective.

    Raises
    ------
    ShapeMismatchError
        If the state dicts differ in keys or shapes (the message names the
        parameter and both shapes).
    SpecCoverageError
        If the spec does not cover the state dicts.
    NonFiniteWeightsError
        If a weight is NaN or infinite.

    Notes
    -----
    Departures from the reference implementation that do not change the
    result: a permutation is only re-solved when a permutation it is coupled
    with changed since its last solve (the skipped assignment would be the
    same problem, so it cannot improve); each tensor's share of a cost matrix
    is cached and recomputed only when its other permutations changed; a new
    permutation replaces the old one only when it strictly improves the
    objective, so ties never make the descent cycle. Cost matrices are
    accumulated in the weights' precision (at least float32) and solved in
    float64.

    References
    ----------
    .. [1] S. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: Merging
       Models modulo Permutation Symmetries", ICLR 2023.
       https://arxiv.org/abs/2209.04836
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: got {max_iter!r}; allowed: an integer >= 1")
    check_same_shapes(state_a, state_b)
    sizes = spec.perm_sizes(state_a)
    check_finite(state_a, name="state_a")
    check_finite(state_b, name="state_b")
    device = next(iter(state_a.values())).device
    perm = {p: torch.arange(n, device=device) for p, n in sizes.items()}
    if init_perm is not None:
        unknown = sorted(set(init_perm) - set(sizes))
        if unknown:
            raise ValueError(
                f"init_perm: unknown permutation {unknown[0]!r}; allowed: {sorted(sizes)}"
            )
        for name, size in sizes.items():
            if name in init_perm:
                _check_perm(name, init_perm[name], size)
                perm[name] = init_perm[name].to(device, torch.int64)

    terms, constant = _build_terms(spec, state_a, state_b, sizes)
    neighbours = {p: sorted({o for t in terms[p] for _, o, _ in t.others}) for p in sizes}
    version = dict.fromkeys(sizes, 0)
    seen: dict[str, tuple[int, ...]] = {}
    names = list(sizes)
    solves, converged, iteration = 0, False, 0
    for iteration in range(1, max_iter + 1):
        order = names if rng is None else [names[i] for i in rng.permutation(len(names))]
        progress = False
        for name in order:
            stamp = tuple(version[q] for q in neighbours[name])
            if seen.get(name) == stamp:
                continue  # same cost matrix as at the last solve: no improvement possible
            n = sizes[name]
            cost = _cost(n, terms[name], constant.get(name), perm, version)
            c = cost.detach().to("cpu", torch.float64).numpy()
            _, cols = _assignment(c)
            solves += 1
            rows = np.arange(n)
            old = float(c[rows, perm[name].cpu().numpy()].sum())
            new = float(c[rows, cols].sum())
            if new > old + 1e-12 * max(1.0, abs(old)):
                perm[name] = torch.as_tensor(cols, dtype=torch.int64, device=device)
                version[name] += 1
                progress = True
            seen[name] = stamp
            logger.debug("iteration %d %s: %.6g -> %.6g", iteration, name, old, new)
        if not progress:
            converged = True
            break
    if not converged:
        warnings.warn(
            f"weight matching did not converge in max_iter={max_iter} sweeps; raise max_iter",
            RuntimeWarning,
            stacklevel=2,
        )
    objective = _objective(sizes, terms, constant, perm, version)
    return perm, WeightMatchingInfo(iteration, converged, solves, objective)


def _objective(
    sizes: Mapping[str, int],
    terms: Mapping[str, list[_Term]],
    constant: Mapping[str, torch.Tensor],
    perm: Mapping[str, torch.Tensor],
    version: Mapping[str, int],
) -> float:
    r""":math:`\sum_\ell \langle W^A_\ell, \pi(W^B)_\ell \rangle` from the cached costs.

    A tensor's inner product is the trace of its cost share against its
    permutation, :math:`\sum_i C[i, \pi_p(i)]`; every tensor is counted once
    (in ``constant`` or through its primary term).
    """
    total = 0.0
    for name, n in sizes.items():
        rows = torch.arange(n, device=perm[name].device)
        shares = [t.update(n, perm, version) for t in terms[name] if t.primary]
        if name in constant:
            shares.append(constant[name])
        for share in shares:
            total += float(share[rows, perm[name]].double().sum())
    return total
