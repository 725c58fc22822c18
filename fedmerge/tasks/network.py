"""The network of a self-supervised task: a built-in model's encoder plus a projection MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedmerge.models import MLP, VGG11, ResNet20, SimpleCNN

#: Built-in model class -> the attribute that holds its classifier.
_CLASSIFIERS: dict[type[nn.Module], str] = {
    MLP: "head",
    ResNet20: "linear",
    SimpleCNN: "fc3",
    VGG11: "classifier",
}


def strip_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """``model`` without its classifier (replaced in place by ``nn.Identity``), and its width.

    Built-in models name their classifier (``head``, ``fc3``, ``linear``,
    ``classifier``); for any other model the last ``nn.Linear`` in module
    order is taken to be the classifier.

    Returns
    -------
    (nn.Module, int)
        The encoder (the same object) and the width of its features.

    Raises
    ------
    ValueError
        If the model has no ``nn.Linear`` to strip.
    """
    name = _CLASSIFIERS.get(type(model))
    if name is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"model: got {type(model).__name__} without an nn.Linear classifier; allowed: "
                "a model whose last nn.Linear is its classifier (self-supervised tasks)"
            )
        name = linears[-1]
    *parents, leaf = name.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    classifier = getattr(owner, leaf)
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"model: {name} is a {type(classifier).__name__}; allowed: nn.Linear")
    setattr(owner, leaf, nn.Identity())
    return model, classifier.in_features


def mlp_head(dims: Sequence[int]) -> nn.Sequential:
    """``Linear - BatchNorm1d - ReLU - ... - Linear`` through the widths ``dims``."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers)


class EncoderWithProjection(nn.Module):
    """An encoder followed by a projection MLP; the network self-supervised clients send.

    ``forward`` returns the projection; :meth:`features` the encoder's output,
    on which the server evaluates (k-NN, linear probe).

    Parameters
    ----------
    encoder : nn.Module
        A model without its classifier.
    feature_dim : int
        Width of the encoder's output.
    hidden : int
        Hidden width of the projection MLP.
    out : int
        Output width of the projection MLP.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = mlp_head((feature_dim, hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projections, shape (batch, out)."""
        out: torch.Tensor = self.projector(torch.flatten(self.encoder(x), 1))
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features, shape (batch, feature_dim)."""
        return torch.flatten(self.encoder(x), 1)


def ssl_network(model: nn.Module, *, hidden: int, out: int, seed: int) -> EncoderWithProjection:
    """``model``'s encoder plus a projection MLP initialised with ``seed``."""
    encoder, dim = strip_classifier(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EncoderWithProjection(encoder, dim, hidden, out)
