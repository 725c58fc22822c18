"""Permutation specs: which axes of which tensor share which unit permutation.

A hidden unit of a network (a neuron of a linear layer, a channel of a
convolution) can be moved to another position without changing the function,
provided that every tensor that indexes that unit moves with it: the rows of
the producing weight and bias, the BatchNorm affine parameters and running
statistics, and the columns of every consuming weight. Git Re-Basin [1]_ calls
the description of these couplings a *permutation spec*; so do we.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import NamedTuple

import torch

from fedmerge.errors import NonFiniteWeightsError, ShapeMismatchError, SpecCoverageError

__all__ = [
    "AxisRef",
    "PermAxis",
    "PermutationSpec",
    "check_finite",
    "check_same_shapes",
]

StateDict = Mapping[str, torch.Tensor]


class PermAxis(NamedTuple):
    """One axis of one tensor that is indexed by a permuted unit.

    Parameters
    ----------
    perm : str
        Name of the permutation (the group of units).
    block : int (default: 1)
        Number of consecutive entries of the axis that belong to one unit. It
        is 1 except after a flatten: a linear layer reading ``C`` channels of
        ``H x W`` pixels has ``C * H * W`` inputs and block ``H * W``.
    """

    perm: str
    block: int = 1


class AxisRef(NamedTuple):
    """Where a permutation acts: tensor ``key``, axis ``axis``, block ``block``."""

    key: str
    axis: int
    block: int


class PermutationSpec:
    """Couplings between hidden units and tensor axes.

    Parameters
    ----------
    axes : mapping of str to sequence
        For every key of the state dict, one entry per axis of the tensor:
        ``None`` (the axis is not permuted), a permutation name, or a
        :class:`PermAxis`. Keys whose tensors are never permuted (an output
        bias, ``num_batches_tracked``) are listed too, with all entries
        ``None``, so that the spec can tell a covered key from a stray one.
        Stored as ``axes``, a mapping of str to tuple of ``PermAxis | None``
        that must not be modified.

    Notes
    -----
    The spec holds no sizes: the same spec describes a model at several
    widths (the number of units of each permutation is read from a state dict
    by :meth:`perm_sizes`). Permutations are ordered by their first
    appearance in ``axes``; the built-in specs and the traced ones list keys
    in forward order, which the OT alignment relies on.

    References
    ----------
    .. [1] S. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: Merging
       Models modulo Permutation Symmetries", ICLR 2023.
       https://arxiv.org/abs/2209.04836
    """

    def __init__(self, axes: Mapping[str, Sequence[PermAxis | str | None]]) -> None:
        normalised: dict[str, tuple[PermAxis | None, ...]] = {}
        for key, entries in axes.items():
            row: list[PermAxis | None] = []
            for axis, entry in enumerate(entries):
                if entry is None:
                    row.append(None)
                    continue
                item = PermAxis(entry) if isinstance(entry, str) else PermAxis(*entry)
                if item.block < 1:
                    raise ValueError(
                        f"spec axes[{key!r}][{axis}]: block {item.block}; allowed: an integer >= 1"
                    )
                row.append(item)
            normalised[key] = tuple(row)
        self.axes: Mapping[str, tuple[PermAxis | None, ...]] = normalised  # read-only by contract

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationSpec):
            return NotImplemented
        return dict(self.axes) == dict(other.axes)

    def __hash__(self) -> int:
        return hash(tuple(self.axes.items()))

    def __repr__(self) -> str:
        return f"PermutationSpec({len(self.axes)} tensors, perms={list(self.perms)})"

    @cached_property
    def perm_to_axes(self) -> dict[str, tuple[AxisRef, ...]]:
        """For every permutation, the tensor axes it acts on, in key order."""
        out: dict[str, list[AxisRef]] = {}
        for key, entries in self.axes.items():
            for axis, entry in enumerate(entries):
                if entry is not None:
                    out.setdefault(entry.perm, []).append(AxisRef(key, axis, entry.block))
        return {name: tuple(refs) for name, refs in out.items()}

    @property
    def perms(self) -> tuple[str, ...]:
        """Permutation names in order of first appearance (forward order)."""
        return tuple(self.perm_to_axes)

    def check_covers(self, state: StateDict) -> None:
        """Raise :class:`SpecCoverageError` unless the keys of ``state`` are the spec's keys.

        Also checks that every tensor has as many axes as its spec entry.
        """
        missing = [k for k in state if k not in self.axes]
        if missing:
            raise SpecCoverageError(
                f"permutation spec does not cover parameter {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; build the spec from the same architecture as the state dict"
            )
        absent = [k for k in self.axes if k not in state]
        if absent:
            raise SpecCoverageError(
                f"state dict lacks parameter {absent[0]!r} named by the permutation spec"
                + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
            )
        for key, entries in self.axes.items():
            if state[key].dim() != len(entries):
                raise SpecCoverageError(
                    f"parameter {key!r} has shape {tuple(state[key].shape)} but the spec "
                    f"describes {len(entries)} axes"
                )

    def perm_sizes(self, state: StateDict) -> dict[str, int]:
        """Number of units of every permutation in ``state``.

        Parameters
        ----------
        state : mapping of str to Tensor
            A state dict covered by this spec.

        Returns
        -------
        dict of str to int
            Units per permutation.

        Raises
        ------
        SpecCoverageError
            If ``state`` is not covered, or if two axes of one permutation
            disagree on its number of units (the message names both tensors).
        """
        self.check_covers(state)
        sizes: dict[str, int] = {}
        first: dict[str, AxisRef] = {}
        for name, refs in self.perm_to_axes.items():
            for ref in refs:
                length = state[ref.key].shape[ref.axis]
                if length % ref.block:
                    raise SpecCoverageError(
                        f"parameter {ref.key!r} axis {ref.axis} has length {length}, not a "
                        f"multiple of the block {ref.block} of permutation {name!r}"
                    )
                units = length // ref.block
                if name not in sizes:
                    sizes[name], first[name] = units, ref
                elif sizes[name] != units:
                    other = first[name]
                    raise SpecCoverageError(
                        f"permutation {name!r} has {sizes[name]} units on {other.key!r} axis "
                        f"{other.axis} but {units} on {ref.key!r} axis {ref.axis}"
                    )
        return sizes


def check_same_shapes(state_a: StateDict, state_b: StateDict) -> None:
    """Raise :class:`ShapeMismatchError` unless both state dicts have equal keys and shapes.

    Parameters
    ----------
    state_a, state_b : mapping of str to Tensor
        State dicts of two models of one architecture.
    """
    only_a = [k for k in state_a if k not in state_b]
    only_b = [k for k in state_b if k not in state_a]
    if only_a or only_b:
        key, side = (only_a[0], "first") if only_a else (only_b[0], "second")
        raise ShapeMismatchError(
            f"parameter {key!r} is only in the {side} state dict; the models have different "
            "architectures"
        )
    for key, value in state_a.items():
        if value.shape != state_b[key].shape:
            raise ShapeMismatchError(
                f"parameter {key!r} has shape {tuple(value.shape)} in the first state dict and "
                f"{tuple(state_b[key].shape)} in the second"
            )


def check_finite(state: StateDict, *, name: str = "state") -> None:
    """Raise :class:`NonFiniteWeightsError` if a floating tensor holds NaN or inf.

    Parameters
    ----------
    state : mapping of str to Tensor
        The state dict to check.
    name : str (default: "state")
        How the message refers to the state dict.
    """
    for key, value in state.items():
        if not value.is_floating_point() or bool(torch.isfinite(value.sum())):
            continue  # a finite sum means finite entries (the cheap test comes first)
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise NonFiniteWeightsError(
                f"{name}[{key!r}] holds {bad} non-finite value(s) (NaN or inf); "
                "refusing to align or merge it"
            )
