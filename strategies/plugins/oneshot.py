"""One-shot fusion: the server fuses independently trained clients once, then FedAvg fine-tunes.

OTFusion's and Git Re-Basin's regime: models trained apart (here: clients
of round 1 with ``train.independent_init`` and ``train.pretrain_epochs``)
are aligned to one of them and averaged once; every later round is plain
FedAvg from the fused model (``rounds - 1`` fine-tuning rounds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedmerge.merge import FUSION_METHODS, ensemble_accuracy, fuse_to_anchor, weighted_average
from fedmerge.training import evaluate
from strategies.plugins.aligned import ServerModel
from strategies.plugins.base import (
    ClientContext,
    ClientStart,
    ServerContext,
    ServerPlugin,
    StateDict,
)
from strategies.plugins.fedavg import ServerOptions

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.config import RunConfig
    from strategies.replies import ClientUpdate


@dataclass(frozen=True)
class OneShotOptions(ServerOptions):
    """Options of ``strategy.name = "oneshot"``.

    Attributes
    ----------
    method : {"average", "weight", "activation", "ot-weight", "ot-activation"} (default: "weight")
        How round 1's client models are aligned to the first of them (lowest
        partition id) before averaging: not at all (vanilla average), weight
        matching, activation matching on the proxy data, or exact optimal
        transport with the weight or activation cost (OTFusion).
    proxy_samples : int (default: 0)
        Training inputs the server holds (drawn with the run seed from the
        whole training set): activation methods and BatchNorm re-estimation;
        >= 0, > 0 for the activation methods.
    reset_bn : bool (default: True)
        Re-estimate BatchNorm statistics of the fused model on the proxy data.
    client_widths : tuple of int (default: ())
        Widths of the clients' models in the fused round, cycled over
        partition ids (empty: every client has ``model.width``): OTFusion's
        fusion of models of different widths. The first width is the
        anchor's (client 0) and must be ``model.width``, the fused model's;
        with other widths ``method`` must be ``"ot-weight"`` and
        ``train.independent_init`` true. Fine-tuning rounds train the fused
        model's width.
    """

    method: str = "weight"
    proxy_samples: int = 0
    reset_bn: bool = True
    client_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in FUSION_METHODS:
            raise ValueError(f"method: got {self.method!r}; allowed: {', '.join(FUSION_METHODS)}")
        if self.proxy_samples < 0:
            raise ValueError(f"proxy_samples: got {self.proxy_samples!r}; allowed: >= 0")
        if "activation" in self.method and self.proxy_samples == 0:
            raise ValueError(
                f"proxy_samples: got 0; allowed: > 0 with method {self.method!r} "
                "(the server's proxy data)"
            )
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in self.client_widths):
            raise ValueError(
                f"client_widths: got {list(self.client_widths)}; allowed: a list of integers >= 1"
            )

    def client_width(self, partition_id: int, default: int) -> int:
        """Width of one client's model (``client_widths`` cycled, else ``default``)."""
        widths = self.client_widths
        return widths[partition_id % len(widths)] if widths else default


