"""Tests of torch.fx spec inference on user-defined modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from fedmerge.align import apply_permutation, infer_permutation_spec, random_permutation
from fedmerge.errors import UntraceableModelError


class ResidualMLP(nn.Module):
    """Linear stem, two pre-norm residual blocks with GELU, LayerNorm head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(2))
        self.ups = nn.ModuleList(nn.Linear(8, 16) for _ in range(2))
        self.downs = nn.ModuleList(nn.Linear(16, 8) for _ in range(2))
        self.final = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for norm, up, down in zip(self.norms, self.ups, self.downs, strict=True):
            h = h + down(F.gelu(up(norm(h))))
        return self.head(self.final(h).relu())


class TinyResCNN(nn.Module):
    """Conv stem, GroupNorm, a residual block with a 1x1 shortcut, view-flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(1, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.shortcut = nn.Conv2d(4, 6, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + self.shortcut(h))
        h = self.pool(h)
        h = h.view(h.size(0), -1)
        h = self.fc(h) * 2.0
        return self.out(torch.sigmoid(h)) + h.mean(dim=1, keepdim=True)


def _check(model: nn.Module, x: torch.Tensor) -> None:
    spec = infer_permutation_spec(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perm = random_permutation(spec, state, generator=torch.Generator().manual_seed(1))
    model.eval()
    expected = model(x)
    model.load_state_dict(apply_permutation(spec, perm, state))
    assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_residual_mlp_stream_and_function() -> None:
    torch.manual_seed(0)
    model, x = ResidualMLP(), torch.randn(5, 6)
    spec = infer_permutation_spec(model, x)
    # one stream (stem, both downs, all norms, head input) and one group per up
    assert len(spec.perms) == 3
    stream = spec.axes["stem.weight"][0]
    assert stream is not None
    for key in ("downs.0.weight", "downs.1.bias", "norms.1.weight", "final.bias"):
        assert spec.axes[key][0] == stream
    assert spec.axes["ups.1.weight"][1] == stream
    assert spec.axes["head.weight"] == (None, stream)
    assert spec.axes["head.bias"] == (None,)
    _check(model, x)


def test_residual_cnn_with_view_flatten_and_groupnorm() -> None:
    torch.manual_seed(0)
    model, x = TinyResCNN(), torch.randn(3, 2, 4, 4)
    spec = infer_permutation_spec(model, x)
    stream = spec.axes["conv2.weight"][0]
    assert spec.axes["shortcut.weight"][0] == stream
    assert spec.axes["bn2.running_var"] == (stream,)
    assert spec.axes["gn.weight"] == spec.axes["conv1.bias"]
    assert spec.axes["fc.weight"][1] == (stream.perm, 4)  # 6 channels of 2x2 pixels
    # the mean over fc's units is invariant to their order, so fc is permuted
    assert spec.axes["out.weight"] == (None, spec.axes["fc.weight"][0])
    assert spec.axes["fc.weight"][0] is not None
    _check(model, x)


class ReturnsFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.fc3(h), h


def test_units_reaching_the_output_stay_in_place() -> None:
    model, x = ReturnsFeatures(), torch.randn(2, 3)
    spec = infer_permutation_spec(model, x)
    assert spec.axes["fc2.weight"] == (None, spec.axes["fc1.weight"][0])
    assert spec.axes["fc3.weight"] == (None, None)
    assert spec.perms == (spec.axes["fc1.weight"][0].perm,)


class ControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_untraceable_module_is_named() -> None:
    with pytest.raises(UntraceableModelError, match=r"module 'body' \(Gate\).*control flow"):
        infer_permutation_spec(ControlFlow(), torch.randn(2, 3))


class Cumulative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.cumsum(self.fc1(x), dim=1))


def test_unsupported_operation_is_named() -> None:
    with pytest.raises(UntraceableModelError, match=r"operation 'cumsum'"):
        infer_permutation_spec(Cumulative(), torch.randn(2, 3))


def test_groupnorm_with_groups_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 1, 1))
    with pytest.raises(UntraceableModelError, match=r"module '1' \(GroupNorm\).*2 groups"):
        infer_permutation_spec(model, torch.randn(2, 1, 3, 3))


def test_grouped_conv_on_permuted_input_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UntraceableModelError, match=r"module '2' \(Conv2d\).*groups=2"):
        infer_permutation_spec(model, torch.randn(2, 1, 5, 5))


class AddsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.offset = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) + self.offset)


def test_unpermuted_tensor_along_units_is_refused() -> None:
    with pytest.raises(UntraceableModelError, match="unpermuted tensor along the units"):
        infer_permutation_spec(AddsParameter(), torch.randn(2, 3))


def test_training_flags_are_restored() -> None:
    model = ResidualMLP().train()
    infer_permutation_spec(model, torch.randn(2, 6))
    assert all(m.training for m in model.modules())
