"""ZipIt! on models whose answer is known: permuted copies, the model itself, a hand-made matrix."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedmerge.align import (
    apply_permutation,
    permutation_spec_for,
    random_permutation,
    weight_matching,
)
from fedmerge.merge import weighted_average
from fedmerge.merge.zipit import zipit_match, zipit_merge
from fedmerge.models import build_model


def _mlp(seed: int = 0) -> torch.nn.Module:
    return build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(24, 12), seed=seed)


def _cnn() -> torch.nn.Module:
    """Convolutions, then a flatten into linear layers (blocks of H x W entries per channel).

    A large bias of ``fc1`` and rows of ``fc2`` with positive sums keep every ReLU alive on
    the test inputs: a unit that never fires correlates with nothing, so its match would be
    arbitrary.
    """
    model = build_model("simple-cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    with torch.no_grad():
        model.fc1.bias.add_(10.0)
        model.fc2.weight.mul_(torch.sign(model.fc2.weight.sum(1, keepdim=True)))
    return model


def _batches(shape: tuple[int, ...] = (1, 8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return list(torch.split(torch.randn(384, *shape, generator=g), 128))


def _holding(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other


def test_zipit_match_by_hand() -> None:
    # features a0, a1 (model 0), b0, b1 (model 1): a0~b1 0.9, a1~b0 0.8, a0~a1 0.85 (within)
    corr = torch.tensor(
        [[1.0, 0.85, 0.1, 0.9], [0.85, 1.0, 0.8, 0.2], [0.1, 0.8, 1.0, 0.0], [0.9, 0.2, 0.0, 1.0]]
    )
    # beta = 0: no within-model merge; a0 + b1 first, then a1 + b0
    u = zipit_match(corr, 2, alpha=0.3, beta=0.0)
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=u.dtype)
    torch.testing.assert_close(u, expected)
    # beta = 1 gives each model a budget of 1; then a0 + b1 (0.9), and the merged feature's
    # similarities are min(...) * 0.3 = (a1: 0.2 * 0.3, b0: 0 * 0.3); a1 + b0 (0.8) is next
    torch.testing.assert_close(zipit_match(corr, 2, alpha=0.3, beta=1.0), expected)
    # alpha = 1, a0~a1 0.95: a0 + a1 merge first (model 0's budget of 1 is spent); the merged
    # feature's similarities are min(0.1, 0.8) = 0.1 to b0 and min(0.9, 0.2) = 0.2 to b1,
    # b0~b1 is 0: so b1 joins it, and b0 stays alone
    corr2 = corr.clone()
    corr2[0, 1] = corr2[1, 0] = 0.95
    u2 = zipit_match(corr2, 2, alpha=1.0, beta=1.0)
    assert u2.T.tolist() == [[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]


def _naive_match(corr: np.ndarray, num: int, alpha: float, beta: float) -> list[frozenset[int]]:
    """Independent: the greedy rules on a NumPy matrix, a full search of all pairs every step."""
    total = corr.shape[0]
    n = total // num
    sims = corr.astype(float).copy()
    np.fill_diagonal(sims, -np.inf)
    origin = [f // n for f in range(total)]
    members = {f: {f} for f in range(total)}
    budget = [int(((total - n) // num) * beta + 1e-4)] * num
    for model in range(num):
        if budget[model] <= 0:
            for a in range(total):
                for b in range(total):
                    if origin[a] == origin[b] == model:
                        sims[a, b] = -np.inf
    while len(members) > n:
        i, j = sorted(np.unravel_index(int(np.argmax(sims)), sims.shape))
        if not np.isfinite(sims[i, j]):  # every pair masked: the two lowest features left
            i, j = sorted(members)[:2]
        members[i] |= members.pop(j)
        sims[:, i] = np.minimum(sims[:, i], sims[:, j])
        sims[i, :] = np.minimum(sims[i, :], sims[j, :])
        if alpha <= 0:
            for k in members:
                if origin[k] in (origin[i], origin[j]):
                    sims[k, i] = sims[i, k] = -np.inf
        else:
            sims[:, i] *= alpha
            sims[i, :] *= alpha
        sims[i, i] = -np.inf
        sims[j, :] = -np.inf
        sims[:, j] = -np.inf
        if origin[i] == origin[j]:
            budget[origin[i]] -= 1
            if budget[origin[i]] <= 0:
                for a in members:
                    for b in members:
                        if origin[a] == origin[b] == origin[i]:
                            sims[a, b] = -np.inf
    return sorted(frozenset(m) for m in members.values())


@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.125), (0.0, 0.5), (1.0, 1.0), (0.5, 0.0)])
def test_zipit_match_agrees_with_a_full_search(alpha: float, beta: float) -> None:
    g = torch.Generator().manual_seed(7)
    features = torch.randn(3 * 12, 40, generator=g, dtype=torch.float64)
    corr = torch.corrcoef(features)
    u = zipit_match(corr, 3, alpha=alpha, beta=beta)
    got = sorted(frozenset(torch.nonzero(u[:, m]).squeeze(1).tolist()) for m in range(12))
    assert got == _naive_match(corr.numpy(), 3, alpha, beta)


@pytest.mark.parametrize("arch", ["mlp", "simple-cnn"])
def test_zipit_of_permuted_copies_equals_weight_matching_then_averaging(arch: str) -> None:
    model = _mlp() if arch == "mlp" else _cnn()
    spec = permutation_spec_for(model)
    state = model.state_dict()
    perm = random_permutation(spec, state, generator=torch.Generator().manual_seed(3))
    permuted = apply_permutation(spec, perm, state)
    batches = _batches() if arch == "mlp" else _batches((1, 28, 28))
    result = zipit_merge(spec, [model, _holding(model, permuted)], batches)
    found, _ = weight_matching(spec, state, permuted)
    expected = weighted_average([state, apply_permutation(spec, found, permuted)])
    merged = result.states[0]
    for key in state:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)
    assert result.within == dict.fromkeys(spec.perms, 0)


@pytest.mark.parametrize(("copies", "alpha", "beta"), [(2, 0.3, 0.125), (3, 1.0, 0.0)])
def test_zipping_a_model_with_itself_gives_it_back(copies: int, alpha: float, beta: float) -> None:
    # (with three copies and alpha < 1 a merged pair is less similar to the third copy than
    # some features within a model are, so the paper's defaults need not give the model back)
    model = _mlp(1)
    spec = permutation_spec_for(model)
    result = zipit_merge(spec, [model] * copies, _batches(), alpha=alpha, beta=beta)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(result.states[0][key], value, rtol=1e-5, atol=1e-6)
    for m in result.merge.values():
        n = m.shape[0]
        assert m.shape == (n, copies * n)
        torch.testing.assert_close(m.sum(1), torch.ones(n, dtype=m.dtype))


def test_partial_zipping_shares_the_first_layer_and_keeps_the_heads() -> None:
    a, b = _mlp(0), _mlp(1)
    spec = permutation_spec_for(a)
    first = spec.perms[0]
    result = zipit_merge(spec, [a, b], _batches(), stop=1)
    heads = result.states
    trunk = [k for k, axes in spec.axes.items() if axes and {e.perm for e in axes if e} == {first}]
    assert trunk
    for key in trunk:
        assert torch.equal(heads[0][key], heads[1][key])
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    # head i's layers after the trunk are model i's, reading the zipped features through U_i:
    # the unzipped tensors that are not the first consumer are model i's own
    last = [k for k, axes in spec.axes.items() if not any(axes)]
    for key in last:
        assert torch.equal(heads[0][key], a.state_dict()[key])
        assert torch.equal(heads[1][key], b.state_dict()[key])
    out = _holding(a, heads[0])(x)
    assert out.shape == (16, 10) and torch.isfinite(out).all()


def test_zipit_rejects_bad_input() -> None:
    model = _mlp()
    spec = permutation_spec_for(model)
    with pytest.raises(ValueError, match="models: got 1"):
        zipit_merge(spec, [model], _batches())
    with pytest.raises(ValueError, match="stop: got 9"):
        zipit_merge(spec, [model, model], _batches(), stop=9)
    with pytest.raises(ValueError, match="alpha: got 2"):
        zipit_match(torch.eye(4), 2, alpha=2)


def test_partial_zipping_of_permuted_copies_keeps_both_functions() -> None:
    model = _mlp(2)
    spec = permutation_spec_for(model)
    perm = random_permutation(spec, model.state_dict(), generator=torch.Generator().manual_seed(4))
    other = _holding(model, apply_permutation(spec, perm, model.state_dict()))
    heads = zipit_merge(spec, [model, other], _batches(), stop=1).states
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        for head in heads:  # each head reads the zipped first layer through its own U_i
            torch.testing.assert_close(_holding(model, head)(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet20", "vgg11"])
def test_zipit_of_permuted_copies_of_residual_and_batchnorm_networks_keeps_the_function(
    arch: str,
) -> None:
    """ResNet-20 (residual groups) and VGG-11 (BatchNorm): zipping a network with a
    permuted copy of itself gives (up to features whose correlations tie on the zipping
    inputs) the network back, judged by its outputs."""
    model = build_model(arch, input_shape=(1, 16, 16), num_classes=10, seed=0, width=1).eval()
    spec = permutation_spec_for(model, torch.zeros(2, 1, 16, 16))
    state = model.state_dict()
    perm = random_permutation(spec, state, generator=torch.Generator().manual_seed(3))
    other = _holding(model, apply_permutation(spec, perm, state))
    batches = [torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(i))
               for i in range(2)]  # fmt: skip
    result = zipit_merge(spec, [model, other], batches)
    zipped = _holding(model, result.states[0]).eval()
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want, got = model(x), zipped(x)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9
