"""The supervised task: cross-entropy on the labels, the model as built (fedmerge's default)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmerge.tasks.registry import LocalRound, StateDict, Task
from fedmerge.training import train_local

if TYPE_CHECKING:
    from fedmerge.tasks.config import TaskConfig
    from fedmerge.training import TrainConfig


class SupervisedTask(Task):
    """Supervised learning: :func:`fedmerge.training.train_local` on the model itself."""

    name = "supervised"
    summary = "cross-entropy on the labels (the model with its classifier)"

    def network(self, model: nn.Module, config: TaskConfig, *, seed: int) -> nn.Module:
        """The model unchanged."""
        return model

    def train(
        self,
        net: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        train: TrainConfig,
        config: TaskConfig,
        *,
        generator: torch.Generator,
        prox_mu: float = 0.0,
        global_state: Mapping[str, torch.Tensor] | None = None,
        epochs: int | None = None,
        kept: StateDict | None = None,
    ) -> LocalRound:
        """One round of :func:`~fedmerge.training.train_local`; nothing is kept."""
        result = train_local(
            net,
            x,
            y,
            train,
            generator=generator,
            global_state=global_state,
            prox_mu=prox_mu,
            epochs=epochs,
        )
        return LocalRound(result)
