"""Tests of the built-in permutation specs: coverage, function preservation, tracing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fedmerge.align import (
    PermutationSpec,
    apply_permutation,
    count_moved_units,
    infer_permutation_spec,
    permutation_spec_for,
    random_permutation,
)
from fedmerge.models import MLP, build_model, example_input

from .conftest import BUILTIN

CASES = [(name, 1) for name in BUILTIN] + [("resnet20", 2), ("simple-cnn", 2), ("mlp", 3)]


def _groups(spec: PermutationSpec) -> set[frozenset[tuple[str, int, int]]]:
    """The spec up to the names of its permutations."""
    return {frozenset(tuple(r) for r in refs) for refs in spec.perm_to_axes.values()}


def _model(name: str, width: int) -> tuple[nn.Module, torch.Tensor]:
    shape = BUILTIN[name]
    model = build_model(name, input_shape=shape, num_classes=10, width=width, seed=1)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(2))
    return model, x


@pytest.mark.parametrize(("name", "width"), CASES)
def test_random_permutation_preserves_function(name: str, width: int) -> None:
    model, x = _model(name, width)
    with torch.no_grad():  # give BatchNorm non-trivial running statistics first
        model.train()
        model(x)
    model.eval()
    spec = permutation_spec_for(model)
    state = model.state_dict()
    perm = random_permutation(spec, state, generator=torch.Generator().manual_seed(4))
    permuted = apply_permutation(spec, perm, state)
    assert all(moved > 0 for moved in count_moved_units(perm).values())
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    expected = model(x)
    model.load_state_dict(permuted)
    assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_hand_written_spec_equals_traced_spec(name: str) -> None:
    model, x = _model(name, 1)
    hand = permutation_spec_for(model)
    traced = infer_permutation_spec(model, x)
    assert hand.axes.keys() == traced.axes.keys() == model.state_dict().keys()
    assert _groups(hand) == _groups(traced)


def test_resnet_streams_are_shared() -> None:
    model, _ = _model("resnet20", 1)
    spec = permutation_spec_for(model)
    stream1 = {r.key for r in spec.perm_to_axes["P_stream1"]}
    # stem, every block's conv2/bn2 of stage 1, and the readers of the stream
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv2.weight", "layer1.2.bn2.running_mean",
            "layer1.1.conv1.weight", "layer2.0.conv1.weight",
            "layer2.0.shortcut.0.weight"} <= stream1  # fmt: skip
    assert len(spec.perms) == 3 + 9
    assert spec.axes["linear.weight"] == (None, spec.axes["layer3.2.conv2.weight"][0])


def test_simple_cnn_flatten_block() -> None:
    model, _ = _model("simple-cnn", 1)
    spec = permutation_spec_for(model)
    assert spec.axes["fc1.weight"][1] == ("P_conv2", 25)  # 16 channels of 5x5 pixels


def test_custom_model_needs_example_input() -> None:
    with pytest.raises(ValueError, match="example_input"):
        permutation_spec_for(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))


def test_example_input_is_positional_and_ignored_for_built_in_models() -> None:
    model, _ = _model("mlp", 1)
    hand = permutation_spec_for(model)
    with_input = permutation_spec_for(model, example_input(BUILTIN["mlp"]))
    assert with_input.axes == hand.axes
    assert hand.perms == ("P_layers.0", "P_layers.1")


def test_a_subclass_of_a_built_in_model_is_traced() -> None:
    class WiderHead(MLP):
        """Same layers, another forward pass: the hand-written spec cannot know it."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.flatten(x, 1)
            h = torch.relu(self.layers[0](x))
            return self.head(torch.relu(self.layers[1](h)) * 2)

    torch.manual_seed(0)
    model = WiderHead((1, 4, 4), 3, hidden=(5, 6))
    with pytest.raises(ValueError, match="example_input: got None for model WiderHead"):
        permutation_spec_for(model)
    spec = permutation_spec_for(model, example_input((1, 4, 4)))
    # traced names follow the producing module, unlike the hand-written P_layers.<i>
    assert spec.axes["layers.1.weight"][1] == spec.axes["layers.0.weight"][0]
    assert spec.axes["head.weight"] == (None, spec.axes["layers.1.weight"][0])
    assert len(spec.perms) == 2
