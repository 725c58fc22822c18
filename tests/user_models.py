"""Models that are not built into fedmerge, as a user would write them.

Plain module (no pytest): the end-to-end tests name its builders through a
scenario's ``factory = "tests/user_models.py:residual_mlp"``.
"""

from __future__ import annotations

from math import prod

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """Flatten, linear stem, LayerNorm, one pre-norm residual block, classifier.

    ``x -> norm(stem(x)) = h``, ``h + up(relu(down(block_norm(h))))``, then
    ``head(relu(.))``. The stem, both norms, ``up`` and the head's input share
    one residual stream; ``down``/``up`` have an inner width of their own.
    """

    def __init__(self, in_features: int, num_classes: int, stream: int, inner: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.stem = nn.Linear(in_features, stream)
        self.norm = nn.LayerNorm(stream)
        self.block_norm = nn.LayerNorm(stream)
        self.down = nn.Linear(stream, inner)
        self.up = nn.Linear(inner, stream)
        self.head = nn.Linear(stream, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits, shape (batch, num_classes)."""
        h = self.norm(self.stem(self.flatten(x)))
        h = h + self.up(torch.relu(self.down(self.block_norm(h))))
        logits: torch.Tensor = self.head(torch.relu(h))
        return logits


def residual_mlp(
    input_shape: tuple[int, ...], num_classes: int, *, width: int, hidden: tuple[int, ...]
) -> nn.Module:
    """Build a :class:`ResidualMLP`: stream ``hidden[0] * width``, inner ``hidden[-1] * width``."""
    return ResidualMLP(prod(input_shape), num_classes, hidden[0] * width, hidden[-1] * width)


def not_a_model(
    input_shape: tuple[int, ...], num_classes: int, *, width: int, hidden: tuple[int, ...]
) -> object:
    """A factory that forgets to return a module (for error tests)."""
    return {"width": width}


def wrong_signature(input_shape: tuple[int, ...]) -> nn.Module:
    """A factory without ``num_classes``, ``width`` and ``hidden`` (for error tests)."""
    return nn.Linear(prod(input_shape), 1)


NOT_CALLABLE = 42
