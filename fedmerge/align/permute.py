"""Apply, draw, invert and summarise unit permutations of a state dict."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedmerge.align.spec import PermutationSpec, StateDict

__all__ = [
    "apply_permutation",
    "count_moved_units",
    "identity_permutation",
    "invert_permutation",
    "random_permutation",
]

Permutation = dict[str, torch.Tensor]


def _block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Expand a unit permutation to the entries of an axis with ``block`` entries per unit."""
    if block == 1:
        return perm
    offsets = torch.arange(block, device=perm.device, dtype=perm.dtype)
    return (perm[:, None] * block + offsets).reshape(-1)


def _assignment(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the assignment that maximises ``score``'s sum (Hungarian).

    SciPy is imported here, not with the module: processes that never solve
    an assignment (every simulated client) do not pay for importing it.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score, maximize=True)
    return rows, cols


def _check_perm(name: str, perm: torch.Tensor, size: int) -> None:
    if perm.dim() != 1 or perm.numel() != size:
        raise ValueError(
            f"perm[{name!r}]: shape {tuple(perm.shape)}; allowed: a 1-D permutation of {size} units"
        )
    if perm.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"perm[{name!r}]: dtype {perm.dtype}; allowed: torch.int64 indices")
    counts = torch.bincount(perm.long().cpu(), minlength=size) if size else perm.new_zeros(0)
    if counts.numel() != size or bool((counts != 1).any()):
        raise ValueError(f"perm[{name!r}] is not a permutation of 0..{size - 1}")


def apply_permutation(
    spec: PermutationSpec, perm: Mapping[str, torch.Tensor], state: StateDict
) -> dict[str, torch.Tensor]:
    r"""Permute the hidden units of a state dict.

    Unit ``i`` of the result is unit ``perm[name][i]`` of ``state``, on every
    axis that the spec couples to permutation ``name``:

    .. math::

        W'_{i_1 \dots i_d} = W_{\pi_1(i_1) \dots \pi_d(i_d)}

    where :math:`\pi_k` is the permutation of axis :math:`k` (the identity on
    axes the spec leaves alone). The permuted model computes the same function.

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the model's architecture.
    perm : mapping of str to LongTensor
        One index tensor, shape ``(n_units,)``, per permutation of the spec.
    state : mapping of str to Tensor
        The state dict to permute; it is not modified.

    Returns
    -------
    dict of str to Tensor
        A new state dict (tensors not touched by any permutation are shared,
        not copied).

    Raises
    ------
    SpecCoverageError
        If the spec does not cover exactly the keys of ``state``.
    ValueError
        If a permutation is missing or is not a permutation of the right size.
    """
    sizes = spec.perm_sizes(state)
    for name, size in sizes.items():
        if name not in perm:
            raise ValueError(
                f"perm: missing permutation {name!r}; allowed: a dict with keys {sorted(sizes)}"
            )
        _check_perm(name, perm[name], size)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for axis, entry in enumerate(spec.axes[key]):
            if entry is not None:
                index = _block_index(perm[entry.perm].to(value.device, torch.int64), entry.block)
                value = torch.index_select(value, axis, index)
        out[key] = value
    return out


def identity_permutation(spec: PermutationSpec, state: StateDict) -> Permutation:
    """Return the identity permutation of every group, on the device of ``state``."""
    sizes = spec.perm_sizes(state)
    device = next(iter(state.values())).device if state else None
    return {name: torch.arange(n, device=device) for name, n in sizes.items()}


def random_permutation(
    spec: PermutationSpec, state: StateDict, *, generator: torch.Generator
) -> Permutation:
    """Draw one uniformly random permutation per group.

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the model's architecture.
    state : mapping of str to Tensor
        A state dict covered by ``spec`` (it gives the sizes and the device).
    generator : torch.Generator
        Source of randomness (on the CPU); the result is moved to the device
        of ``state``.

    Returns
    -------
    dict of str to LongTensor
        One permutation, shape ``(n_units,)``, per group.
    """
    sizes = spec.perm_sizes(state)
    device = next(iter(state.values())).device if state else None
    return {name: torch.randperm(n, generator=generator).to(device) for name, n in sizes.items()}


def invert_permutation(perm: Mapping[str, torch.Tensor]) -> Permutation:
    """Return the inverse of every permutation (``inv[p][perm[p]] == arange``)."""
    return {name: torch.argsort(p) for name, p in perm.items()}


def count_moved_units(perm: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Count, per permutation, the units that are not mapped to themselves.

    Parameters
    ----------
    perm : mapping of str to LongTensor
        Permutations as returned by :func:`weight_matching`.

    Returns
    -------
    dict of str to int
        ``sum(perm[p] != arange(n))`` per permutation (0 for the identity).
    """
    return {
        name: int((p != torch.arange(p.numel(), device=p.device)).sum()) for name, p in perm.items()
    }
