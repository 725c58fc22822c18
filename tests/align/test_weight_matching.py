"""Tests of Git Re-Basin weight matching."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedmerge.align import apply_permutation, mlp_spec, weight_matching
from fedmerge.errors import NonFiniteWeightsError, ShapeMismatchError, SpecCoverageError
from fedmerge.models import MLP

from .conftest import Planted


@pytest.mark.parametrize(
    ("name", "width"),
    [("mlp", 1), ("simple-cnn", 1), ("vgg11", 1), ("resnet20", 1), ("resnet20", 4)],
)
def test_recovers_planted_permutation(
    planted: Callable[..., Planted], name: str, width: int
) -> None:
    case = planted(name, width=width, seed=width)
    state_a, state_b = case.model_a.state_dict(), case.model_b.state_dict()
    perm, info = weight_matching(case.spec, state_a, state_b, rng=np.random.default_rng(0))
    assert case.wrong(perm) == []
    assert info.converged
    assert info.iterations >= 2  # the last sweep only confirms


def test_forward_order_without_rng_recovers_too(planted: Callable[..., Planted]) -> None:
    case = planted("resnet20", seed=3)
    perm, info = weight_matching(case.spec, case.model_a.state_dict(), case.model_b.state_dict())
    assert case.wrong(perm) == []
    assert info.converged


def _naive_objective(state_a, state_b, h0, h1) -> float:  # type: ignore[no-untyped-def]
    """Sum of <A, P(B)> written out layer by layer."""
    b = {
        "layers.0.weight": state_b["layers.0.weight"][h0],
        "layers.0.bias": state_b["layers.0.bias"][h0],
        "layers.1.weight": state_b["layers.1.weight"][h1][:, h0],
        "layers.1.bias": state_b["layers.1.bias"][h1],
        "head.weight": state_b["head.weight"][:, h1],
    }
    return float(sum((state_a[k].double() * v.double()).sum() for k, v in b.items()))


def test_result_is_a_coordinatewise_optimum_by_brute_force() -> None:
    a = MLP((2,), 2, hidden=(4, 3))
    b = MLP((2,), 2, hidden=(4, 3))
    state_a, state_b = a.state_dict(), b.state_dict()
    perm, info = weight_matching(mlp_spec(a), state_a, state_b, rng=np.random.default_rng(1))
    h0, h1 = perm["P_layers.0"], perm["P_layers.1"]
    best = _naive_objective(state_a, state_b, h0, h1)
    assert info.objective == pytest.approx(best, rel=1e-5)
    assert best >= _naive_objective(state_a, state_b, torch.arange(4), torch.arange(3)) - 1e-9
    for alt in itertools.permutations(range(4)):
        assert _naive_objective(state_a, state_b, torch.tensor(alt), h1) <= best + 1e-6
    for alt in itertools.permutations(range(3)):
        assert _naive_objective(state_a, state_b, h0, torch.tensor(alt)) <= best + 1e-6


def test_same_seed_same_result_and_init_perm_is_a_fixed_point(
    planted: Callable[..., Planted],
) -> None:
    case = planted("simple-cnn", noise=0.5, seed=7)
    a, b = case.model_a.state_dict(), case.model_b.state_dict()
    p1, _ = weight_matching(case.spec, a, b, rng=np.random.default_rng(3))
    p2, _ = weight_matching(case.spec, a, b, rng=np.random.default_rng(3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    p3, info = weight_matching(case.spec, a, b, init_perm=p1)
    assert all(torch.equal(p1[k], p3[k]) for k in p1)
    assert info.iterations == 1


def test_warns_when_max_iter_runs_out(planted: Callable[..., Planted]) -> None:
    case = planted("resnet20", seed=2)
    with pytest.warns(RuntimeWarning, match=r"raise max_iter"):
        _, info = weight_matching(
            case.spec, case.model_a.state_dict(), case.model_b.state_dict(), max_iter=1
        )
    assert not info.converged
    assert info.iterations == 1


def test_aligned_b_is_closer_to_a(planted: Callable[..., Planted]) -> None:
    case = planted("mlp", noise=0.1)
    a, b = case.model_a.state_dict(), case.model_b.state_dict()
    perm, _ = weight_matching(case.spec, a, b)
    aligned = apply_permutation(case.spec, perm, b)
    dist = sum(float((a[k] - aligned[k]).norm()) for k in a)
    naive = sum(float((a[k] - b[k]).norm()) for k in a)
    assert dist < 0.2 * naive


def test_shape_mismatch_names_parameter_and_both_shapes() -> None:
    a = MLP((2,), 2, hidden=(4, 3)).state_dict()
    b = MLP((2,), 2, hidden=(4, 5)).state_dict()
    with pytest.raises(ShapeMismatchError, match=r"'layers.1.weight'.*\(3, 4\).*\(5, 4\)"):
        weight_matching(mlp_spec(MLP((2,), 2, hidden=(4, 3))), a, b)


def test_non_finite_weight_is_named() -> None:
    model = MLP((2,), 2, hidden=(4, 3))
    a = model.state_dict()
    b = {k: v.clone() for k, v in a.items()}
    b["layers.1.bias"][2] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"state_b\['layers.1.bias'\]"):
        weight_matching(mlp_spec(model), a, b)


def test_spec_of_another_architecture_is_refused() -> None:
    model = MLP((2,), 2, hidden=(4, 3))
    state = model.state_dict() | {"extra.scale": torch.ones(1)}
    with pytest.raises(SpecCoverageError, match=r"'extra.scale'"):
        weight_matching(mlp_spec(model), state, state)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_iter_is_validated(bad: object) -> None:
    model = MLP((2,), 2, hidden=(4,))
    with pytest.raises(ValueError, match=r"max_iter"):
        weight_matching(mlp_spec(model), model.state_dict(), model.state_dict(), max_iter=bad)  # type: ignore[arg-type]


def test_unknown_init_perm_is_named() -> None:
    model = MLP((2,), 2, hidden=(4,))
    state = model.state_dict()
    with pytest.raises(ValueError, match="init_perm: unknown permutation 'P_x'"):
        weight_matching(mlp_spec(model), state, state, init_perm={"P_x": torch.arange(4)})
