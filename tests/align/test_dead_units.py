"""Tests of activation matching's tie-break for units that are dead on the alignment data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedmerge.align import apply_permutation, permutation_spec_for
from fedmerge.align.activation_matching import activation_matching, unit_weight_similarity
from fedmerge.models import build_model


def model_with_dead_units(dead: int = 4) -> nn.Module:
    """An MLP 5-12-3 whose first ``dead`` hidden units never fire on inputs in [0, 1]."""
    model = build_model("mlp", input_shape=(5,), num_classes=3, hidden=(12,), seed=0)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        first.weight[:dead] = -torch.rand(dead, 5, generator=g) - 0.1
        first.bias[:dead] = -1.0
        first.bias[dead:] = first.bias[dead:].abs() + 0.5  # the others fire on some inputs
    return model


def permuted(model: nn.Module, perm: torch.Tensor) -> nn.Module:
    """Hidden unit i of the copy is unit perm[i] of ``model`` (written by hand)."""
    other = copy.deepcopy(model)
    lin = [m for m in other.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        lin[0].weight.copy_(lin[0].weight[perm])
        lin[0].bias.copy_(lin[0].bias[perm])
        lin[1].weight.copy_(lin[1].weight[:, perm])
    return other


@pytest.fixture
def pair() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    a = model_with_dead_units()
    b = permuted(a, torch.randperm(12, generator=torch.Generator().manual_seed(3)))
    x = torch.rand(64, 5, generator=torch.Generator().manual_seed(4))
    first = next(m for m in a.modules() if isinstance(m, nn.Linear))
    assert (torch.relu(first(x))[:, :4] == 0).all()  # the 4 units are dead on these inputs
    assert (torch.relu(first(x))[:, 4:] > 0).any(dim=0).all()  # the others fire
    return a, b, [x]


def test_dead_units_are_matched_by_their_weights(pair) -> None:
    a, b, batches = pair
    spec = permutation_spec_for(a, batches[0][:2])
    perm, info = activation_matching(spec, a, b, batches, dead_units="weights")
    assert set(info.dead.values()) == {(4, 4)}
    aligned = apply_permutation(spec, perm, b.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(aligned[k], v), k


def test_arbitrary_pairing_of_dead_units_misses_some(pair) -> None:
    a, b, batches = pair
    spec = permutation_spec_for(a, batches[0][:2])
    perm, _ = activation_matching(spec, a, b, batches, dead_units="arbitrary")
    aligned = apply_permutation(spec, perm, b.state_dict())
    key = next(k for k in aligned if k.endswith("weight"))
    rows_equal = [torch.equal(aligned[key][i], a.state_dict()[key][i]) for i in range(12)]
    assert all(rows_equal[4:])  # live units: matched by their activations either way
    assert not all(rows_equal[:4])


def test_unit_weight_similarity_is_the_cosine_of_rows_and_biases() -> None:
    a = model_with_dead_units()
    b = build_model("mlp", input_shape=(5,), num_classes=3, hidden=(12,), seed=9)
    spec = permutation_spec_for(a, torch.zeros(2, 5))
    name = next(iter(spec.perms))
    sim = unit_weight_similarity(spec, name, a.state_dict(), b.state_dict())
    la = next(m for m in a.modules() if isinstance(m, nn.Linear))
    lb = next(m for m in b.modules() if isinstance(m, nn.Linear))
    fa = torch.cat([la.weight, la.bias[:, None]], 1).detach().double()
    fb = torch.cat([lb.weight, lb.bias[:, None]], 1).detach().double()
    want = (fa / fa.norm(dim=1, keepdim=True)) @ (fb / fb.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(sim, want)


def test_bad_rule_is_one_line(pair) -> None:
    a, b, batches = pair
    spec = permutation_spec_for(a, batches[0][:2])
    message = r"^dead_units: got 'random'; allowed: weights, arbitrary$"
    with pytest.raises(ValueError, match=message):
        activation_matching(spec, a, b, batches, dead_units="random")
