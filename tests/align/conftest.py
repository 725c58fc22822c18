"""Fixtures of the alignment tests: built-in models and planted permutations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fedmerge.align import (
    PermutationSpec,
    apply_permutation,
    invert_permutation,
    permutation_spec_for,
    random_permutation,
)
from fedmerge.merge import reset_bn_stats
from fedmerge.models import VGG11, build_model

#: (model name, input shape) of the built-in models at a small input size.
BUILTIN = {
    "mlp": (1, 28, 28),
    "simple-cnn": (3, 32, 32),
    "vgg11": (1, 28, 28),
    "resnet20": (3, 32, 32),
}


@dataclass
class Planted:
    """Model A, model B = planted permutation of A plus noise, and the answer."""

    spec: PermutationSpec
    model_a: nn.Module
    model_b: nn.Module
    inputs: torch.Tensor
    answer: dict[str, torch.Tensor]  # perm that aligns B to A (inverse of the planted one)

    def wrong(self, perm: dict[str, torch.Tensor]) -> list[str]:
        """Names of the permutations of ``perm`` that differ from the answer."""
        assert perm.keys() == self.answer.keys()
        return [k for k in self.answer if not torch.equal(perm[k].cpu(), self.answer[k].cpu())]


def _he_init(model: nn.Module, inputs: torch.Tensor, generator: torch.Generator) -> None:
    """He-normal weights, biases that centre every unit on ``inputs``, calibrated BatchNorm.

    Centred pre-activations keep every ReLU unit alive on part of the inputs, so
    that units can be told apart by their activations.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def centre(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        mean = out.mean([d for d in range(out.dim()) if d != 1])
        module.bias.sub_(mean)
        return out - mean.reshape(-1, *[1] * (out.dim() - 2))

    with torch.no_grad():
        for module in layers:
            fan_in = module.weight[0].numel()
            module.weight.copy_(
                torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
            )
        handles = [m.register_forward_hook(centre) for m in layers if m.bias is not None]
        model.eval()
        model(inputs)  # one pass: each hook centres its layer before the next layer runs
        for handle in handles:
            handle.remove()
        reset_bn_stats(model, inputs.split(64))


def _build(name: str, shape: tuple[int, ...], width: float, seed: int) -> nn.Module:
    if name == "vgg11" and width != int(width):
        torch.manual_seed(seed)
        return VGG11(shape, 10, width=width)  # fractional widths keep the test fast
    return build_model(name, input_shape=shape, num_classes=10, width=int(width), seed=seed)


@pytest.fixture
def planted() -> Callable[..., Planted]:
    """Factory of :class:`Planted` cases (see ``make`` for the options)."""

    def make(
        name: str,
        *,
        width: float = 1,
        noise: float = 0.01,
        seed: int = 0,
        he_init: bool = False,
        samples: int = 128,
        shape: tuple[int, ...] | None = None,
    ) -> Planted:
        shape = shape or BUILTIN[name]
        gen = torch.Generator().manual_seed(seed)
        model_a = _build(name, shape, width, seed)
        inputs = torch.randn(samples, *shape, generator=gen)
        if he_init:
            _he_init(model_a, inputs, gen)
        spec = permutation_spec_for(model_a)
        state_a = model_a.state_dict()
        perm = random_permutation(spec, state_a, generator=gen)
        state_b = apply_permutation(spec, perm, state_a)
        params = dict(model_a.named_parameters())
        state_b = {
            k: v + noise * v.std() * torch.randn(v.shape, generator=gen)
            if k in params and v.numel() > 1
            else v
            for k, v in state_b.items()
        }
        model_b = _build(name, shape, width, seed)
        model_b.load_state_dict(state_b)
        model_a.eval()
        model_b.eval()
        return Planted(spec, model_a, model_b, inputs, invert_permutation(perm))

    return make
