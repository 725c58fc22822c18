"""L-DAWA: layer-wise divergence-aware weight aggregation (Rehman et al., ICCV 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedmerge.merge import LDAWAConfig, ldawa_aggregate, weighted_average
from strategies.plugins.base import ServerContext, ServerPlugin, StateDict
from strategies.plugins.fedavg import ServerOptions

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.replies import ClientUpdate


@dataclass(frozen=True)
class LDAWAOptions(ServerOptions):
    """Options of ``strategy.name = "ldawa"``; the defaults are the paper's.

    Attributes
    ----------
    warmup_rounds : int (default: 0)
        Rounds of plain sample-weighted FedAvg before L-DAWA starts (the
        reference code warms up with FedAvg); >= 0.
    normalize : {"clients", "weights"} (default: "clients")
        Divide the weighted sum by the number of clients (reference code) or by
        the sum of the layer's weights (a convex combination).
    negative : {"keep", "clip", "abs"} (default: "keep")
        A negative cosine is kept (reference), clipped to 0, or replaced by
        its magnitude.
    bn : {"weighted", "average"} (default: "weighted")
        BatchNorm statistics weighted like any layer (reference), or averaged
        with FedAvg's sample-count weights.
    layer : {"tensor", "module"} (default: "tensor")
        A "layer" is one tensor of the state dict, or one module's tensors
        sharing one cosine.
    sample_weighted : bool (default: False)
        Multiply every client's layer weight by ``n_k / mean(n)``.

    See :class:`fedmerge.merge.LDAWAConfig` for the details.
    """

    warmup_rounds: int = 0
    normalize: str = "clients"
    negative: str = "keep"
    bn: str = "weighted"
    layer: str = "tensor"
    sample_weighted: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds: got {self.warmup_rounds!r}; allowed: an integer >= 0")
        self.ldawa_config()  # the kernel validates the rest

    def ldawa_config(self) -> LDAWAConfig:
        """The kernel's :class:`~fedmerge.merge.LDAWAConfig` of these options."""
        return LDAWAConfig(
            normalize=self.normalize,
            negative=self.negative,
            bn=self.bn,
            layer=self.layer,
            sample_weighted=self.sample_weighted,
        )


@dataclass(frozen=True)
class LDAWAMerge:
    """L-DAWA's aggregation of one round: FedAvg during warm-up, L-DAWA after."""

    options: LDAWAOptions

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The new global state (and no per-round extras)."""
        counts = [u.num_examples for u in updates]
        states = [u.state for u in updates]
        if server_round <= self.options.warmup_rounds:
            return weighted_average(states, [float(c) for c in counts]), {}
        return ldawa_aggregate(global_state, states, counts, self.options.ldawa_config()), {}


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
            description=f"L-DAWA: warm-up {options.warmup_rounds} rounds, {options.ldawa_config()}",
            fraction_evaluate=options.fraction_evaluate,
            **ctx.flower_options,
        )
