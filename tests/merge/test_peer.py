"""One peer's merge step: gossip identity, alignment of permuted copies, renormalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.align import apply_permutation, permutation_spec_for, random_permutation
from fedmerge.merge.peer import consensus_distance, mean_state, peer_merge
from fedmerge.models import build_model


def _model(name="mlp", seed=0):
    shape = (1, 28, 28) if name != "mlp" else (1, 8, 8)
    return build_model(name, input_shape=shape, num_classes=10, width=1, hidden=(32, 16), seed=seed)


def _batches(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, *shape, generator=g) for _ in range(n)]


def test_gossip_of_identical_peers_is_the_identity():
    model = _model()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    merged, info = peer_merge(
        model, own, {1: own, 2: own}, {1: 1 / 3, 2: 1 / 3}, 1 / 3, align="none", reset_bn=False
    )
    for key in own:
        torch.testing.assert_close(merged[key], own[key])
    assert info.moved == {1: 0, 2: 0}


@pytest.mark.parametrize(("name", "align"), [("mlp", "weight"), ("mlp", "activation"),
                                             ("simple-cnn", "weight")])  # fmt: skip
def test_aligning_a_permuted_copy_gives_back_the_original(name, align):
    model = _model(name)
    model.eval()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    spec = permutation_spec_for(model)
    perm = random_permutation(spec, own, generator=torch.Generator().manual_seed(3))
    permuted = apply_permutation(spec, perm, own)
    assert any(not torch.equal(permuted[k], own[k]) for k in own)
    shape = (1, 8, 8) if name == "mlp" else (1, 28, 28)
    merged, info = peer_merge(
        model, own, {1: permuted}, {1: 0.5}, 0.5, align=align, spec=spec,
        batches=_batches(shape), rng=np.random.default_rng(0),
    )  # fmt: skip
    for key in own:  # 0.5 * own + 0.5 * unpermute(permuted) == own
        torch.testing.assert_close(merged[key], own[key], rtol=1e-5, atol=1e-6)
    assert info.moved[1] > 0


def test_missing_neighbours_are_left_out_and_weights_renormalised():
    own, a = _model(seed=0).state_dict(), _model(seed=1).state_dict()
    merged, info = peer_merge(
        _model(), own, {1: a}, {1: 0.25, 2: 0.25}, 0.5, align="none", reset_bn=False
    )
    assert info.weights == {1: pytest.approx(1 / 3)}
    assert info.self_weight == pytest.approx(2 / 3)
    for key in own:
        torch.testing.assert_close(merged[key], (2 * own[key] + a[key]) / 3)


def test_batchnorm_statistics_are_re_estimated_on_local_batches():
    model = build_model("vgg11", input_shape=(1, 8, 8), num_classes=10, seed=0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches((1, 8, 8), n=2)
    merged, info = peer_merge(model, own, {}, {}, 1.0, align="none", batches=batches)
    assert info.bn_reset
    # independent check: first BN layer's running mean is the mean of its inputs' per-channel means
    conv = torch.nn.functional.conv2d
    w, b = own["features.0.weight"], own["features.0.bias"]
    means = torch.stack([conv(x, w, b, padding=1).mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(merged["features.1.running_mean"], means, rtol=1e-4, atol=1e-5)


def test_consensus_distance_naive():
    states = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])},
              {"w": torch.tensor([1.0, 3.0])}]  # fmt: skip
    avg = np.array([1.0, 1.0])
    want = np.mean([np.linalg.norm(np.array(p) - avg) for p in ([0, 0], [2, 0], [1, 3])])
    assert consensus_distance(states) == pytest.approx(want)
    torch.testing.assert_close(mean_state(states)["w"], torch.tensor([1.0, 1.0]))


def test_mix_is_the_float64_sum_rounded_once_and_the_model_is_untouched():
    model = build_model("vgg11", input_shape=(1, 8, 8), num_classes=10, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    own = _model(seed=1).state_dict()
    a, b = _model(seed=2).state_dict(), _model(seed=3).state_dict()
    merged, info = peer_merge(
        _model(), own, {2: b, 1: a}, {1: 0.2, 2: 0.3, 5: 0.4}, 0.1, align="none"
    )
    total = 0.1 + (0.2 + 0.3)
    assert info.weights == {1: 0.2 / total, 2: 0.3 / total}
    for key, value in own.items():  # naive: Python doubles, element by element, neighbours by id
        if not value.is_floating_point():
            assert torch.equal(merged[key], value)
            continue
        want = [
            (x * (0.1 / total) + y * (0.2 / total)) + z * (0.3 / total)
            for x, y, z in zip(
                value.double().flatten().tolist(),
                a[key].double().flatten().tolist(),
                b[key].double().flatten().tolist(),
                strict=True,
            )
        ]
        assert torch.equal(merged[key], torch.tensor(want).reshape(value.shape).to(value.dtype))
    # BatchNorm reset works on a copy: the model passed in keeps its state
    batches = _batches((1, 8, 8), n=2)
    own_bn = {k: v.clone() for k, v in before.items()}
    _, info = peer_merge(model, own_bn, {}, {}, 1.0, align="none", batches=batches)
    assert info.bn_reset
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_mean_state_is_the_float64_mean_rounded_once():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(50, generator=g), "n": torch.tensor(k)} for k in range(3)]
    lists = [s["w"].double().tolist() for s in states]
    want = torch.tensor([((x + y) + z) / 3 for x, y, z in zip(*lists, strict=True)]).float()
    got = mean_state(states)
    assert torch.equal(got["w"], want)
    assert int(got["n"]) == 0
