"""VGG-11 with batch normalisation and a width multiplier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Channels of VGG-11's convolutions ("M" is a 2x2 max-pool).
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 (configuration "A") with BatchNorm, for small images.

    Parameters
    ----------
    input_shape : sequence of int
        ``(channels, height, width)``.
    num_classes : int
        Number of output logits.
    width : float (default: 1.0)
        Multiplier on every convolution's channels (at least one channel each).

    Notes
    -----
    Max-pools use ``ceil_mode=True`` so that inputs smaller than 32x32
    (Fashion-MNIST's 28x28, digits' 8x8) still pass the five pools; a global
    average pool then feeds one linear classifier, as in the CIFAR variants of
    Git Re-Basin.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, width: float = 1.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"input_shape: got {tuple(input_shape)}; allowed for vgg11: image "
                f"inputs (channels, height, width)"
            )
        layers: list[nn.Module] = []
        in_ch = input_shape[0]
        for item in VGG11_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            out_ch = max(1, round(int(item) * width))
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits, shape (batch, num_classes)."""
        x = self.pool(self.features(x))
        logits: torch.Tensor = self.classifier(torch.flatten(x, 1))
        return logits
