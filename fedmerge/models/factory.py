"""Build a model by name: the registry of model builders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmerge.models.cnn import SimpleCNN
from fedmerge.models.mlp import MLP
from fedmerge.models.resnet import ResNet20
from fedmerge.models.user import ModelBuilder, load_factory
from fedmerge.models.vgg import VGG11
from fedmerge.registry import add_entry

if TYPE_CHECKING:
    from fedmerge.models.config import ModelConfig

__all__ = [
    "MODEL_NAMES",
    "ModelBuilder",
    "build_model",
    "build_model_from_config",
    "check_width",
    "example_input",
    "model_names",
    "register_model",
]


def _mlp(
    input_shape: tuple[int, ...], num_classes: int, *, width: int, hidden: tuple[int, ...]
) -> nn.Module:
    return MLP(input_shape, num_classes, hidden=[h * width for h in hidden])


def _simple_cnn(
    input_shape: tuple[int, ...], num_classes: int, *, width: int, hidden: tuple[int, ...]
) -> nn.Module:
    return SimpleCNN(input_shape, num_classes, width=width)


def _vgg11(
    input_shape: tuple[int, ...], num_classes: int, *, width: int, hidden: tuple[int, ...]
) -> nn.Module:
    return VGG11(input_shape, num_classes, width=width)


def _resnet20(
    input_shape: tuple[int, ...], num_classes: int, *, width: int, hidden: tuple[int, ...]
) -> nn.Module:
    return ResNet20(input_shape, num_classes, width=width)


#: Name -> builder, kept sorted by name; filled by :func:`register_model`.
_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str, builder: ModelBuilder) -> None:
    """Make ``builder`` buildable by ``name`` (in :func:`build_model` and ``ModelConfig``).

    Parameters
    ----------
    name : str
        A new, non-empty model name.
    builder : ModelBuilder
        ``builder(input_shape, num_classes, *, width, hidden) -> nn.Module``.
        It is called with the global RNG seeded, so it must draw its initial
        weights from the global RNG (as ``nn.Module`` constructors do).

    Raises
    ------
    ValueError
        If ``name`` is empty or already registered.
    TypeError
        If ``builder`` is not callable.
    """
    add_entry(_BUILDERS, name, builder, key="builder", returns="an nn.Module")


def model_names() -> tuple[str, ...]:
    """Names of every registered model, sorted."""
    return tuple(_BUILDERS)


register_model("mlp", _mlp)
register_model("resnet20", _resnet20)
register_model("simple-cnn", _simple_cnn)
register_model("vgg11", _vgg11)

#: Names of the built-in models, sorted (:func:`model_names` adds registered ones).
MODEL_NAMES: tuple[str, ...] = model_names()


def check_width(width: object) -> int:
    """Return ``width`` if it is an integer >= 1, else raise ``ValueError`` naming it."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width: got {width!r}; allowed: an integer >= 1")
    return width


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 1,
    hidden: Sequence[int] = (200, 200),
    seed: int | None = None,
) -> nn.Module:
    """Return a freshly initialised registered model.

    Parameters
    ----------
    name : str
        One of :func:`model_names` (built in: :data:`MODEL_NAMES`).
    input_shape : sequence of int
        Shape of one sample (``(C, H, W)`` for images, ``(D,)`` for vectors).
    num_classes : int
        Number of output logits.
    width : int (default: 1)
        Width multiplier (every built-in model; the MLP multiplies ``hidden``).
    hidden : sequence of int (default: (200, 200))
        Hidden widths of the MLP.
    seed : int, optional
        Seed of the initial weights. The same seed gives the same weights; the
        global RNG state is left as it was. ``None`` draws from the global RNG.

    Raises
    ------
    ValueError
        If ``name`` is not registered or ``width`` is below 1.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"name: got {name!r}; allowed: {', '.join(_BUILDERS)}")
    return _call(builder, input_shape, num_classes, width, hidden, seed)


def build_model_from_config(
    config: ModelConfig,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int | None,
    width: int | None = None,
) -> nn.Module:
    """Return the freshly initialised model that ``config`` describes.

    Parameters
    ----------
    config : ModelConfig
        The model: ``config.factory`` when set, else the registered
        ``config.name``.
    input_shape : sequence of int
        Shape of one sample.
    num_classes : int
        Number of output logits.
    seed : int or None
        Seed of the initial weights (as in :func:`build_model`).
    width : int, optional
        Width multiplier that replaces ``config.width`` (clients of other
        widths).

    Raises
    ------
    ValueError
        If ``width`` is below 1, or the factory cannot be imported or does not
        return an ``nn.Module`` (the message names ``factory`` and its value).
    """
    width = config.width if width is None else width
    if not config.factory:
        return build_model(
            config.name,
            input_shape=input_shape,
            num_classes=num_classes,
            width=width,
            hidden=config.hidden,
            seed=seed,
        )
    builder = load_factory(config.factory)
    return _call(builder, input_shape, num_classes, width, config.hidden, seed)


def _call(
    builder: ModelBuilder,
    input_shape: Sequence[int],
    num_classes: int,
    width: int,
    hidden: Sequence[int],
    seed: int | None,
) -> nn.Module:
    check_width(width)
    shape = tuple(int(d) for d in input_shape)
    widths = tuple(int(h) for h in hidden)
    if seed is None:
        return builder(shape, num_classes, width=width, hidden=widths)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(shape, num_classes, width=width, hidden=widths)


def example_input(
    input_shape: Sequence[int],
    batch: int = 2,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""A batch of random inputs, for tracing a model's permutation spec.

    Pass it to :func:`fedmerge.align.permutation_spec_for`, which needs one
    for every model that is not built in.

    Parameters
    ----------
    input_shape : sequence of int
        Shape of one sample.
    batch : int (default: 2)
        Number of samples, >= 1.
    seed : int (default: 0)
        Seed of the values (standard normal); the global RNG is not touched.
    device : torch.device or str, optional
        Where the tensor lives (default: the CPU, where generators live).

    Returns
    -------
    Tensor, shape (batch, \*input_shape), float32
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: got {batch!r}; allowed: an integer >= 1")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *(int(d) for d in input_shape), generator=generator)
    return x if device is None else x.to(device)
