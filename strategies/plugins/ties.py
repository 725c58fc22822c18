"""TIES-Merging (Yadav et al., NeurIPS 2023): server-side and peer-side.

Trim each client's task vector to its largest entries, elect a sign per
parameter, average the entries that agree with it
(:func:`fedmerge.merge.ties_merge`). The peer-side variant merges the
neighbours' task vectors relative to the peer's own model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedmerge.merge import TIES_TRIM_SCOPES, ties_merge
from strategies.plugins.base import ServerContext, ServerPlugin, StateDict
from strategies.plugins.fedavg import ServerOptions
from strategies.plugins.peer import GossipOptions
from strategies.plugins.task_arithmetic import (
    PeerOperator,
    PeerTaskVectorPlugin,
    check_bn_stats,
    check_scale,
    client_weights,
)

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.replies import ClientUpdate


def _check_ties(density: float, trim_scope: str) -> None:
    if not (isinstance(density, int | float) and 0 < density <= 1):
        raise ValueError(f"density: got {density!r}; allowed: a number in (0, 1]")
    if trim_scope not in TIES_TRIM_SCOPES:
        raise ValueError(f"trim_scope: got {trim_scope!r}; allowed: {', '.join(TIES_TRIM_SCOPES)}")


@dataclass(frozen=True)
class TIESOptions(ServerOptions):
    r"""Options of ``strategy.name = "ties"``; the defaults are the paper's.

    Attributes
    ----------
    density : float (default: 0.2)
        Share of each task vector's entries kept by the trim (the paper's
        top-k = 20 %); in (0, 1].
    scale : float (default: 1.0)
        :math:`\lambda` in :math:`\theta_g + \lambda \tau_m`; finite.
    trim_scope : {"model", "tensor"} (default: "model")
        Rank magnitudes over the whole flattened task vector (the reference
        code) or within each tensor.
    sample_weighted : bool (default: False)
        Weigh clients by their sample counts in the sign election and the
        disjoint mean, else equally (the paper).
    bn_stats : {"average", "merge"} (default: "average")
        BatchNorm running statistics: the weighted mean of the clients', or
        trimmed and merged like the parameters.
    """

    density: float = 0.2
    scale: float = 1.0
    trim_scope: str = "model"
    sample_weighted: bool = False
    bn_stats: str = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ties(self.density, self.trim_scope)
        check_scale(self.scale)
        check_bn_stats(self.bn_stats)


def nonzero_share(old: StateDict, new: StateDict) -> float:
    """Share of the floating entries (BatchNorm statistics excluded) that changed."""
    changed = total = 0
    for name, value in old.items():
        if value.is_floating_point() and not name.endswith(("running_mean", "running_var")):
            changed += int((new[name] != value).sum())
            total += value.numel()
    return changed / total if total else 0.0


@dataclass(frozen=True)
class TIESMerge:
    """One round of TIES-Merging on the clients' task vectors."""

    options: TIESOptions

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The new global state and the share of parameters it changed (``ties_changed``)."""
        o = self.options
        new = ties_merge(
            global_state, [u.state for u in updates], client_weights(updates, o.sample_weighted),
            density=o.density, scale=o.scale, trim_scope=o.trim_scope, bn_stats=o.bn_stats,
        )  # fmt: skip
        return new, {"ties_changed": nonzero_share(global_state, new)}


class TIESPlugin(ServerPlugin):
    """TIES-Merging (Yadav et al., NeurIPS 2023, https://arxiv.org/abs/2306.01708)."""

    name = "ties"
    Options = TIESOptions
    robust = False
    summary = "trim the clients' task vectors, elect signs, disjoint mean (TIES-Merging)"

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """A merging strategy whose aggregation is :func:`fedmerge.merge.ties_merge`."""
        from strategies.merging import MergingStrategy

        return MergingStrategy(
            merge=TIESMerge(options),
            description=f"TIES-Merging: {options}",
            fraction_evaluate=options.fraction_evaluate,
            **ctx.flower_options,
        )


@dataclass(frozen=True)
class PeerTIESOptions(GossipOptions):
    r"""Options of ``strategy.name = "peer-ties"`` (gossip's, plus these).

    Attributes
    ----------
    density : float (default: 0.2)
        Share of each neighbour's task vector kept by the trim; in (0, 1].
    scale : float (default: 1.0)
        :math:`\lambda` in :math:`\theta_i + \lambda \tau_m`; finite.
    trim_scope : {"model", "tensor"} (default: "model")
        Rank magnitudes over the whole task vector or within each tensor.
    bn_stats : {"average", "merge"} (default: "average")
        BatchNorm running statistics before re-estimation (``reset_bn``): the
        mix of the peers', or merged like the parameters.
    """

    density: float = 0.2
    scale: float = 1.0
    trim_scope: str = "model"
    bn_stats: str = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ties(self.density, self.trim_scope)
        check_scale(self.scale)
        check_bn_stats(self.bn_stats)


class PeerTIESPlugin(PeerTaskVectorPlugin):
    """TIES-Merging on each peer: its neighbours' task vectors relative to its own model.

    The mixing weights weigh the sign election and the disjoint mean; the
    peer's own (zero) task vector never agrees with an elected sign.
    """

    name = "peer-ties"
    Options = PeerTIESOptions
    summary = "peers TIES-merge their neighbours' task vectors into their own model, then train"

    def operator(self, options: Any) -> PeerOperator:
        """:func:`fedmerge.merge.ties_merge` with the own model's integer buffers."""

        def op(base: StateDict, states: list[StateDict], weights: list[float]) -> StateDict:
            return ties_merge(
                base, states, weights, density=options.density, scale=options.scale,
                trim_scope=options.trim_scope, bn_stats=options.bn_stats, integers="first",
            )  # fmt: skip

        return op
