"""Permutation-aligned FedAvg (Git Re-Basin's weight or activation matching, then averaging)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedmerge.align import (
    PermutationSpec,
    activation_matching,
    apply_permutation,
    count_moved_units,
    permutation_spec_for,
    weight_matching,
)
from fedmerge.merge import RobustConfig, reset_bn_state, weighted_average
from strategies.plugins.base import ServerContext, ServerPlugin, StateDict
from strategies.plugins.fedavg import ServerOptions
from strategies.robust import robust_combine

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.replies import ClientUpdate

ALIGN_METHODS: tuple[str, ...] = ("weight", "activation")


@dataclass(frozen=True)
class AlignedOptions(ServerOptions):
    """Options of ``strategy.name = "aligned"``.

    Attributes
    ----------
    method : {"weight", "activation"} (default: "weight")
        Git Re-Basin weight matching, or activation matching on the server's
        proxy data (needs ``proxy_samples > 0``).
    proxy_samples : int (default: 0)
        Training inputs the server holds (drawn with the run seed from the
        whole training set): activation matching and BatchNorm re-estimation; >= 0.
    reset_bn : bool (default: True)
        Re-estimate BatchNorm statistics of the merged model on the proxy data.
    """

    method: str = "weight"
    proxy_samples: int = 0
    reset_bn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in ALIGN_METHODS:
            raise ValueError(f"method: got {self.method!r}; allowed: {', '.join(ALIGN_METHODS)}")
        if self.proxy_samples < 0:
            raise ValueError(f"proxy_samples: got {self.proxy_samples!r}; allowed: >= 0")
        if self.method == "activation" and self.proxy_samples == 0:
            raise ValueError(
                "proxy_samples: got 0; allowed: > 0 with method 'activation' "
                "(the server's proxy data)"
            )


@dataclass
class ServerModel:
    """The global architecture, its permutation spec and the server's proxy batches."""

    model: nn.Module
    spec: PermutationSpec
    proxy: list[torch.Tensor] = field(default_factory=list)
    reset_bn: bool = True

    @classmethod
    def for_context(cls, ctx: ServerContext, proxy_samples: int, reset_bn: bool) -> ServerModel:
        """Derive the spec (traced for a model that is not built in) and draw the proxy data."""
        spec = permutation_spec_for(ctx.model, ctx.example_input)
        return cls(ctx.model, spec, ctx.proxy_batches(proxy_samples), reset_bn)

    def holding(self, state: StateDict) -> nn.Module:
        """A copy of the architecture holding ``state``."""
        m = copy.deepcopy(self.model)
        m.load_state_dict(state)
        return m

    def finish(self, state: StateDict) -> StateDict:
        """Re-estimate BatchNorm statistics on the proxy data, when asked and possible."""
        if not self.reset_bn:
            return state
        return reset_bn_state(self.model, state, self.proxy)


@dataclass
class AlignedMerge:
    """Align each update to the global model, then take the sample-weighted mean.

    With the robust options (``robust``), the aligned models are clipped and
    combined by :func:`strategies.robust.robust_combine` instead.
    """

    server: ServerModel
    method: str
    seed: int
    robust: RobustConfig = field(default_factory=RobustConfig)

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The new global state and ``units_permuted`` (per permutation group, summed)."""
        spec = self.server.spec
        rng = np.random.default_rng([self.seed, server_round])
        global_model = self.server.holding(global_state)
        aligned: list[StateDict] = []
        moved: dict[str, int] = {}
        for u in updates:
            if self.method == "weight":
                perm, _ = weight_matching(spec, global_state, u.state, rng=rng)
            else:
                perm, _ = activation_matching(
                    spec, global_model, self.server.holding(u.state), self.server.proxy
                )
            aligned.append(apply_permutation(spec, perm, u.state))
            for group, count in count_moved_units(perm).items():
                moved[group] = moved.get(group, 0) + count
        counts = [u.num_examples for u in updates]
        extras: dict[str, Any] = {"units_permuted": moved}
        if self.robust.is_plain:
            state = weighted_average(aligned, [float(c) for c in counts])
        else:
            state, robust_extras = robust_combine(
                self.robust, global_state, aligned, counts, [u.partition for u in updates],
                mean=lambda s, c: weighted_average(s, [float(x) for x in c]),
            )  # fmt: skip
            extras.update(robust_extras)
        return self.server.finish(state), extras


class AlignedPlugin(ServerPlugin):
    """Aligned FedAvg (Git Re-Basin, Ainsworth et al., ICLR 2023, https://arxiv.org/abs/2209.04836).

    Notes
    -----
    Clients start every round from the global model, so after a few local
    steps most units stay where they were: the per-round ``units_permuted``
    shows how much alignment actually changed.
    """

    name = "aligned"
    aligns = True
    Options = AlignedOptions
    summary = "clients permuted onto the global model's units (Git Re-Basin), then averaged"

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """A merging strategy whose aggregation is :class:`AlignedMerge`."""
        from strategies.merging import MergingStrategy

        server = ServerModel.for_context(ctx, options.proxy_samples, options.reset_bn)
        return MergingStrategy(
            merge=AlignedMerge(server, options.method, ctx.config.seed, options),
            description=(
                f"Aligned FedAvg: {options.method} matching, {len(server.proxy)} proxy batches, "
                f"BN reset {options.reset_bn}"
            ),
            fraction_evaluate=options.fraction_evaluate,
            **options.screening,
            **ctx.flower_options,
        )
