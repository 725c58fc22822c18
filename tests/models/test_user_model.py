"""A user's own model: built through ModelConfig.factory or the registry, then aligned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fedmerge.align import apply_permutation, permutation_spec_for, random_permutation
from fedmerge.align.weight_matching import weight_matching
from fedmerge.models import (
    ModelConfig,
    build_model,
    build_model_from_config,
    example_input,
    model_names,
    register_model,
)
from fedmerge.models import factory as factory_module
from tests.user_models import ResidualMLP

FACTORY = "tests/user_models.py:residual_mlp"
SHAPE = (1, 6, 6)


def _user_model(*, width: int = 1, seed: int = 0) -> nn.Module:
    config = ModelConfig(factory=FACTORY, hidden=(8, 5), width=width)
    model = build_model_from_config(config, input_shape=SHAPE, num_classes=4, seed=seed)
    # random LayerNorm affines, so that a wrongly permuted norm changes the outputs
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def test_factory_builds_the_users_model_with_scaled_sizes() -> None:
    model = _user_model(width=2)
    # the module is loaded from the file, so its class is not tests.user_models'
    assert type(model).__name__ == "ResidualMLP"
    # hand count: stream = 8 * 2, inner = 5 * 2, input 1 * 6 * 6
    assert model.stem.weight.shape == (16, 36)
    assert model.down.weight.shape == (10, 16)
    assert model.up.weight.shape == (16, 10)
    assert model.norm.weight.shape == (16,)
    assert model.head.weight.shape == (4, 16)
    assert model(example_input(SHAPE, batch=3)).shape == (3, 4)


def test_factory_seeding_matches_a_manually_seeded_build() -> None:
    config = ModelConfig(factory=FACTORY, hidden=(8, 5))
    a = build_model_from_config(config, input_shape=SHAPE, num_classes=4, seed=7)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    b = build_model_from_config(config, input_shape=SHAPE, num_classes=4, seed=7)
    assert_close(torch.rand(3), before, rtol=0, atol=0)  # global RNG untouched
    torch.manual_seed(7)
    expected = ResidualMLP(36, 4, 8, 5).state_dict()  # independent: seed, then construct
    for state in (a.state_dict(), b.state_dict()):
        assert state.keys() == expected.keys()
        for key in expected:
            assert_close(state[key], expected[key], rtol=0, atol=0)


def test_width_override_replaces_config_width() -> None:
    config = ModelConfig(factory=FACTORY, hidden=(8, 5), width=1)
    model = build_model_from_config(config, input_shape=SHAPE, num_classes=4, seed=0, width=3)
    assert model.stem.out_features == 24 and model.down.out_features == 15


def test_traced_spec_of_the_users_model_has_one_stream_and_one_inner_group() -> None:
    model = _user_model()
    spec = permutation_spec_for(model, example_input(SHAPE))
    assert spec.axes.keys() == model.state_dict().keys()
    stream, inner = spec.axes["stem.weight"][0], spec.axes["down.weight"][0]
    assert stream is not None and inner is not None and stream != inner
    # written by hand from the architecture: what reads or writes the stream
    expected = {
        "stem.weight": (stream, None),
        "stem.bias": (stream,),
        "norm.weight": (stream,),
        "norm.bias": (stream,),
        "block_norm.weight": (stream,),
        "block_norm.bias": (stream,),
        "down.weight": (inner, stream),
        "down.bias": (inner,),
        "up.weight": (stream, inner),
        "up.bias": (stream,),
        "head.weight": (None, stream),
        "head.bias": (None,),
    }
    assert dict(spec.axes) == expected
    assert len(spec.perms) == 2


def test_random_permutation_of_the_users_model_keeps_its_function() -> None:
    model = _user_model(seed=1)
    x = example_input(SHAPE, batch=16, seed=5)
    spec = permutation_spec_for(model, example_input(SHAPE))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perm = random_permutation(spec, state, generator=torch.Generator().manual_seed(3))
    permuted = apply_permutation(spec, perm, state)
    # independent of apply_permutation: permute stem rows by hand and compare
    p_stream = perm[spec.axes["stem.weight"][0].perm]  # type: ignore[union-attr]
    assert_close(permuted["stem.weight"], state["stem.weight"][p_stream], rtol=0, atol=0)
    assert not torch.equal(p_stream, torch.arange(len(p_stream)))
    with torch.no_grad():
        expected = model(x)
        model.load_state_dict(permuted)
        got = model(x)
    assert not torch.equal(model.state_dict()["up.weight"], state["up.weight"])
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_weight_matching_undoes_a_permutation_of_the_users_model() -> None:
    model = _user_model(seed=2)
    spec = permutation_spec_for(model, example_input(SHAPE))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perm = random_permutation(spec, state, generator=torch.Generator().manual_seed(9))
    shuffled = apply_permutation(spec, perm, state)
    distance_before = sum(float((shuffled[k] - state[k]).norm()) for k in state)
    assert distance_before > 0
    back, info = weight_matching(spec, state, shuffled, rng=np.random.default_rng(0))
    aligned = apply_permutation(spec, back, shuffled)
    for key in state:
        assert_close(aligned[key], state[key], rtol=0, atol=0)
    assert info.converged


# --------------------------------------------------------------------------- registry


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private copy of the model registry, dropped after the test."""
    monkeypatch.setattr(factory_module, "_BUILDERS", dict(factory_module._BUILDERS))
    yield


