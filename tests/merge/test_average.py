"""Tests of fedmerge.merge.average, against hand-worked numbers."""

from __future__ import annotations

import numpy as np
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


def _random_states(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(64, generator=g) * 10, "n": torch.tensor(7 + k)} for k in range(count)
    ]


def test_float64_is_one_rounding_of_the_float64_sum_of_products() -> None:
    states, weights = _random_states(4), [0.1, 0.2, 0.3, 0.4]
    got = weighted_average(states, weights, accumulate="float64", normalise=False)
    # naive: Python floats are IEEE doubles; products summed left to right, rounded once
    values = [s["w"].tolist() for s in states]
    want = [
        ((v[0] * 0.1 + v[1] * 0.2) + v[2] * 0.3) + v[3] * 0.4 for v in zip(*values, strict=True)
    ]
    assert got["w"].dtype == torch.float32
    assert torch.equal(got["w"], torch.tensor(want, dtype=torch.float64).float())


def test_float64_with_equal_weights_divides_the_sum() -> None:
    states = _random_states(3, seed=1)
    got = weighted_average(states, accumulate="float64", integers="first")
    values = [s["w"].tolist() for s in states]
    want = [((a + b) + c) / 3 for a, b, c in zip(*values, strict=True)]
    assert torch.equal(got["w"], torch.tensor(want, dtype=torch.float64).float())
    assert int(got["n"]) == 7


def test_native_computes_in_the_tensors_dtype() -> None:
    states = _random_states(2, seed=2)
    got = weighted_average(states, [0.3, 0.7], accumulate="native", normalise=False)
    # naive float32: each weight rounded to float32, products and sum in float32
    a, b = (s["w"].numpy() for s in states)
    want = np.float32(0.3) * a + np.float32(0.7) * b
    assert want.dtype == np.float32
    assert torch.equal(got["w"], torch.from_numpy(want))


def test_the_arithmetics_differ_in_the_last_bits() -> None:
    states = _random_states(3, seed=3)
    results = [
        weighted_average(states, [0.3, 0.45, 0.25], accumulate=mode, normalise=False)["w"]
        for mode in ("float32", "float64", "native")
    ]
    for result in results:  # all close to the float64 mean ...
        assert_close(result, results[1])
    # ... yet the float64 one is exactly the rounded float64 result
    exact = sum(w * s["w"].double() for w, s in zip([0.3, 0.45, 0.25], states, strict=True))
    assert torch.equal(results[1], exact.float())


def test_unnormalised_weights_are_used_as_given() -> None:
    got = weighted_average(_states(), [2.0, -1.0], normalise=False, integers="first")
    assert_close(got["w"], torch.tensor([-3.0, 6.0]))  # 2 a - b
    with pytest.raises(ValueError, match="weights: got None; allowed with normalise=False"):
        weighted_average(_states(), normalise=False)
    with pytest.raises(ValueError, match="weights: got 1 weights for 2 state dicts"):
        weighted_average(_states(), [1.0], normalise=False)
    with pytest.raises(ValueError, match="weights: got inf; allowed: finite numbers"):
        weighted_average(_states(), [1.0, float("inf")], normalise=False)


def test_check_false_skips_validation() -> None:
    states = _states()
    states[1]["w"] = torch.tensor([float("nan"), 1.0])
    with pytest.raises(NonFiniteWeightsError):
        weighted_average(states)
    got = weighted_average(states, check=False)
    assert torch.isnan(got["w"][0])
    assert_close(got["w"][1], torch.tensor(1.5))
    nan_weight = weighted_average(_states(), [float("nan"), 1.0], normalise=False, check=False)
    assert torch.isnan(nan_weight["w"]).all()


def test_unknown_accumulation_is_refused() -> None:
    with pytest.raises(ValueError, match="accumulate: got 'float16'; allowed: float32, float64"):
        weighted_average(_states(), accumulate="float16")
