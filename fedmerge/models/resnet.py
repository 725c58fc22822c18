"""ResNet-20 (He et al., CIFAR variant) with a width multiplier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity or 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20: a 3x3 stem and three stages of three basic blocks.

    Parameters
    ----------
    input_shape : sequence of int
        ``(channels, height, width)``.
    num_classes : int
        Number of output logits.
    width : int (default: 1)
        Multiplier on the stage widths 16, 32 and 64.

    Notes
    -----
    Git Re-Basin's ResNet-20 uses LayerNorm; this one uses BatchNorm, whose
    running statistics are permuted along with the weights. Stages 2 and 3
    open with a strided block whose shortcut is a 1x1 convolution.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, width: int = 1) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"input_shape: got {tuple(input_shape)}; allowed for resnet20: image "
                f"inputs (channels, height, width)"
            )
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(input_shape[0], w[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        stages = []
        in_ch = w[0]
        for i, out_ch in enumerate(w):
            blocks = []
            for j in range(3):
                blocks.append(BasicBlock(in_ch, out_ch, 2 if (i > 0 and j == 0) else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits, shape (batch, num_classes)."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        logits: torch.Tensor = self.linear(torch.flatten(self.pool(x), 1))
        return logits
