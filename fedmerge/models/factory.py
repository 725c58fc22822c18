"""Build a model by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedmerge.models.cnn import SimpleCNN
from fedmerge.models.mlp import MLP
from fedmerge.models.resnet import ResNet20
from fedmerge.models.vgg import VGG11

MODEL_NAMES: tuple[str, ...] = ("mlp", "simple-cnn", "vgg11", "resnet20")


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 1,
    hidden: Sequence[int] = (200, 200),
    seed: int | None = None,
) -> nn.Module:
    """Return a freshly initialised model.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`.
    input_shape : sequence of int
        Shape of one sample (``(C, H, W)`` for images, ``(D,)`` for vectors).
    num_classes : int
        Number of output logits.
    width : int (default: 1)
        Width multiplier (simple-cnn, vgg11, resnet20).
    hidden : sequence of int (default: (200, 200))
        Hidden widths of the MLP.
    seed : int, optional
        Seed of the initial weights. The same seed gives the same weights; the
        global RNG state is left as it was. ``None`` draws from the global RNG.
    """
    if seed is None:
        return _build(name, input_shape, num_classes, width, hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name, input_shape, num_classes, width, hidden)


def _build(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    width: int,
    hidden: Sequence[int],
) -> nn.Module:
    if width < 1:
        raise ValueError(f"model.width: got {width}; allowed: an integer >= 1")
    if name == "mlp":
        return MLP(input_shape, num_classes, hidden=[h * width for h in hidden])
    if name == "simple-cnn":
        return SimpleCNN(input_shape, num_classes, width=width)
    if name == "vgg11":
        return VGG11(input_shape, num_classes, width=width)
    if name == "resnet20":
        return ResNet20(input_shape, num_classes, width=width)
    raise ValueError(f"model.name: unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
