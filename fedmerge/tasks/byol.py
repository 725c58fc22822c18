"""BYOL: an online network predicts an EMA target network's projection of another view."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmerge.tasks.common import proximal_anchors, two_view_epochs
from fedmerge.tasks.config import SSL_OPTIONS
from fedmerge.tasks.losses import byol_loss
from fedmerge.tasks.network import mlp_head, ssl_network
from fedmerge.tasks.registry import LocalRound, StateDict, Task
from fedmerge.training import make_optimizer

if TYPE_CHECKING:
    from fedmerge.tasks.config import TaskConfig
    from fedmerge.training import TrainConfig

#: Prefixes of the kept state: the target network and the predictor.
TARGET_PREFIX = "target."
PREDICTOR_PREFIX = "predictor."


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    r"""``target <- decay * target + (1 - decay) * online`` for every parameter, in place.

    Buffers (BatchNorm statistics) are left to the target's own forward passes.
    """
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o, 1.0 - decay)


def _split(kept: StateDict, prefix: str) -> StateDict:
    return {k.removeprefix(prefix): v for k, v in kept.items() if k.startswith(prefix)}


class BYOLTask(Task):
    r"""BYOL (Grill et al., NeurIPS 2020, https://arxiv.org/abs/2006.07733), federated.

    The network sent and aggregated is the *online* encoder and projector.
    Each client also holds a predictor MLP and a *target* encoder and
    projector; both stay on the client between rounds (the ``kept`` state)
    and are never sent. The loss of two views :math:`v_1, v_2` is
    :math:`\ell(q(f(v_1)), f_\xi(v_2)) + \ell(q(f(v_2)), f_\xi(v_1))` with
    :func:`~fedmerge.tasks.losses.byol_loss`; after every step
    :math:`\xi \leftarrow \tau \xi + (1 - \tau) \theta` (``ema_decay``).

    Notes
    -----
    In a client's first round the target starts as a copy of the received
    online network and the predictor is freshly initialised (seeded by the
    round's generator); afterwards both continue from the client's previous
    round while the online network starts from the new global model. The
    projector and predictor are ``Linear - BatchNorm1d - ReLU - Linear`` as in
    the paper; the optimiser is the run's (SGD or Adam), not LARS.
    """

    name = "byol"
    options = SSL_OPTIONS | {"ema_decay", "predictor_hidden"}
    summary = "online/EMA-target networks with a predictor; only the online network is sent"

    def network(self, model: nn.Module, config: TaskConfig, *, seed: int) -> nn.Module:
        """``model`` without its classifier plus a projection MLP (the online network)."""
        return ssl_network(
            model, hidden=config.projection_hidden, out=config.projection_dim, seed=seed
        )

    def local_networks(
        self, net: nn.Module, config: TaskConfig, kept: StateDict | None, seed: int
    ) -> tuple[nn.Module, nn.Module]:
        """The target network and the predictor: from ``kept``, else new (copy, seeded init)."""
        target = copy.deepcopy(net)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dims = (config.projection_dim, config.predictor_hidden, config.projection_dim)
            predictor = mlp_head(dims)
        predictor.to(next(net.parameters()).device)
        if kept is not None:
            target.load_state_dict(_split(kept, TARGET_PREFIX))
            predictor.load_state_dict(_split(kept, PREDICTOR_PREFIX))
        target.requires_grad_(False)
        return target, predictor

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
        """Train the online ``net`` in place; return the target and predictor to keep."""
        anchors = proximal_anchors(net, prox_mu, global_state)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        target, predictor = self.local_networks(net, config, kept, seed)
        online = nn.ModuleList([net, predictor])
        online.train()
        target.train()

        def loss_of(views: torch.Tensor, b: int) -> torch.Tensor:
            p = predictor(net(views))
            with torch.no_grad():
                z = target(views)
            return byol_loss(p[:b], z[b:]) + byol_loss(p[b:], z[:b])

        result = two_view_epochs(
            x, train, config, make_optimizer(online, train), loss_of, generator=generator,
            epochs=train.epochs if epochs is None else epochs, anchors=anchors, prox_mu=prox_mu,
            after_step=lambda: ema_update(target, net, config.ema_decay),
        )  # fmt: skip
        kept_state = {
            **{f"{TARGET_PREFIX}{k}": v.detach().clone() for k, v in target.state_dict().items()},
            **{
                f"{PREDICTOR_PREFIX}{k}": v.detach().clone()
                for k, v in predictor.state_dict().items()
            },
        }
        return LocalRound(result, kept_state)
