"""Tests of activation matching and of the activation statistics behind it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fedmerge.align import activation_matching, collect_activation_stats, mlp_spec
from fedmerge.errors import ShapeMismatchError
from fedmerge.models import MLP

from .conftest import Planted


@pytest.mark.parametrize(
    ("name", "width", "shape", "samples"),
    [
        ("mlp", 1, None, 96),
        ("simple-cnn", 1, None, 96),
        ("vgg11", 0.25, None, 96),
        ("resnet20", 1, (3, 16, 16), 64),
        ("resnet20", 4, (3, 8, 8), 32),
    ],
)
def test_recovers_planted_permutation(
    planted: Callable[..., Planted],
    name: str,
    width: float,
    shape: tuple[int, ...] | None,
    samples: int,
) -> None:
    case = planted(name, width=width, he_init=True, samples=samples, shape=shape)
    perm, info = activation_matching(case.spec, case.model_a, case.model_b, case.inputs.split(32))
    assert case.wrong(perm) == []
    assert min(info.similarity.values()) > 0.9


def test_cross_moment_recovers_too(planted: Callable[..., Planted]) -> None:
    case = planted("mlp", he_init=True)
    perm, _ = activation_matching(
        case.spec, case.model_a, case.model_b, [(case.inputs, None)], method="cross-moment"
    )
    assert case.wrong(perm) == []


def test_statistics_match_numpy_on_a_one_layer_mlp() -> None:
    torch.manual_seed(0)
    a, b = MLP((3,), 2, hidden=(5,)), MLP((3,), 2, hidden=(5,))
    x = torch.randn(40, 3)
    stats = collect_activation_stats(mlp_spec(a), a, b, x.split(16))["P_layers.0"]
    with torch.no_grad():
        ha = torch.relu(a.layers[0](x)).double().numpy()
        hb = torch.relu(b.layers[0](x)).double().numpy()
    corr = np.corrcoef(ha.T, hb.T)[:5, 5:]
    assert stats.num_samples == 40
    assert_close(stats.correlation(), torch.from_numpy(corr), rtol=1e-4, atol=1e-5)
    assert_close(stats.cross_moment(), torch.from_numpy(ha.T @ hb / 40))
    sq = ((ha[:, :, None] - hb[:, None, :]) ** 2).mean(0)
    assert_close(stats.sq_distance(), torch.from_numpy(sq))
    mean_a, mean_b = stats.mean_abs()
    assert_close(mean_a, torch.from_numpy(np.abs(ha).mean(0)))
    assert_close(mean_b, torch.from_numpy(np.abs(hb).mean(0)))


def test_flattened_conv_features_use_each_pixel_as_a_sample(
    planted: Callable[..., Planted],
) -> None:
    case = planted("simple-cnn", noise=0.0, he_init=True, samples=8)
    stats = collect_activation_stats(case.spec, case.model_a, case.model_b, [case.inputs])
    assert stats["P_conv2"].num_samples == 8 * 25  # fc1 reads 16 channels x 5 x 5 pixels
    assert stats["P_conv1"].num_samples == 8 * 14 * 14  # conv2 reads the pooled conv1 output
    assert stats["P_fc1"].num_samples == 8


def test_restores_training_mode_and_refuses_bad_input(planted: Callable[..., Planted]) -> None:
    case = planted("mlp")
    case.model_a.train()
    activation_matching(case.spec, case.model_a, case.model_b, [case.inputs])
    assert case.model_a.training and not case.model_b.training
    with pytest.raises(ValueError, match="method: got 'cosine'"):
        activation_matching(case.spec, case.model_a, case.model_b, [case.inputs], method="cosine")
    with pytest.raises(ValueError, match="batches: got no batch"):
        activation_matching(case.spec, case.model_a, case.model_b, [])
    with pytest.raises(ValueError, match="batches: got an item of type str"):
        activation_matching(case.spec, case.model_a, case.model_b, ["x"])


def test_different_widths_are_refused() -> None:
    a, b = MLP((3,), 2, hidden=(5,)), MLP((3,), 2, hidden=(6,))
    with pytest.raises(ShapeMismatchError, match=r"'layers.0.weight'.*\(5, 3\).*\(6, 3\)"):
        activation_matching(mlp_spec(a), a, b, [torch.randn(4, 3)])


def test_sites_fed_the_same_tensor_count_once(planted: Callable[..., Planted]) -> None:
    case = planted("resnet20", noise=0.0, samples=4)
    stats = collect_activation_stats(case.spec, case.model_a, case.model_b, [case.inputs])
    # stream 1 is read by layer1.{0,1,2}.conv1 and layer2.0.conv1/shortcut (one tensor)
    assert len(stats["P_stream1"].sites) == 4
    assert isinstance(case.model_a.layer2[0].shortcut, nn.Sequential)
