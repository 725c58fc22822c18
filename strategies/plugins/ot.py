"""OT fusion: clients soft-aligned onto the global model by optimal transport, then averaged."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from fedmerge.align import (
    OT_SOLVERS,
    apply_transport,
    collect_activation_stats,
    ot_align,
    ot_fuse,
    permutation_spec_for,
)
from fedmerge.merge import weighted_average
from strategies.plugins.aligned import ServerModel
from strategies.plugins.base import (
    ClientContext,
    ClientStart,
    ServerContext,
    ServerPlugin,
    StateDict,
)
from strategies.plugins.fedavg import ServerOptions
from strategies.robust import robust_combine

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.config import RunConfig
    from strategies.replies import ClientUpdate

OT_COSTS: tuple[str, ...] = ("weight", "activation")
OT_MARGINALS: tuple[str, ...] = ("uniform", "activation")


@dataclass(frozen=True)
class OTOptions(ServerOptions):
    """Options of ``strategy.name = "ot"``.

    Attributes
    ----------
    solver : {"emd", "sinkhorn"} (default: "emd")
        Exact transport (EMD) or entropic Sinkhorn.
    reg : float (default: 0.1)
        Sinkhorn regularisation, relative to the largest cost; > 0.
    cost : {"weight", "activation"} (default: "weight")
        Ground cost between units: distances of their weights, or of their
        activations on the proxy data.
    marginals : {"uniform", "activation"} (default: "uniform")
        Unit masses: uniform, or proportional to mean activation.
    proxy_samples : int (default: 0)
        Training inputs the server holds (activation cost or marginals, and
        BatchNorm re-estimation); >= 0.
    reset_bn : bool (default: True)
        Re-estimate BatchNorm statistics of the fused model on the proxy data.
    client_widths : tuple of int (default: ())
        Widths of the clients' models, cycled over partition ids (empty: every
        client has the server's ``model.width``). A client of another width
        moves the global model onto its own units by OT, trains, and the
        server fuses it back.
    """

    solver: str = "emd"
    reg: float = 0.1
    cost: str = "weight"
    marginals: str = "uniform"
    proxy_samples: int = 0
    reset_bn: bool = True
    client_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, allowed in (
            ("solver", OT_SOLVERS),
            ("cost", OT_COSTS),
            ("marginals", OT_MARGINALS),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{key}: got {getattr(self, key)!r}; allowed: {', '.join(allowed)}"
                )
        if not (math.isfinite(self.reg) and self.reg > 0):
            raise ValueError(f"reg: got {self.reg!r}; allowed: a number > 0")
        if self.proxy_samples < 0:
            raise ValueError(f"proxy_samples: got {self.proxy_samples!r}; allowed: >= 0")
        if self.proxy_samples == 0 and "activation" in (self.cost, self.marginals):
            raise ValueError(
                "proxy_samples: got 0; allowed: > 0 with activation cost or marginals "
                "(the server's proxy data)"
            )
        if any(w < 1 for w in self.client_widths):
            raise ValueError(
                f"client_widths: got {list(self.client_widths)}; allowed: a list of integers >= 1"
            )

    def client_width(self, partition_id: int, default: int) -> int:
        """Width of one client's model (``client_widths`` cycled, else ``default``)."""
        widths = self.client_widths
        return widths[partition_id % len(widths)] if widths else default


@dataclass
class OTMerge:
    """Transport each update onto the global units, then take the sample-weighted mean.

    With the robust options, the transported models are clipped and combined
    by :func:`strategies.robust.robust_combine` instead.
    """

    server: ServerModel
    options: OTOptions

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The new global state and ``transport_cost_mean`` over clients."""
        o, spec = self.options, self.server.spec
        moved_states, costs = [], []
        for u in updates:
            acts = None
            if "activation" in (o.cost, o.marginals):
                acts = collect_activation_stats(
                    spec,
                    self.server.holding(global_state),
                    self.server.holding(u.state),
                    self.server.proxy,
                )
            plans, info = ot_align(
                spec, global_state, u.state, solver=o.solver, reg=o.reg,
                cost=o.cost, marginals=o.marginals, activations=acts,
            )  # fmt: skip
            moved_states.append(apply_transport(spec, plans, u.state))
            costs.append(float(sum(info.costs.values())))
        counts = [u.num_examples for u in updates]
        extras: dict[str, Any] = {"transport_cost_mean": float(np.mean(costs))}
        if o.is_plain:
            state = weighted_average(moved_states, [float(c) for c in counts])
        else:
            state, robust_extras = robust_combine(
                o, global_state, moved_states, counts, [u.partition for u in updates],
                mean=lambda s, c: weighted_average(s, [float(x) for x in c]),
            )  # fmt: skip
            extras.update(robust_extras)
        return self.server.finish(state), extras


class OTPlugin(ServerPlugin):
    """OTFusion (Singh & Jaggi, NeurIPS 2020, https://arxiv.org/abs/1910.05653).

    Layer by layer, a transport plan between a client's and the global
    model's units moves the client onto the global units; the moved clients
    are averaged with sample-count weights. Clients of other widths are
    fused into the server's width.
    """

    name = "ot"
    aligns = True
    Options = OTOptions
    summary = "clients moved onto the global units by optimal transport, then averaged (OTFusion)"

    def check(self, options: Any, config: RunConfig) -> None:
        """Activation-based OT compares activations of equal widths only."""
        widths = set(options.client_widths) - {config.model.width}
        if widths and "activation" in (options.cost, options.marginals):
            raise ValueError(
                f"cost: got {options.cost!r} with client_widths {list(options.client_widths)}; "
                "allowed: cost = 'weight' and marginals = 'uniform' for clients of other widths"
            )

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """A merging strategy whose aggregation is :class:`OTMerge`; accepts other widths."""
        from strategies.merging import MergingStrategy

        server = ServerModel.for_context(ctx, options.proxy_samples, options.reset_bn)
        return MergingStrategy(
            merge=OTMerge(server, options),
            accepts_other_widths=bool(options.client_widths),
            description=(
                f"OT fusion: {options.solver} solver (reg {options.reg:g}), {options.cost} cost, "
                f"{options.marginals} marginals, {len(server.proxy)} proxy batches"
            ),
            fraction_evaluate=options.fraction_evaluate,
            **options.screening,
            **ctx.flower_options,
        )

    def client_start(
        self, options: Any, ctx: ClientContext, global_state: StateDict, kept: StateDict | None
    ) -> ClientStart:
        """A client of another width starts from the global model moved onto its own units.

        The client's previous model (its seeded initialisation in the first
        round) gives the target units; the transport plan from the global
        model's units is found with the weight cost, and the client starts
        from the transported global model alone (``weight_a = 0``), as the
        server does in the other direction.
        """
        width = options.client_width(ctx.partition_id, ctx.config.model.width)
        if width == ctx.config.model.width:
            return ClientStart(ctx.model, global_state)
        model: nn.Module = ctx.model_at_width(width)
        own = kept if kept is not None else model.state_dict()
        spec = permutation_spec_for(model, ctx.example_input)
        state = ot_fuse(
            spec, own, global_state, weight_a=0.0, solver=options.solver, reg=options.reg,
            cost="weight",
        )  # fmt: skip
        return ClientStart(model, state, keep=True)
