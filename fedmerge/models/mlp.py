"""Multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from math import prod

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected network with ReLU activations.

    Parameters
    ----------
    input_shape : sequence of int
        Shape of one input sample; it is flattened.
    num_classes : int
        Number of output logits.
    hidden : sequence of int (default: (200, 200))
        Width of each hidden layer.

    Notes
    -----
    Layers are named ``layers.0``, ``layers.1``, ... (hidden) and ``head``
    (output), so permutation specs can address them by name.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        hidden: Sequence[int] = (200, 200),
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("hidden: got an empty list; allowed: at least one width >= 1")
        dims = [prod(input_shape), *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits, shape (batch, num_classes)."""
        x = torch.flatten(x, 1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        logits: torch.Tensor = self.head(x)
        return logits
