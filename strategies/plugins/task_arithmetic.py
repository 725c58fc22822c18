"""Task arithmetic (Ilharco et al., ICLR 2023): server-side and peer-side.

Every client's update is a task vector relative to the global model; the
server adds their weighted sum, scaled, to the global model
(:func:`fedmerge.merge.task_arithmetic`). The peer-side variant adds the
neighbours' task vectors relative to the peer's own model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedmerge.merge import (
    BN_STAT_RULES,
    PeerMergeInfo,
    has_batchnorm,
    reset_bn_state,
    task_arithmetic,
)
from strategies.plugins.base import (
    ClientContext,
    ServerContext,
    ServerPlugin,
    StateDict,
)
from strategies.plugins.fedavg import ServerOptions
from strategies.plugins.peer import GossipOptions, GossipSchedule

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.replies import ClientUpdate


def check_scale(scale: float) -> None:
    """``scale: got X; allowed: a finite number``."""
    if not (isinstance(scale, int | float) and math.isfinite(scale)):
        raise ValueError(f"scale: got {scale!r}; allowed: a finite number")


def check_bn_stats(bn_stats: str) -> None:
    """``bn_stats: got X; allowed: average, merge``."""
    if bn_stats not in BN_STAT_RULES:
        raise ValueError(f"bn_stats: got {bn_stats!r}; allowed: {', '.join(BN_STAT_RULES)}")


@dataclass(frozen=True)
class TaskArithmeticOptions(ServerOptions):
    r"""Options of ``strategy.name = "task-arithmetic"``.

    Attributes
    ----------
    scale : float (default: 1.0)
        :math:`\lambda` in :math:`\theta_g + \lambda \sum_k w_k (\theta_k - \theta_g)`,
        the weights :math:`w_k` summing to 1 (``scale = 1`` is the mean of the
        client models; the paper's :math:`\lambda` for K equal clients is
        ``scale / K``); finite.
    sample_weighted : bool (default: False)
        Weights proportional to the clients' sample counts (FedAvg's), else
        equal (the paper).
    bn_stats : {"average", "merge"} (default: "average")
        BatchNorm running statistics: the weighted mean of the clients', or
        merged like the parameters.
    """

    scale: float = 1.0
    sample_weighted: bool = False
    bn_stats: str = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scale(self.scale)
        check_bn_stats(self.bn_stats)


def client_weights(updates: Sequence[ClientUpdate], sample_weighted: bool) -> list[float] | None:
    """Sample counts (if ``sample_weighted`` and positive in total), else ``None`` (equal)."""
    counts = [float(u.num_examples) for u in updates]
    return counts if sample_weighted and sum(counts) > 0 else None


@dataclass(frozen=True)
class TaskArithmeticMerge:
    """One round of task arithmetic on the clients' task vectors."""

    options: TaskArithmeticOptions

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The new global state and the norm of the global update (``update_norm``)."""
        o = self.options
        weights = client_weights(updates, o.sample_weighted)
        states = [u.state for u in updates]
        new = task_arithmetic(global_state, states, weights, scale=o.scale, bn_stats=o.bn_stats)
        return new, {"update_norm": update_norm(global_state, new)}


def update_norm(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``new - old`` over the floating tensors."""
    total = sum(
        float((new[k].double() - v.double()).square().sum())
        for k, v in old.items()
        if v.is_floating_point()
    )
    return math.sqrt(total)


class TaskArithmeticPlugin(ServerPlugin):
    """Task arithmetic (Ilharco et al., ICLR 2023, https://arxiv.org/abs/2212.04089)."""

    name = "task-arithmetic"
    Options = TaskArithmeticOptions
    robust = False
    summary = "global model plus the scaled weighted sum of the clients' task vectors"

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """A merging strategy whose aggregation is :func:`fedmerge.merge.task_arithmetic`."""
        from strategies.merging import MergingStrategy

        return MergingStrategy(
            merge=TaskArithmeticMerge(options),
            description=f"task arithmetic: {options}",
            fraction_evaluate=options.fraction_evaluate,
            **ctx.flower_options,
        )


