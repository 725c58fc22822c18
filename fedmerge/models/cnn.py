"""The simple CNN of NIID-Bench (Li et al., ICDE 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SimpleCNN(nn.Module):
    """Two 5x5 convolutions (6 and 16 channels) and three linear layers.

    This is NIID-Bench's ``SimpleCNN``: conv(6, 5) - ReLU - maxpool(2) -
    conv(16, 5) - ReLU - maxpool(2) - fc(120) - ReLU - fc(84) - ReLU - fc(C).

    Parameters
    ----------
    input_shape : sequence of int
        ``(channels, height, width)``; height and width must be at least 12.
    num_classes : int
        Number of output logits.
    width : int (default: 1)
        Multiplier on every hidden width (1 is the paper's network).

    References
    ----------
    .. [1] Q. Li, Y. Diao, Q. Chen, B. He, "Federated Learning on Non-IID Data
       Silos: An Experimental Study", ICDE 2022. https://arxiv.org/abs/2102.02079
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, width: int = 1) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"input_shape: got {tuple(input_shape)}; allowed for simple-cnn: image "
                f"inputs (channels, height, width); use model 'mlp' for vectors"
            )
        channels, height, width_px = input_shape
        if min(height, width_px) < 12:
            raise ValueError(
                f"input_shape: got {tuple(input_shape)}; allowed for simple-cnn: images of "
                f"at least 12x12 pixels; use model 'mlp' or 'vgg11'"
            )
        self.conv1 = nn.Conv2d(channels, 6 * width, 5)
        self.conv2 = nn.Conv2d(6 * width, 16 * width, 5)
        h, w = ((height - 4) // 2 - 4) // 2, ((width_px - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * width * h * w, 120 * width)
        self.fc2 = nn.Linear(120 * width, 84 * width)
        self.fc3 = nn.Linear(84 * width, num_classes)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits, shape (batch, num_classes)."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)
        return logits
