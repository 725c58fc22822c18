"""Tests of fedmerge.merge.fusion: one-shot fusion to an anchor, and the ensemble."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fedmerge.align import permutation_spec_for
from fedmerge.merge import consensus_distance
from fedmerge.merge.fusion import (
    FUSION_METHODS,
    align_to_anchor,
    ensemble_accuracy,
    fuse_to_anchor,
)
from fedmerge.models import build_model
from fedmerge.training import TrainConfig, evaluate, train_local


def clusters(n: int = 800, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs in 10-D; 4 classes by two XOR-like sign products (not linear)."""
    x = torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))
    y = (x[:, 0] * x[:, 1] > 0).long() + 2 * (x[:, 2] * x[:, 3] > 0).long()
    return x, y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = clusters()
    model = build_model("mlp", input_shape=(10,), num_classes=4, hidden=(32,), seed=3)
    cfg = TrainConfig(epochs=30, batch_size=32, lr=0.01, optimizer="adam")
    train_local(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    return model, x, y


def permuted_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same function with hidden units shuffled (by hand, not by fedmerge.align)."""
    other = copy.deepcopy(model)
    linears = [m for m in other.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        linears[0].weight.copy_(linears[0].weight[perm])
        linears[0].bias.copy_(linears[0].bias[perm])
        linears[1].weight.copy_(linears[1].weight[:, perm])
    return other


def test_permuted_copy_computes_the_same_function(trained) -> None:
    model, x, _ = trained
    model.eval()
    other = permuted_copy(model, 1)
    other.eval()
    assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["weight", "activation", "ot-weight", "ot-activation"])
def test_aligned_fusion_of_permuted_copies_reaches_the_ensemble_vanilla_does_not(
    trained, method: str
) -> None:
    model, x, y = trained
    other = permuted_copy(model, 1)
    model.eval()
    # the ensemble of two copies of one function predicts what the function predicts
    want = float((model(x).softmax(1).argmax(1) == y).float().mean())
    assert ensemble_accuracy([model, other], x, y) == pytest.approx(want)
    assert want > 0.7
    spec = permutation_spec_for(model, x[:2])
    states = [model.state_dict(), other.state_dict()]
    batches = list(torch.split(x[:256], 128))
    fused = fuse_to_anchor(
        spec, model, states, method=method, batches=batches, rng=np.random.default_rng(0)
    )
    for k, v in model.state_dict().items():
        assert_close(fused[k], v, rtol=1e-5, atol=1e-5, msg=k)
    probe = copy.deepcopy(model)
    probe.load_state_dict(fused)
    assert evaluate(probe, x, y)[1] == pytest.approx(want)
    vanilla = fuse_to_anchor(None, model, states, method="average")
    probe.load_state_dict(vanilla)
    assert evaluate(probe, x, y)[1] < want - 0.1


def test_vanilla_fusion_is_the_weighted_mean(trained) -> None:
    model, _, _ = trained
    a = model.state_dict()
    b = build_model("mlp", input_shape=(10,), num_classes=4, hidden=(32,), seed=8).state_dict()
    fused = fuse_to_anchor(None, model, [a, b], [3.0, 1.0], method="average")
    for k in a:
        assert_close(fused[k], 0.75 * a[k] + 0.25 * b[k])


def test_ensemble_averages_probabilities_not_votes() -> None:
    """Two members: one sure of class 0, one mildly for class 1; the mean says 0."""

    class Fixed(nn.Module):
        def __init__(self, logits: list[float]) -> None:
            super().__init__()
            self.logits = nn.Parameter(torch.tensor(logits))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(len(x), -1)

    x, y = torch.zeros(3, 1), torch.tensor([0, 0, 1])
    members = [Fixed([5.0, 0.0]), Fixed([0.0, 0.5])]
    assert ensemble_accuracy(members, x, y) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="^models: got none"):
        ensemble_accuracy([], x, y)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "mean"}, "^method: got 'mean'; allowed: average, weight"),
        ({"method": "weight"}, "^spec: got None; required with method 'weight'"),
        ({"method": "average", "anchor": 2}, "^anchor: got 2; allowed: 0 to 1"),
    ],
)
def test_bad_arguments_are_named(trained, kwargs: dict, message: str) -> None:
    model, _, _ = trained
    s = model.state_dict()
    with pytest.raises(ValueError, match=message):
        fuse_to_anchor(None, model, [s, s], **kwargs)


def test_every_method_is_covered() -> None:
    assert set(FUSION_METHODS) == {"average", "weight", "activation", "ot-weight", "ot-activation"}


def test_permuted_peers_are_in_consensus_once_aligned(trained) -> None:
    """Three copies of one function in three unit orders: raw distance > 0, aligned 0."""
    model, x, _ = trained
    states = [model.state_dict(), permuted_copy(model, 1).state_dict(),
              permuted_copy(model, 2).state_dict()]  # fmt: skip
    assert consensus_distance(states) > 1.0
    aligned = align_to_anchor(permutation_spec_for(model, x[:2]), states)
    for state in aligned:
        for k, v in model.state_dict().items():
            assert_close(state[k], v)
    assert consensus_distance(aligned) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"^anchor: got 3; allowed: 0 to 2$"):
        align_to_anchor(permutation_spec_for(model, x[:2]), states, anchor=3)
