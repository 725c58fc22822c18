"""Tests of OT alignment and fusion (OTFusion)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.testing import assert_close

from fedmerge.align import (
    apply_permutation,
    apply_transport,
    collect_activation_stats,
    mlp_spec,
    ot_align,
    ot_fuse,
    transport_to_permutation,
)
from fedmerge.errors import ShapeMismatchError
from fedmerge.models import MLP
from tests.fresh_python import run_fresh

from .conftest import Planted


@pytest.mark.parametrize("name", ["mlp", "simple-cnn", "resnet20"])
def test_exact_emd_equal_widths_gives_the_planted_permutation_matrix(
    planted: Callable[..., Planted], name: str
) -> None:
    case = planted(name)
    a, b = case.model_a.state_dict(), case.model_b.state_dict()
    plans, info = ot_align(case.spec, a, b)
    assert info.order[0] == case.spec.perms[0]
    for perm_name, plan in plans.items():
        n = plan.shape[0]
        # a permutation matrix divided by n: n ones of mass 1/n, zeros elsewhere
        assert int((plan > 0).sum()) == n
        assert_close(plan[plan > 0], torch.full((n,), 1.0 / n, dtype=plan.dtype))
        assert torch.equal(transport_to_permutation(plan), case.answer[perm_name])
    moved = apply_transport(case.spec, plans, b)
    expected = apply_permutation(case.spec, case.answer, b)
    for key, value in expected.items():
        assert_close(moved[key], value)


@pytest.mark.parametrize(("name", "shape"), [("mlp", None), ("resnet20", (3, 16, 16))])
def test_activation_cost_recovers_the_planted_permutation(
    planted: Callable[..., Planted], name: str, shape: tuple[int, ...] | None
) -> None:
    case = planted(name, he_init=True, samples=64, shape=shape)
    stats = collect_activation_stats(case.spec, case.model_a, case.model_b, [case.inputs])
    a, b = case.model_a.state_dict(), case.model_b.state_dict()
    plans, _ = ot_align(case.spec, a, b, cost="activation", activations=stats)
    assert case.wrong({k: transport_to_permutation(p) for k, p in plans.items()}) == []
    plans, _ = ot_align(case.spec, a, b, marginals="activation", activations=stats)
    assert case.wrong({k: p.argmax(0) for k, p in plans.items()}) == []


def test_sinkhorn_gives_soft_plans_with_the_right_marginals(
    planted: Callable[..., Planted],
) -> None:
    case = planted("mlp")
    a, b = case.model_a.state_dict(), case.model_b.state_dict()
    plans, _ = ot_align(case.spec, a, b, solver="sinkhorn", reg=0.1)
    for name, plan in plans.items():
        n = plan.shape[0]
        assert bool((plan > 0).all())  # entropic plans are dense
        assert_close(plan.sum(0), torch.full((n,), 1.0 / n, dtype=plan.dtype), atol=1e-6, rtol=1e-3)
        assert_close(plan.sum(1), torch.full((n,), 1.0 / n, dtype=plan.dtype), atol=1e-6, rtol=1e-3)
        assert torch.equal(plan.argmax(0), case.answer[name])


def _duplicated(a: MLP, perm0: torch.Tensor, perm1: torch.Tensor) -> MLP:
    """An MLP twice as wide computing A's function: every unit copied, outgoing weights halved."""
    n_in, (h0, h1) = a.layers[0].in_features, (a.layers[0].out_features, a.layers[1].out_features)
    b = MLP((n_in,), a.head.out_features, hidden=(2 * h0, 2 * h1))
    d0 = torch.arange(h0).repeat_interleave(2)[perm0]
    d1 = torch.arange(h1).repeat_interleave(2)[perm1]
    with torch.no_grad():
        b.layers[0].weight.copy_(a.layers[0].weight[d0])
        b.layers[0].bias.copy_(a.layers[0].bias[d0])
        b.layers[1].weight.copy_(a.layers[1].weight[d1][:, d0] / 2)
        b.layers[1].bias.copy_(a.layers[1].bias[d1])
        b.head.weight.copy_(a.head.weight[:, d1] / 2)
        b.head.bias.copy_(a.head.bias)
    return b


