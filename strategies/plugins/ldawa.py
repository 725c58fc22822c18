"""L-DAWA: layer-wise divergence-aware weight aggregation (Rehman et al., ICCV 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedmerge.merge import LDAWAConfig, ldawa_aggregate, ldawa_terms, weighted_average
from strategies.plugins.base import ServerContext, ServerPlugin, StateDict
from strategies.plugins.fedavg import ServerOptions
from strategies.robust import robust_combine

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.replies import ClientUpdate


@dataclass(frozen=True)
class LDAWAOptions(ServerOptions, LDAWAConfig):
    """Options of ``strategy.name = "ldawa"``; the defaults are the paper's.

    The kernel's :class:`fedmerge.merge.LDAWAConfig` (``normalize``,
    ``negative``, ``bn``, ``layer``, ``sample_weighted``: documented and
    checked there), plus:

    Attributes
    ----------
    warmup_rounds : int (default: 0)
        Rounds of plain sample-weighted FedAvg before L-DAWA starts (the
        reference code warms up with FedAvg); >= 0.
    """

    warmup_rounds: int = 0

    def __post_init__(self) -> None:
        ServerOptions.__post_init__(self)
        LDAWAConfig.__post_init__(self)
        if self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds: got {self.warmup_rounds!r}; allowed: an integer >= 0")


@dataclass(frozen=True)
class LDAWAMerge:
    """L-DAWA's aggregation of one round: FedAvg during warm-up, L-DAWA after.

    With the robust options, clipping applies to the client models, Krum
    selects the clients that enter L-DAWA (or the warm-up's FedAvg), and the
    median or trimmed mean replaces the mean over clients of the
    cosine-weighted layers (:func:`fedmerge.merge.ldawa_terms`; of the client
    models during warm-up).
    """

    options: LDAWAOptions

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The new global state and the robust step's extras (none without it)."""
        counts = [u.num_examples for u in updates]
        states = [u.state for u in updates]
        o = self.options
        if server_round <= o.warmup_rounds:
            if o.is_plain:
                return weighted_average(states, [float(c) for c in counts]), {}
            return robust_combine(
                o, global_state, states, counts, [u.partition for u in updates],
                mean=lambda s, c: weighted_average(s, [float(x) for x in c]),
            )  # fmt: skip
        if o.is_plain:
            return ldawa_aggregate(global_state, states, counts, o), {}
        return robust_combine(
            o, global_state, states, counts, [u.partition for u in updates],
            mean=lambda s, c: ldawa_aggregate(global_state, s, c, o),
            terms=lambda s, c: ldawa_terms(global_state, s, c, o),
        )  # fmt: skip


class LDAWAPlugin(ServerPlugin):
    """L-DAWA (Rehman et al., ICCV 2023, https://arxiv.org/abs/2307.07393).

    Each layer of the new global model is the mean over clients of the
    client's layer weighted by its cosine similarity with the previous global
    layer (:func:`fedmerge.merge.ldawa_aggregate`).
    """

    name = "ldawa"
    Options = LDAWAOptions
    summary = "each client layer weighted by its cosine similarity to the global layer (L-DAWA)"

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """A merging strategy whose aggregation is :func:`fedmerge.merge.ldawa_aggregate`."""
        from strategies.merging import MergingStrategy

        return MergingStrategy(
            merge=LDAWAMerge(options),
            description=f"L-DAWA: {options}",
            fraction_evaluate=options.fraction_evaluate,
            **options.screening,
            **ctx.flower_options,
        )