@dataclass
class OneShotMerge:
    """Round 1: fuse to the first client and measure; later rounds: the weighted mean.

    ``test`` is the test set the fused model, every client's model and their
    ensemble are measured on (extras ``fusion``); ``holding(partition,
    state)`` builds a client's model when clients differ in width (else the
    server's architecture holds every state).
    """

    server: ServerModel
    method: str
    seed: int
    test: tuple[torch.Tensor, torch.Tensor]
    holding: Callable[[int, StateDict], nn.Module] | None = None

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The new global state; in round 1 also ``fusion`` (accuracies) in the extras."""
        counts = [float(u.num_examples) for u in updates]
        states = [u.state for u in updates]
        if server_round != 1:  # fine-tuning: FedAvg from the fused model
            return weighted_average(states, counts), {}
        fused = fuse_to_anchor(
            None if self.method == "average" else self.server.spec,
            self.server.model, states, counts, method=self.method, batches=self.server.proxy,
            rng=np.random.default_rng([self.seed, server_round]), reset_bn=self.server.reset_bn,
        )  # fmt: skip
        fusion = self.measure(fused, states, [u.partition for u in updates])
        shapes = {k: v.shape for k, v in self.server.model.state_dict().items()}
        one_width = all(s[k].shape == shape for s in states for k, shape in shapes.items())
        if self.method != "average" and one_width:  # the naive point, same clients
            vanilla = fuse_to_anchor(
                None, self.server.model, states, counts, method="average",
                batches=self.server.proxy, reset_bn=self.server.reset_bn,
            )  # fmt: skip
            loss, accuracy = evaluate(self.server.holding(vanilla), *self.test)
            fusion["vanilla_accuracy"] = accuracy
            fusion["vanilla_loss"] = loss
            fusion["vanilla_loss_barrier"] = loss - float(np.mean(fusion["client_loss"]))
        return fused, {"fusion": fusion}

    def measure(
        self, fused: StateDict, states: Sequence[StateDict], partitions: list[int]
    ) -> dict[str, Any]:
        """Test accuracy and loss of the fused model, of every client's model and of their ensemble.

        ``loss_barrier`` is Git Re-Basin's barrier at the fused point: the fused
        model's test loss minus the clients' mean test loss (with two clients
        of equal sample counts, the midpoint of the linear path between them);
        ``accuracy_barrier`` is the clients' mean accuracy minus the fused
        model's. Both are 0 or below when fusing costs nothing. An aligned
        fusion of clients of one width also records the vanilla average of
        the same clients (``vanilla_accuracy``, ``vanilla_loss``,
        ``vanilla_loss_barrier``; see :meth:`__call__`), the naive point the
        alignment is measured against.
        """
        x, y = self.test
        hold = self.holding or (lambda _, s: self.server.holding(s))
        models = [hold(p, s) for p, s in zip(partitions, states, strict=True)]
        fused_loss, fused_accuracy = evaluate(self.server.holding(fused), x, y)
        clients = [evaluate(m, x, y) for m in models]
        client_loss = [loss for loss, _ in clients]
        client_accuracy = [acc for _, acc in clients]
        return {
            "method": self.method,
            "fused_accuracy": fused_accuracy,
            "fused_loss": fused_loss,
            "client_partitions": partitions,
            "client_accuracy": client_accuracy,
            "client_loss": client_loss,
            "ensemble_accuracy": ensemble_accuracy(models, x, y),
            "loss_barrier": fused_loss - float(np.mean(client_loss)),
            "accuracy_barrier": float(np.mean(client_accuracy)) - fused_accuracy,
        }


class OneShotPlugin(ServerPlugin):
    """One-shot fusion (OTFusion, Singh & Jaggi, NeurIPS 2020; Git Re-Basin, ICLR 2023).

    Notes
    -----
    Meant for ``train.independent_init = true`` and ``train.pretrain_epochs``
    > 0 with every client in round 1 (``clients_per_round = num_clients``);
    without them it fuses clients that started from the global model.
    """

    name = "oneshot"
    aligns = True
    Options = OneShotOptions
    summary = "round 1 fuses the clients once (vanilla, matching or OT) and measures the ensemble"
    robust = False  # the fused round is a plain mean of aligned models

    def check(self, options: Any, config: RunConfig) -> None:
        """Clients of other widths: OT with the weight cost, anchored at ``model.width``."""
        super().check(options, config)
        widths = options.client_widths
        if not set(widths) - {config.model.width}:
            return
        got = f"client_widths: got {list(widths)}"
        if widths[0] != config.model.width:
            raise ValueError(
                f"{got}; allowed: a list whose first width is model.width "
                f"({config.model.width}): client 0 is the anchor and sets the fused width"
            )
        if options.method != "ot-weight":
            raise ValueError(
                f"method: got {options.method!r} with client_widths {list(widths)}; "
                "allowed: 'ot-weight' "
                "(only transport with the weight cost fuses models of different widths)"
            )
        if not config.train.independent_init:
            raise ValueError(
                f"train.independent_init: got false with strategy.client_widths {list(widths)}; "
                "allowed: true "
                "(clients of another width start from their own initialisation)"
            )
        if config.clients_per_round != config.num_clients:
            raise ValueError(
                f"clients_per_round: got {config.clients_per_round} with strategy.client_widths "
                f"{list(widths)}; "
                f"allowed: num_clients ({config.num_clients}), so that the anchor (client 0) "
                "is fused"
            )

    def client_width(self, options: Any, partition_id: int, width: int) -> int:
        """``client_widths`` cycled over partition ids (``width`` when empty)."""
        return int(options.client_width(partition_id, width))

    def client_start(
        self, options: Any, ctx: ClientContext, global_state: StateDict, kept: StateDict | None
    ) -> ClientStart:
        """The fused round: the client's own model at its width; later: the global model."""
        scratch = ctx.model.state_dict()
        if all(v.shape == scratch[k].shape for k, v in global_state.items()):
            return ClientStart(ctx.model, global_state)
        width = options.client_width(ctx.partition_id, ctx.config.model.width)
        return ClientStart(ctx.model_at_width(width), global_state)

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """A merging strategy whose aggregation is :class:`OneShotMerge`."""
        from strategies.encoder_eval import seeded_test_subset
        from strategies.federation import federation
        from strategies.merging import MergingStrategy

        fed = federation(ctx.config)
        data = fed.data
        server = ServerModel.for_context(ctx, options.proxy_samples, options.reset_bn)
        default = ctx.config.model.width

        def holding(partition: int, state: StateDict) -> nn.Module:
            width = options.client_width(partition, default)
            if width == default:
                return server.holding(state)
            model = fed.model_at_width(width)
            model.load_state_dict(state)
            return model

        test = seeded_test_subset(
            data.test_x, data.test_y, ctx.config.evaluation.test_samples, ctx.config.seed
        )
        merge = OneShotMerge(server, options.method, ctx.config.seed, test, holding)
        return MergingStrategy(
            merge=merge,
            accepts_other_widths=bool(options.client_widths),
            description=f"One-shot fusion: {options.method}, {len(server.proxy)} proxy batches",
            fraction_evaluate=options.fraction_evaluate,
            **options.screening,
            **ctx.flower_options,
        )
