"""Tests of fedmerge.models: shapes, trainability, seeding and errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close

from fedmerge.models import (
    MLP,
    MODEL_NAMES,
    VGG11,
    ModelConfig,
    ResNet20,
    SimpleCNN,
    build_model,
    build_model_from_config,
    model_names,
)

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
    with pytest.raises(ValueError, match=r"^input_shape: got \(.*\); allowed for simple-cnn"):
        build_model("simple-cnn", input_shape=shape, num_classes=10)


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_image_models_reject_vectors(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^input_shape: got \(60,\); allowed for {name}: image"):
        build_model(name, input_shape=(60,), num_classes=10)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError) as info:
        build_model("transformer", input_shape=FASHION, num_classes=10)
    assert str(info.value) == ("name: got 'transformer'; allowed: mlp, resnet20, simple-cnn, vgg11")


def test_width_below_one_rejected() -> None:
    with pytest.raises(ValueError) as info:
        build_model("mlp", input_shape=DIGITS, num_classes=10, width=0)
    assert str(info.value) == "width: got 0; allowed: an integer >= 1"


def test_mlp_rejects_empty_hidden() -> None:
    with pytest.raises(ValueError, match=r"^hidden: got an empty list"):
        build_model("mlp", input_shape=DIGITS, num_classes=10, hidden=())


def test_model_names_are_the_sorted_built_ins() -> None:
    assert model_names() == MODEL_NAMES == ("mlp", "resnet20", "simple-cnn", "vgg11")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_from_config_equals_build_by_name(name: str) -> None:
    config = ModelConfig(name=name, width=2, hidden=(7, 3))
    a = build_model_from_config(config, input_shape=FASHION, num_classes=10, seed=5)
    b = build_model(name, input_shape=FASHION, num_classes=10, width=2, hidden=(7, 3), seed=5)
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_builtin_weights_are_those_of_the_class_built_after_manual_seed() -> None:
    # independent of the registry: seed the global RNG, construct the class directly
    expected = {
        "mlp": lambda: MLP(FASHION, 10, hidden=[14, 6]),
        "simple-cnn": lambda: SimpleCNN(FASHION, 10, width=2),
        "vgg11": lambda: VGG11(FASHION, 10, width=2),
        "resnet20": lambda: ResNet20(FASHION, 10, width=2),
    }
    for name, make in expected.items():
        torch.manual_seed(3)
        reference = make().state_dict()
        got = build_model(
            name, input_shape=FASHION, num_classes=10, width=2, hidden=(7, 3), seed=3
        ).state_dict()
        assert got.keys() == reference.keys()
        for k in got:
            assert_close(got[k], reference[k], rtol=0, atol=0)


def test_model_config_defaults() -> None:
    config = ModelConfig()
    assert (config.name, config.width, config.hidden, config.factory) == (
        "simple-cnn",
        1,
        (200, 200),
        "",
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "gpt"}, "name: got 'gpt'; allowed: mlp, resnet20, simple-cnn, vgg11, "
                          "or set factory to a model builder of your own"),
        ({"width": 0}, "width: got 0; allowed: an integer >= 1"),
        ({"width": 1.5}, "width: got 1.5; allowed: an integer >= 1"),
        ({"width": True}, "width: got True; allowed: an integer >= 1"),
        ({"hidden": ()}, "hidden: got (); allowed: a non-empty tuple of integers >= 1"),
        ({"hidden": (4, 0)}, "hidden: got (4, 0); allowed: a non-empty tuple of integers >= 1"),
        ({"hidden": [4]}, "hidden: got [4]; allowed: a non-empty tuple of integers >= 1"),
        ({"factory": "models.py"}, "factory: got 'models.py' (no ':' between module and "
                                   "function); allowed: '' or 'package.module:function' or "
                                   "'path/to/file.py:function'"),
        ({"factory": "a-b:f"}, "factory: got 'a-b:f' ('a-b' is neither a dotted module name "
                               "nor a .py file); allowed: '' or 'package.module:function' or "
                               "'path/to/file.py:function'"),
        ({"factory": "pkg.mod:1f"}, "factory: got 'pkg.mod:1f' ('1f' is not a Python name); "
                                    "allowed: '' or 'package.module:function' or "
                                    "'path/to/file.py:function'"),
    ],
)  # fmt: skip
def test_model_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        ModelConfig(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_model_config_with_factory_skips_the_name_check_and_imports_nothing() -> None:
    config = ModelConfig(name="anything", factory="not_imported_pkg.sub:build")
    assert config.factory == "not_imported_pkg.sub:build"
    assert ModelConfig(factory="some/dir/file.py:make").factory == "some/dir/file.py:make"


def test_model_config_is_frozen() -> None:
    config = ModelConfig()
    with pytest.raises(AttributeError):
        config.width = 2  # type: ignore[misc]
