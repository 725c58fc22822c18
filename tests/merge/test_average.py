"""Tests of fedmerge.merge.average, against hand-worked numbers."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fedmerge.errors import NonFiniteWeightsError, ShapeMismatchError
from fedmerge.merge import weighted_average


def _states() -> list[dict[str, torch.Tensor]]:
    return [
        {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10), "flag": torch.tensor(True)},
        {"w": torch.tensor([5.0, -2.0]), "n": torch.tensor(21), "flag": torch.tensor(False)},
    ]


def test_weights_are_normalised() -> None:
    out = weighted_average(_states(), [1, 3])
    assert_close(out["w"], torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * 2 - 0.75 * 2]))


def test_equal_weights_by_default() -> None:
    assert_close(weighted_average(_states())["w"], torch.tensor([3.0, 0.0]))


@pytest.mark.parametrize(("rule", "expected"), [("mean", 18), ("max", 21), ("first", 10)])
def test_integer_buffers(rule: str, expected: int) -> None:
    out = weighted_average(_states(), [1, 3], integers=rule)  # mean: 2.5 + 15.75 = 18.25
    assert out["n"].dtype == torch.int64
    assert int(out["n"]) == expected
    assert bool(out["flag"]) is True


def test_dtype_is_kept_and_accumulated_in_float32() -> None:
    states = [{"w": torch.tensor([1000.0], dtype=torch.float16)}] + [
        {"w": torch.tensor([0.125], dtype=torch.float16)} for _ in range(7)
    ]
    out = weighted_average(states)
    assert out["w"].dtype == torch.float16
    assert_close(out["w"], torch.tensor([(1000 + 7 * 0.125) / 8], dtype=torch.float16))


def test_zero_weight_ignores_a_state() -> None:
    out = weighted_average(_states(), [0, 2])
    assert_close(out["w"], torch.tensor([5.0, -2.0]))


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1], "got 1 weights for 2"), ([1, -1], "got -1.0"), ([0, 0], "sum to 0"),
     ([1, float("nan")], "got nan")],
)  # fmt: skip
def test_bad_weights(weights: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_average(_states(), weights)


def test_shape_mismatch_names_parameter_and_both_shapes() -> None:
    states = _states()
    states[1]["w"] = torch.zeros(3)
    with pytest.raises(ShapeMismatchError, match=r"'w' has shape \(2,\).*\(3,\)"):
        weighted_average(states)


def test_non_finite_state_is_named() -> None:
    states = _states()
    states[1]["w"] = torch.tensor([1.0, float("inf")])
    with pytest.raises(NonFiniteWeightsError, match=r"states\[1\]\['w'\]"):
        weighted_average(states)


def test_empty_and_unknown_rule() -> None:
    with pytest.raises(ValueError, match="empty"):
        weighted_average([])
    with pytest.raises(ValueError, match="integers: got 'median'"):
        weighted_average(_states(), integers="median")