def _toy(
    input_shape: tuple[int, ...], num_classes: int, *, width: int, hidden: tuple[int, ...]
) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes * width))


@pytest.mark.usefixtures("clean_registry")
def test_registered_builder_is_built_by_name_and_config() -> None:
    with pytest.raises(ValueError, match=r"^name: got 'toy'; allowed: mlp, resnet20, simple-cnn"):
        ModelConfig(name="toy")
    register_model("toy", _toy)
    assert model_names() == ("mlp", "resnet20", "simple-cnn", "toy", "vgg11")
    model = build_model("toy", input_shape=(2, 3), num_classes=5, width=2, seed=4)
    torch.manual_seed(4)
    expected = _toy((2, 3), 5, width=2, hidden=())
    assert model[1].weight.shape == (10, 6)
    assert_close(model[1].weight, expected[1].weight, rtol=0, atol=0)
    via_config = build_model_from_config(
        ModelConfig(name="toy", width=2), input_shape=(2, 3), num_classes=5, seed=4
    )
    assert_close(via_config[1].weight, expected[1].weight, rtol=0, atol=0)
    # not built in, so it is traced: its only hidden axis is the output, which stays
    spec = permutation_spec_for(model, example_input((2, 3)))
    assert spec.perms == ()


@pytest.mark.usefixtures("clean_registry")
def test_register_refuses_duplicates_and_non_callables() -> None:
    with pytest.raises(ValueError, match=r"^name: got 'mlp'; allowed: a name not yet registered"):
        register_model("mlp", _toy)
    with pytest.raises(ValueError, match=r"^name: got ''"):
        register_model("", _toy)
    with pytest.raises(TypeError, match=r"^builder: got 3"):
        register_model("three", 3)  # type: ignore[arg-type]
    assert "three" not in model_names()


# --------------------------------------------------------------------------- factory errors


def _build(factory: str) -> nn.Module:
    return build_model_from_config(
        ModelConfig(factory=factory), input_shape=SHAPE, num_classes=4, seed=0
    )


def test_factory_in_an_importable_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models_pkg").mkdir()
    (tmp_path / "my_models_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_models_pkg" / "zoo.py").write_text(
        "from torch import nn\n"
        "class Zoo:\n"
        "    @staticmethod\n"
        "    def linear(input_shape, num_classes, *, width, hidden):\n"
        "        return nn.Linear(input_shape[-1], num_classes * width)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _build("my_models_pkg.zoo:Zoo.linear")
    assert isinstance(model, nn.Linear) and model.weight.shape == (4, 6)


@pytest.mark.parametrize(
    ("factory", "why"),
    [
        ("no_such_package_xyz.models:build", "module not found: 'no_such_package_xyz'"),
        ("tests/no_such_file.py:build", "no such file"),
        ("tests/user_models.py:missing", "has no attribute 'missing'"),
        ("tests/user_models.py:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
        ("tests/user_models.py:not_a_model", "it returned a dict, not an nn.Module"),
        ("tests/user_models.py:wrong_signature", "does not take (input_shape, num_classes"),
    ],
)
def test_factory_errors_name_the_field_the_value_and_why(factory: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        _build(factory)
    message = str(info.value)
    assert message.startswith(f"factory: got {factory!r} (")
    assert why in message
    assert message.endswith(
        "allowed: '' or 'package.module:function' or 'path/to/file.py:function'"
    )


def test_factory_file_that_fails_to_import(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"^factory: got .*RuntimeError: boom"):
        _build(f"{broken}:build")


def test_example_input_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected_next = torch.rand(2)
    torch.manual_seed(0)
    x = example_input((3, 4, 5), batch=7, seed=11)
    assert_close(torch.rand(2), expected_next, rtol=0, atol=0)
    assert x.shape == (7, 3, 4, 5) and x.dtype == torch.float32
    expected = torch.randn(7, 3, 4, 5, generator=torch.Generator().manual_seed(11))
    assert_close(x, expected, rtol=0, atol=0)
    assert example_input((3,)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"^batch: got 0; allowed: an integer >= 1"):
        example_input((3,), batch=0)