# -- peer side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerTaskArithmeticOptions(GossipOptions):
    r"""Options of ``strategy.name = "peer-task-arithmetic"`` (gossip's, plus these).

    Attributes
    ----------
    scale : float (default: 1.0)
        :math:`\lambda` in :math:`\theta_i + \lambda \sum_j \tilde W_{ij}
        (\theta_j - \theta_i)` (``scale = 1`` is gossip averaging); finite.
    bn_stats : {"average", "merge"} (default: "average")
        BatchNorm running statistics before re-estimation (``reset_bn``): the
        mix of the peers', or merged like the parameters.
    """

    scale: float = 1.0
    bn_stats: str = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scale(self.scale)
        check_bn_stats(self.bn_stats)


#: ``operator(base, states, weights) -> merged`` (the own model first among ``states``).
PeerOperator = Callable[[StateDict, list[StateDict], list[float]], StateDict]


def peer_task_vector_merge(
    operator: PeerOperator,
    ctx: ClientContext,
    own: StateDict,
    neighbours: Mapping[int, StateDict],
    mixing: Mapping[int, float],
    self_weight: float,
    *,
    reset_bn: bool,
    batches: Sequence[torch.Tensor],
) -> tuple[StateDict, PeerMergeInfo]:
    """Merge the neighbours' task vectors relative to ``own`` with ``operator``.

    The mixing weights of the neighbours present are renormalised with the
    peer's own weight (as :func:`fedmerge.merge.peer_merge` does); the own
    model enters with its weight and a zero task vector. BatchNorm statistics
    are then re-estimated on ``batches`` if ``reset_bn``.
    """
    present = {j: float(mixing[j]) for j in sorted(neighbours) if j in mixing}
    total = self_weight + sum(present.values())
    if total <= 0:
        raise ValueError(f"mixing: weights sum to {total}; allowed: a positive sum")
    weights = {j: w / total for j, w in present.items()}
    own_w = self_weight / total
    states = [own, *(dict(neighbours[j]) for j in weights)]
    merged = operator(own, states, [own_w, *weights.values()])
    did_reset = reset_bn and bool(batches) and has_batchnorm(ctx.model)
    if did_reset:
        merged = reset_bn_state(ctx.model, merged, batches)
    return merged, PeerMergeInfo(weights, own_w, dict.fromkeys(weights, 0), did_reset)


class PeerTaskVectorPlugin(GossipSchedule):
    """Peers that merge their neighbours' task vectors relative to their own model."""

    def operator(self, options: Any) -> PeerOperator:
        """The merge of task vectors (own model first)."""
        raise NotImplementedError

    def merge(
        self,
        options: Any,
        ctx: ClientContext,
        own: StateDict,
        neighbours: Mapping[int, StateDict],
        mixing: Mapping[int, float],
        self_weight: float,
        *,
        batches: Sequence[torch.Tensor],
        rng: np.random.Generator,
    ) -> tuple[StateDict, PeerMergeInfo]:
        """:func:`peer_task_vector_merge` with this plugin's operator."""
        return peer_task_vector_merge(
            self.operator(options), ctx, own, neighbours, mixing, self_weight,
            reset_bn=options.reset_bn, batches=batches,
        )  # fmt: skip


class PeerTaskArithmeticPlugin(PeerTaskVectorPlugin):
    """Task arithmetic on each peer, relative to its own model (no alignment)."""

    name = "peer-task-arithmetic"
    Options = PeerTaskArithmeticOptions
    summary = "peers add the scaled mix of their neighbours' task vectors, then train"

    def operator(self, options: Any) -> PeerOperator:
        """:func:`fedmerge.merge.task_arithmetic` with the own model's integer buffers."""

        def op(base: StateDict, states: list[StateDict], weights: list[float]) -> StateDict:
            return task_arithmetic(
                base, states, weights, scale=options.scale, bn_stats=options.bn_stats,
                integers="first",
            )  # fmt: skip

        return op
