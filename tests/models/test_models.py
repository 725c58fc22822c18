"""Tests of fedmerge.models: shapes, trainability, seeding and errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close

from fedmerge.models import MODEL_NAMES, build_model

FASHION = (1, 28, 28)
DIGITS = (1, 8, 8)
BATCH = 6

# (name, width, input shape); simple-cnn needs >= 12x12, so it has no digits case
CASES = [
    (name, width, shape)
    for name in MODEL_NAMES
    for width in (1, 2)
    for shape in (FASHION, DIGITS)
    if not (name == "simple-cnn" and shape == DIGITS)
]


def _ids(case: tuple[str, int, tuple[int, ...]]) -> str:
    name, width, shape = case
    return f"{name}-w{width}-{shape[1]}x{shape[2]}"


def _batch(shape: tuple[int, ...], classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, *shape, generator=g), torch.randint(0, classes, (BATCH,), generator=g)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_output_shape_and_one_sgd_step(case: tuple[str, int, tuple[int, ...]]) -> None:
    name, width, shape = case
    model = build_model(name, input_shape=shape, num_classes=7, width=width, seed=0)
    x, y = _batch(shape, classes=7)
    model.train()
    logits = model(x)
    assert logits.shape == (BATCH, 7)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    for k, p in model.named_parameters():
        assert p.grad is not None, f"{k} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{k} has a non-finite gradient"
    # hand-written SGD step
    lr = 1e-2
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    changed = [k for k, p in model.named_parameters() if not torch.equal(p, before[k])]
    assert changed, "no weight moved"
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    first = loss.item()
    assert after.item() < first, f"loss {first:.4f} -> {after.item():.4f}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_weights_different_seed_different(name: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        return build_model(name, input_shape=FASHION, num_classes=10, seed=seed).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=0, atol=0)
    float_keys = [k for k in a if a[k].is_floating_point() and a[k].numel() > 1]
    differ = [k for k in float_keys if not torch.equal(a[k], c[k])]
    # every randomly initialised weight tensor changes with the seed
    assert any(k.endswith("weight") for k in differ)


def test_seed_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    build_model("mlp", input_shape=DIGITS, num_classes=10, seed=0)
    assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_width_multiplies_hidden_widths() -> None:
    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    mlp1 = build_model("mlp", input_shape=DIGITS, num_classes=10, hidden=(5, 3), width=1)
    mlp2 = build_model("mlp", input_shape=DIGITS, num_classes=10, hidden=(5, 3), width=2)
    # hand count: 64->5->3->10 and 64->10->6->10, weights + biases
    assert count(mlp1) == 64 * 5 + 5 + 5 * 3 + 3 + 3 * 10 + 10
    assert count(mlp2) == 64 * 10 + 10 + 10 * 6 + 6 + 6 * 10 + 10
    cnn2 = build_model("simple-cnn", input_shape=FASHION, num_classes=10, width=2)
    assert cnn2.conv1.out_channels == 12 and cnn2.conv2.out_channels == 32
    # 28 -> conv5 24 -> pool 12 -> conv5 8 -> pool 4: fc1 sees 32 * 4 * 4 inputs
    assert cnn2.fc1.in_features == 32 * 4 * 4 and cnn2.fc1.out_features == 240


def test_mlp_on_vectors() -> None:
    model = build_model("mlp", input_shape=(60,), num_classes=10, seed=0)
    assert model(torch.zeros(3, 60)).shape == (3, 10)


@pytest.mark.parametrize("shape", [DIGITS, (1, 11, 28), (60,)])
def test_simple_cnn_rejects_unsuitable_input(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"model"):
        build_model("simple-cnn", input_shape=shape, num_classes=10)


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_image_models_reject_vectors(name: str) -> None:
    with pytest.raises(ValueError, match=rf"model: {name}"):
        build_model(name, input_shape=(60,), num_classes=10)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"model\.name") as info:
        build_model("transformer", input_shape=FASHION, num_classes=10)
    assert "transformer" in str(info.value) and "resnet20" in str(info.value)


def test_width_below_one_rejected() -> None:
    with pytest.raises(ValueError, match=r"model\.width") as info:
        build_model("mlp", input_shape=DIGITS, num_classes=10, width=0)
    assert "0" in str(info.value)
