"""SimCLR: NT-Xent between the projections of two augmented views of every image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmerge.tasks.augment import augment
from fedmerge.tasks.common import augment_config, proximal_anchors, proximal_term
from fedmerge.tasks.config import SSL_OPTIONS
from fedmerge.tasks.losses import nt_xent
from fedmerge.tasks.network import ssl_network
from fedmerge.tasks.registry import LocalRound, StateDict, Task
from fedmerge.training import TrainResult, make_optimizer

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
        device = next(net.parameters()).device
        n = len(x)
        if n == 0:
            return LocalRound(TrainResult(loss=float("nan"), num_examples=0, num_steps=0))
        optimizer = make_optimizer(net, train)
        aug = augment_config(config)
        net.train()
        steps, epoch_loss = 0, float("nan")
        for _ in range(train.epochs if epochs is None else epochs):
            order = torch.randperm(n, generator=generator)
            total, seen = torch.zeros((), device=device), 0
            for start in range(0, n, train.batch_size):
                idx = order[start : start + train.batch_size]
                b = len(idx)
                if b < 2:
                    continue
                xb = x[idx].to(device, non_blocking=True)
                views = torch.cat(
                    [augment(xb, aug, generator=generator), augment(xb, aug, generator=generator)]
                )
                z = net(views)
                loss = nt_xent(z[:b], z[b:], config.temperature)
                total += loss.detach() * b
                seen += b
                if anchors:
                    loss = loss + 0.5 * prox_mu * proximal_term(anchors)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
                steps += 1
            epoch_loss = float(total) / seen if seen else float("nan")
        return LocalRound(TrainResult(loss=epoch_loss, num_examples=n, num_steps=steps))
