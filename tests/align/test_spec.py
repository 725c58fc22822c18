"""Tests of fedmerge.align.spec."""

from __future__ import annotations

import pytest
import torch

from fedmerge.align import AxisRef, PermAxis, PermutationSpec
from fedmerge.align.spec import check_finite, check_same_shapes
from fedmerge.errors import (
    AlignmentError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    SpecCoverageError,
)


def _spec() -> PermutationSpec:
    return PermutationSpec(
        {
            "l0.weight": ("P0", None),
            "l0.bias": ("P0",),
            "l1.weight": (None, PermAxis("P0", 2)),
            "l1.bias": (None,),
        }
    )


def _state() -> dict[str, torch.Tensor]:
    return {
        "l0.weight": torch.zeros(3, 5),
        "l0.bias": torch.zeros(3),
        "l1.weight": torch.zeros(4, 6),
        "l1.bias": torch.zeros(4),
    }


def test_entries_are_normalised_and_indexed_by_permutation() -> None:
    spec = _spec()
    assert spec.axes["l0.weight"] == (PermAxis("P0", 1), None)
    assert spec.perms == ("P0",)
    assert spec.perm_to_axes["P0"] == (
        AxisRef("l0.weight", 0, 1),
        AxisRef("l0.bias", 0, 1),
        AxisRef("l1.weight", 1, 2),
    )


def test_perm_sizes_divides_by_block() -> None:
    assert _spec().perm_sizes(_state()) == {"P0": 3}


def test_perm_sizes_names_both_tensors_when_they_disagree() -> None:
    state = _state() | {"l1.weight": torch.zeros(4, 8)}
    with pytest.raises(SpecCoverageError, match=r"'P0'.*'l0.weight'.*'l1.weight'"):
        _spec().perm_sizes(state)


def test_stray_key_is_named() -> None:
    state = _state() | {"extra.weight": torch.zeros(2)}
    with pytest.raises(SpecCoverageError, match=r"does not cover parameter 'extra.weight'"):
        _spec().check_covers(state)


def test_missing_key_is_named() -> None:
    state = _state()
    del state["l1.bias"]
    with pytest.raises(SpecCoverageError, match=r"lacks parameter 'l1.bias'"):
        _spec().check_covers(state)


def test_wrong_number_of_axes_is_refused() -> None:
    state = _state() | {"l0.bias": torch.zeros(3, 1)}
    with pytest.raises(SpecCoverageError, match=r"'l0.bias' has shape \(3, 1\)"):
        _spec().check_covers(state)


def test_block_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"block 0"):
        PermutationSpec({"w": (PermAxis("P", 0),)})


def test_shape_mismatch_names_parameter_and_both_shapes() -> None:
    a, b = _state(), _state() | {"l1.weight": torch.zeros(4, 7)}
    with pytest.raises(ShapeMismatchError, match=r"'l1.weight'.*\(4, 6\).*\(4, 7\)"):
        check_same_shapes(a, b)
    assert issubclass(ShapeMismatchError, AlignmentError)
    assert issubclass(AlignmentError, ValueError)


def test_different_keys_are_named() -> None:
    b = dict(_state())
    b["l2.weight"] = torch.zeros(1)
    with pytest.raises(ShapeMismatchError, match=r"'l2.weight' is only in the second"):
        check_same_shapes(_state(), b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_value_is_named(bad: float) -> None:
    state = _state()
    state["l0.bias"] = torch.tensor([0.0, bad, 1.0])
    with pytest.raises(NonFiniteWeightsError, match=r"state\['l0.bias'\] holds 1 non-finite"):
        check_finite(state)


def test_finite_state_passes_even_with_huge_values() -> None:
    state = _state() | {"l0.bias": torch.tensor([3e38, 3e38, 3e38])}  # the sum overflows
    check_finite(state)  # must not raise
    assert torch.isfinite(state["l0.bias"]).all()
