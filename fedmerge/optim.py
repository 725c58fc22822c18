"""The local optimisers: PyTorch's SGD and Adam updates, without ``torch.optim``.

``torch.optim.Optimizer`` imports ``torch._dynamo`` when it is built (its
``add_param_group``) and at every ``step`` (a graph break for
``torch.compile``): about 2.5 s of CPU on a slow core, in every process that
trains, and on the path of every run's first round. The classes here make
exactly the updates of ``torch.optim.SGD`` and ``torch.optim.Adam`` with
their defaults on a CPU (the per-parameter loop, PyTorch's ``foreach=False``
path): the same tensor operations in the same order, so the weights are equal
bit for bit (``tests/test_optim.py`` checks it against ``torch.optim``).
Nothing else of ``torch.optim`` is offered: no parameter groups, no state
dictionaries, no hooks; an optimiser lives for one call of local training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
from torch import nn


class LocalOptimizer(ABC):
    """What local training asks of an optimiser: the parameters, ``zero_grad`` and ``step``."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("params: got an empty list; allowed: at least one parameter")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient: drop it (``set_to_none``) or fill it with zeros."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    @abstractmethod
    def step(self) -> None:
        """Update every parameter that has a gradient."""


class SGD(LocalOptimizer):
    """``torch.optim.SGD(params, lr, momentum, weight_decay)``: no dampening, no Nesterov.

    With ``g`` the gradient plus ``weight_decay * w``: the momentum buffer is
    ``b = g`` at the first step, then ``b = momentum * b + g``; ``w -= lr * b``
    (``w -= lr * g`` without momentum).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            grad = param.grad
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self._buffers[i]
                if buf is None:
                    buf = grad.detach().clone()
                    self._buffers[i] = buf
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1)
                grad = buf
            param.add_(grad, alpha=-self.lr)


class Adam(LocalOptimizer):
    """``torch.optim.Adam(params, lr, weight_decay=weight_decay)``: betas (0.9, 0.999), eps 1e-8.

    Weight decay is added to the gradient (L2, not AdamW's decoupled decay).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self._steps = [0] * len(self.params)
        # the first and second moments, from a parameter's first gradient on
        self._moments: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        beta1, beta2 = self.betas
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            moments = self._moments[i]
            if moments is None:
                moments = self._moments[i] = (
                    torch.zeros_like(param, memory_format=torch.preserve_format),
                    torch.zeros_like(param, memory_format=torch.preserve_format),
                )
            avg, avg_sq = moments
            self._steps[i] += 1
            step = float(self._steps[i])
            grad = param.grad
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            avg.lerp_(grad, 1 - beta1)
            avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = self.lr / (1 - beta1**step)
            denom = (avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            param.addcdiv_(avg, denom, value=-step_size)
