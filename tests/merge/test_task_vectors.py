"""Task arithmetic and TIES-Merging against hand-worked cases and a naive loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmerge.merge import task_arithmetic, ties_merge, trim_mask


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(3, 2, 2, generator=g),
        "conv.bias": torch.randn(3, generator=g),
        "bn.running_mean": torch.randn(3, generator=g),
        "bn.running_var": torch.rand(3, generator=g) + 0.1,
        "bn.num_batches_tracked": torch.tensor(seed + 3),
        "fc.weight": torch.randn(2, 3, generator=g),
    }


def test_task_arithmetic_by_hand() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    states = [
        {"w": torch.tensor([3.0, 2.0]), "n": torch.tensor(6)},
        {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(10)},
    ]
    # weights 1 and 3 -> 0.25, 0.75; deltas (2, 0) and (0, -4): sum (0.5, -3); scale 0.5
    out = task_arithmetic(base, states, [1.0, 3.0], scale=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([1.25, 0.5]))
    assert out["n"].item() == 9  # round(0.25 * 6 + 0.75 * 10) = round(9.0)
    # the paper's sum: base + 2 * ((2, 0) + (0, -4))
    out = task_arithmetic(base, states, scale=2.0, normalise=False)
    torch.testing.assert_close(out["w"], torch.tensor([5.0, -6.0]))


def test_task_arithmetic_against_numpy_and_bn_rules() -> None:
    base, states, w = _state(0), [_state(1), _state(2), _state(3)], [1.0, 2.0, 5.0]
    share = np.array(w) / sum(w)
    out = task_arithmetic(base, states, w, scale=0.7)
    merged = task_arithmetic(base, states, w, scale=0.7, bn_stats="merge")
    for name, ref in base.items():
        b = ref.double().numpy()
        deltas = [s[name].double().numpy() - b for s in states]
        formula = b + 0.7 * sum(c * d for c, d in zip(share, deltas, strict=True))
        mean = sum(c * s[name].double().numpy() for c, s in zip(share, states, strict=True))
        if name.endswith("num_batches_tracked"):
            assert out[name].item() == round(float(mean))
        elif name.startswith("bn.running"):
            np.testing.assert_allclose(out[name].numpy(), mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(merged[name].numpy(), formula, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(out[name].numpy(), formula, rtol=1e-5, atol=1e-6)
        assert out[name].dtype == ref.dtype


def test_task_arithmetic_rejects_bad_scale() -> None:
    with pytest.raises(ValueError, match="scale: got nan"):
        task_arithmetic(_state(0), [_state(1)], scale=math.nan)


def test_trim_keeps_the_top_share_by_magnitude() -> None:
    delta = torch.tensor([0.5, -3.0, 2.0, -0.1, 1.0])
    assert trim_mask(delta, 0.4).tolist() == [False, True, True, False, False]
    assert trim_mask(delta, 0.5).tolist() == [False, True, True, False, True]  # ceil(2.5) = 3
    assert trim_mask(delta, 1.0).all()


def test_ties_by_hand() -> None:
    base = {"w": torch.ones(5)}
    taus = [
        [3.0, -1.0, 0.5, -4.0, 2.0],  # trimmed to (3, 0, 0, -4, 0)
        [-2.0, 1.0, 5.0, -1.0, 7.0],  # trimmed to (0, 0, 5, 0, 7)
        [1.0, 2.0, -3.0, 0.5, -6.0],  # trimmed to (0, 0, -3, 0, -6)
    ]
    states = [{"w": 1.0 + torch.tensor(t)} for t in taus]
    # sums (3, 0, 2, -4, 1): signs (+, 0, +, -, +); the 0 takes the majority sign +.
    # Disjoint means: 3, nothing agrees -> 0, 5 (the -3 disagrees), -4, 7 (the -6 disagrees).
    out = ties_merge(base, states, density=0.4, scale=0.5)
    torch.testing.assert_close(out["w"], 1.0 + 0.5 * torch.tensor([3.0, 0.0, 5.0, -4.0, 7.0]))


def test_ties_trim_scope_model_versus_tensor() -> None:
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    state = {"a": torch.tensor([10.0, 1.0]), "b": torch.tensor([2.0, 9.0, 3.0])}
    model = ties_merge(base, [state], density=0.4)  # 2 of 5 entries: 10 and 9
    torch.testing.assert_close(model["a"], torch.tensor([10.0, 0.0]))
    torch.testing.assert_close(model["b"], torch.tensor([0.0, 9.0, 0.0]))
    tensor = ties_merge(base, [state], density=0.4, trim_scope="tensor")  # 1 of 2, 2 of 3
    torch.testing.assert_close(tensor["a"], torch.tensor([10.0, 0.0]))
    torch.testing.assert_close(tensor["b"], torch.tensor([0.0, 9.0, 3.0]))


def _naive_ties(base, states, weights, density, scale, scope):
    """Independent: float64 NumPy, explicit loops over parameters and models."""
    names = [n for n, t in base.items() if t.is_floating_point() and "running" not in n]
    k = len(states)
    w = np.ones(k) if weights is None else np.array(weights, dtype=float)
    deltas = [
        np.concatenate([s[n].double().numpy().ravel() - base[n].double().numpy().ravel()
                        for n in names])
        for s in states
    ]  # fmt: skip
    sizes = [base[n].numel() for n in names]
    groups = [list(range(sum(sizes)))]
    if scope == "tensor":
        starts = np.cumsum([0, *sizes])
        groups = [list(range(starts[i], starts[i + 1])) for i in range(len(sizes))]
    trimmed = []
    for d in deltas:
        t = np.zeros_like(d)
        for group in groups:
            keep = math.ceil(density * len(group))
            order = sorted(group, key=lambda i: -abs(d[i]))
            threshold = abs(d[order[keep - 1]])
            for i in group:
                if abs(d[i]) >= threshold:
                    t[i] = d[i]
        trimmed.append(t)
    elected = [np.sign(sum(w[j] * trimmed[j][p] for j in range(k))) for p in range(len(d))]
    majority = np.sign(sum(elected))
    merged = np.zeros(len(d))
    for p in range(len(d)):
        sign = elected[p] if elected[p] != 0 else majority
        num = den = 0.0
        for j in range(k):
            if trimmed[j][p] != 0 and np.sign(trimmed[j][p]) == sign:
                num += w[j] * trimmed[j][p]
                den += w[j]
        merged[p] = num / den if den > 0 else 0.0
    out, start = {}, 0
    for n, size in zip(names, sizes, strict=True):
        out[n] = base[n].double().numpy() + scale * merged[start : start + size].reshape(
            base[n].shape
        )
        start += size
    return out


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("weights", [None, [1.0, 4.0, 2.0, 3.0]])
def test_ties_against_naive_loop(scope: str, weights: list[float] | None) -> None:
    base, states = _state(0), [_state(s) for s in (1, 2, 3, 4)]
    out = ties_merge(base, states, weights, density=0.3, scale=0.8, trim_scope=scope)
    expected = _naive_ties(base, states, weights, 0.3, 0.8, scope)
    for name, value in expected.items():
        np.testing.assert_allclose(out[name].numpy(), value, rtol=1e-5, atol=1e-6)
    w = np.ones(4) / 4 if weights is None else np.array(weights) / sum(weights)
    mean_var = sum(c * s["bn.running_var"].double().numpy() for c, s in zip(w, states, strict=True))
    np.testing.assert_allclose(out["bn.running_var"].numpy(), mean_var, rtol=1e-6)


def test_ties_with_full_density_and_agreeing_signs_is_the_mean_delta() -> None:
    base = {"w": torch.zeros(3)}
    states = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([3.0, 4.0, 5.0])}]
    out = ties_merge(base, states, density=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 3.0, 4.0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"density": 0.0}, "density: got 0.0"), ({"density": 1.5}, "density: got 1.5"),
     ({"trim_scope": "row"}, "trim_scope: got 'row'"), ({"bn_stats": "x"}, "bn_stats: got 'x'")],
)  # fmt: skip
def test_ties_rejects_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ties_merge(_state(0), [_state(1)], **kwargs)  # type: ignore[arg-type]