def test_fuses_a_wider_model_into_a_narrower_one_exactly() -> None:
    torch.manual_seed(0)
    a = MLP((4,), 3, hidden=(3, 2))
    b = _duplicated(a, torch.randperm(6), torch.randperm(4))
    x = torch.randn(10, 4)
    assert_close(b(x), a(x))  # the construction is right
    spec = mlp_spec(a)
    plans, _ = ot_align(spec, a.state_dict(), b.state_dict())
    assert plans["P_layers.0"].shape == (6, 3)
    moved = apply_transport(spec, plans, b.state_dict())
    for key, value in a.state_dict().items():
        assert_close(moved[key], value)
    fused = ot_fuse(spec, a.state_dict(), b.state_dict(), weight_a=0.3)
    for key, value in a.state_dict().items():
        assert_close(fused[key], value)
    # OTFusion's reference rule averages the columns of merged units: half the head weight
    mean_rule = apply_transport(spec, plans, b.state_dict(), inputs="mean")
    assert_close(mean_rule["head.weight"], a.head.weight.detach() / 2)


def test_fuses_a_narrower_model_into_a_wider_one_exactly() -> None:
    torch.manual_seed(1)
    narrow = MLP((4,), 3, hidden=(3, 2))
    wide = _duplicated(narrow, torch.randperm(6), torch.randperm(4))
    spec = mlp_spec(wide)
    plans, _ = ot_align(spec, wide.state_dict(), narrow.state_dict())
    assert plans["P_layers.1"].shape == (2, 4)
    moved = apply_transport(spec, plans, narrow.state_dict())
    for key, value in wide.state_dict().items():
        assert_close(moved[key], value)


def test_fusing_a_permuted_copy_returns_the_original(planted: Callable[..., Planted]) -> None:
    case = planted("simple-cnn", noise=0.0)
    a, b = case.model_a.state_dict(), case.model_b.state_dict()
    fused = ot_fuse(case.spec, a, b)
    for key, value in a.items():
        assert_close(fused[key], value)


def test_options_are_validated(planted: Callable[..., Planted]) -> None:
    case = planted("mlp")
    a, b = case.model_a.state_dict(), case.model_b.state_dict()
    with pytest.raises(ValueError, match="solver: got 'lp'"):
        ot_align(case.spec, a, b, solver="lp")
    with pytest.raises(ValueError, match="reg: got 0"):
        ot_align(case.spec, a, b, solver="sinkhorn", reg=0)
    with pytest.raises(ValueError, match="activations: got None"):
        ot_align(case.spec, a, b, cost="activation")
    with pytest.raises(ValueError, match="marginals: got 'x'"):
        ot_align(case.spec, a, b, marginals="x")
    with pytest.raises(ValueError, match="weight_a: got 2"):
        ot_fuse(case.spec, a, b, weight_a=2)
    with pytest.raises(ValueError, match="not a permutation matrix"):
        transport_to_permutation(torch.full((3, 3), 1 / 9))


def test_mismatch_on_an_unpermuted_axis_names_parameter_and_shapes() -> None:
    a, b = MLP((4,), 3, hidden=(5,)), MLP((4,), 2, hidden=(6,))
    with pytest.raises(ShapeMismatchError, match=r"'head.weight'.*\(3, 5\).*\(2, 6\)"):
        ot_align(mlp_spec(a), a.state_dict(), b.state_dict())


def test_a_plan_is_solved_without_importing_scikit_learn() -> None:
    """POT would import scikit-learn and pandas (about 1 s of CPU) for what fedmerge never uses.

    In a fresh process: the exact plan between two point sets that are a
    shuffle of each other is that shuffle (an independent answer), neither
    scikit-learn nor pandas was imported to solve it, and scikit-learn still
    imports afterwards.
    """
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from fedmerge.align.optimal_transport import _solve\n"
        "rng = np.random.default_rng(0)\n"
        "a = rng.normal(size=(6, 3)); perm = rng.permutation(6); b = a[perm]\n"
        "cost = ((a[:, None] - b[None]) ** 2).sum(-1)\n"
        "plan = _solve(cost, np.full(6, 1 / 6), np.full(6, 1 / 6), 'emd', 0.0, None)\n"
        "hidden = [m in sys.modules for m in ('sklearn', 'pandas')]\n"
        "import sklearn.cluster\n"
        "print(plan.argmax(1).tolist() == np.argsort(perm).tolist(), hidden)\n"
    )
    out = run_fresh(code)
    assert out.split() == ["True", "[False,", "False]"], out
