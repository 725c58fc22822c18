"""Decentralized strategies: DIMAT and its baselines (DIMAT-WM, gossip, local).

Each round the server relays to every peer its neighbours' models; the peer
applies the operator below (:func:`fedmerge.merge.peer_merge`), then trains.
DIMAT (Saadati et al., CVPR 2024) aligns
each neighbour to the peer by activation matching on the peer's local data;
DIMAT-WM by weight matching; gossip mixes without alignment; local never
mixes (the no-communication baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedmerge.align import permutation_spec_for
from fedmerge.align.activation_matching import DEAD_UNIT_RULES
from fedmerge.merge import PeerMergeInfo, peer_merge
from strategies.plugins.base import ClientContext, PeerPlugin, StateDict

PEER_INITS: tuple[str, ...] = ("independent", "shared")
SIMILARITIES: tuple[str, ...] = ("correlation", "cross-moment")
#: Where a peer takes its alignment and BatchNorm data (``align_data``).
ALIGN_DATA: tuple[str, ...] = ("local", "proxy")


@dataclass(frozen=True)
class LocalOptions:
    """Options of ``strategy.name = "local"`` (and of every peer strategy).

    Attributes
    ----------
    peer_init : {"independent", "shared"} (default: "independent")
        Every peer starts from its own seeded initialisation (DIMAT's
        setting), or all from the run's initial model.
    """

    peer_init: str = "independent"

    def __post_init__(self) -> None:
        if self.peer_init not in PEER_INITS:
            raise ValueError(f"peer_init: got {self.peer_init!r}; allowed: {', '.join(PEER_INITS)}")


@dataclass(frozen=True)
class GossipOptions(LocalOptions):
    """Options of ``strategy.name = "gossip"`` (plain neighbour averaging).

    Attributes
    ----------
    merge_every : int (default: 1)
        Peers merge every ``merge_every`` rounds and only train in between; >= 1.
    align_samples : int (default: 512)
        Local training inputs a peer draws each merge round for alignment and
        BatchNorm re-estimation; >= 1.
    reset_bn : bool (default: True)
        Re-estimate BatchNorm statistics of the mixed model on those inputs.
    align_data : {"local", "proxy"} (default: "local")
        Where those inputs come from: ``align_samples`` of the peer's own
        training data, drawn anew each merge round; or a proxy set of
        ``align_samples`` inputs drawn once with the run seed from the whole
        training set and shared by every peer (DIMAT's authors' code), none
        of them taken from the peer's local tensors.
    """

    merge_every: int = 1
    align_samples: int = 512
    reset_bn: bool = True
    align_data: str = "local"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.align_data not in ALIGN_DATA:
            raise ValueError(
                f"align_data: got {self.align_data!r}; allowed: {', '.join(ALIGN_DATA)}"
            )
        for key in ("merge_every", "align_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: got {getattr(self, key)!r}; allowed: an integer >= 1")


@dataclass(frozen=True)
class DIMATOptions(GossipOptions):
    """Options of ``strategy.name = "dimat"``.

    Attributes
    ----------
    similarity : {"correlation", "cross-moment"} (default: "correlation")
        Similarity of activations that activation matching maximises.
    dead_units : {"weights", "arbitrary"} (default: "weights")
        Units with zero activation on the alignment data are paired by the
        cosine similarity of their weights (a departure from DIMAT's code,
        which pairs them arbitrarily), or ``"arbitrary"``ly as there.
    """

    similarity: str = "correlation"
    dead_units: str = "weights"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dead_units not in DEAD_UNIT_RULES:
            raise ValueError(
                f"dead_units: got {self.dead_units!r}; allowed: {', '.join(DEAD_UNIT_RULES)}"
            )
        if self.similarity not in SIMILARITIES:
            raise ValueError(
                f"similarity: got {self.similarity!r}; allowed: {', '.join(SIMILARITIES)}"
            )


def alignment_batches(
    options: Any,
    samples: int,
    x: torch.Tensor,
    seed: int,
    proxy_batches: Callable[[int], list[torch.Tensor]],
) -> list[torch.Tensor]:
    """A peer's alignment and BatchNorm inputs in one merge round, in batches of 128.

    ``align_data = "proxy"``: ``proxy_batches(samples)`` (the run's shared
    proxy set; ``x`` is not read). Otherwise ``samples`` rows of the local
    inputs ``x``, drawn by a generator seeded with ``seed``.
    """
    if getattr(options, "align_data", "local") == "proxy":
        return proxy_batches(samples)
    sample = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:samples]
    return list(torch.split(x[sample], 128))


class GossipSchedule(PeerPlugin):
    """Peers with :class:`GossipOptions`: their initialisation, merge rounds and samples.

    The base of every peer strategy that merges (mixing here, task vectors in
    :mod:`strategies.plugins.task_arithmetic`); subclasses give the merge.
    """

    def independent_init(self, options: Any) -> bool:
        """``peer_init == "independent"``."""
        return bool(options.peer_init == "independent")

    def merges(self, options: Any, server_round: int) -> bool:
        """Every ``merge_every``-th round."""
        return bool(server_round % options.merge_every == 0)

    def align_samples(self, options: Any) -> int:
        """``align_samples`` (alignment and BatchNorm re-estimation)."""
        return int(options.align_samples)


class _MixingPlugin(GossipSchedule):
    """Peers that mix their neighbours' models; :attr:`align` says how they align them."""

    #: How neighbours are aligned before mixing (see :func:`fedmerge.merge.peer_merge`).
    align: ClassVar[str]

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
        """:func:`fedmerge.merge.peer_merge` with this strategy's alignment."""
        spec = None if self.align == "none" else permutation_spec_for(ctx.model, ctx.example_input)
        return peer_merge(
            ctx.model, own, neighbours, mixing, self_weight,
            align=self.align, spec=spec, batches=batches, reset_bn=options.reset_bn,
            method=getattr(options, "similarity", "correlation"),
            dead_units=getattr(options, "dead_units", "weights"), rng=rng,
        )  # fmt: skip


class DIMATPlugin(_MixingPlugin):
    """DIMAT: neighbours aligned by activation matching on local data, then mixed."""

    name = "dimat"
    aligns = True
    Options = DIMATOptions
    align = "activation"
    summary = "peers align neighbours by activation matching, mix, train (DIMAT)"


class DIMATWMPlugin(_MixingPlugin):
    """DIMAT with weight matching instead of activation matching."""

    name = "dimat-wm"
    aligns = True
    Options = GossipOptions
    align = "weight"
    summary = "peers align neighbours by weight matching, mix, train"


class GossipPlugin(_MixingPlugin):
    """Plain neighbour averaging (decentralized SGD's consensus step), no alignment."""

    name = "gossip"
    Options = GossipOptions
    align = "none"
    summary = "peers average their neighbours without alignment, then train"


class LocalPlugin(PeerPlugin):
    """No communication: every peer trains on its own data only (the lower baseline)."""

    name = "local"
    Options = LocalOptions
    summary = "peers never merge (local training only)"

    def independent_init(self, options: Any) -> bool:
        """``peer_init == "independent"``."""
        return bool(options.peer_init == "independent")

    def merges(self, options: Any, server_round: int) -> bool:
        """Never."""
        return False

    def align_samples(self, options: Any) -> int:
        """None needed (local peers never merge)."""
        return 0
