"""SimCLR: NT-Xent between the projections of two augmented views of every image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmerge.tasks.common import proximal_anchors, two_view_epochs
from fedmerge.tasks.config import SSL_OPTIONS
from fedmerge.tasks.losses import nt_xent
from fedmerge.tasks.network import ssl_network
from fedmerge.tasks.registry import LocalRound, StateDict, Task
from fedmerge.training import make_optimizer

if TYPE_CHECKING:
    from fedmerge.tasks.config import TaskConfig
    from fedmerge.training import TrainConfig


class SimCLRTask(Task):
    """SimCLR (Chen et al., ICML 2020, https://arxiv.org/abs/2002.05709).

    Every mini-batch is augmented twice (:func:`~fedmerge.tasks.augment.augment`),
    both views go through the encoder and the projection MLP in one forward
    pass, and the loss is :func:`~fedmerge.tasks.losses.nt_xent` at
    ``temperature``; FedProx's proximal term is added when ``prox_mu > 0``.

    Notes
    -----
    The local optimiser is the run's (``train.optimizer``: SGD or Adam), not
    LARS; batches of one sample are skipped (NT-Xent needs a negative).
    """

    name = "simclr"
    options = SSL_OPTIONS | {"temperature"}
    summary = "NT-Xent on two augmented views; encoder + projection MLP"

    def network(self, model: nn.Module, config: TaskConfig, *, seed: int) -> nn.Module:
        """``model`` without its classifier plus a projection MLP."""
        return ssl_network(
            model, hidden=config.projection_hidden, out=config.projection_dim, seed=seed
        )

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
        """Train ``net`` in place; the labels ``y`` are not read; nothing is kept."""
        anchors = proximal_anchors(net, prox_mu, global_state)
        net.train()

        def loss_of(views: torch.Tensor, b: int) -> torch.Tensor:
            z = net(views)
            return nt_xent(z[:b], z[b:], config.temperature)

        result = two_view_epochs(
            x, train, config, make_optimizer(net, train), loss_of, generator=generator,
            epochs=train.epochs if epochs is None else epochs, anchors=anchors, prox_mu=prox_mu,
        )  # fmt: skip
        return LocalRound(result)
