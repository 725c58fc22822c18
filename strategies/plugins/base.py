"""What a strategy plugin is: options, a server-side factory or a peer operator, client hooks.

A plugin is the one home of a strategy. It holds

- ``Options``: a frozen dataclass of the strategy's options, documented per
  field (numpydoc) and validated in ``__post_init__`` with the
  ``key: got X; allowed: Y`` grammar. It must not import ``flwr``: the CLI
  validates scenarios with it before any Flower process starts.
- for a server-side strategy (:class:`ServerPlugin`), :meth:`~ServerPlugin.strategy`,
  the factory of its Flower strategy (Flower is imported there, lazily), and
  optionally :meth:`~ServerPlugin.client_start`, the client-side hook that
  prepares the model a client trains, and
  :meth:`~ServerPlugin.reply_arrays`, extra arrays the client sends back
  (Fisher-weighted averaging's Fisher);
- for a decentralized strategy (:class:`PeerPlugin`), :meth:`~PeerPlugin.merges`
  and :meth:`~PeerPlugin.merge`, the operator each peer applies to its
  neighbours' models.

Each is a thin call into :mod:`fedmerge`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedmerge.merge import PeerMergeInfo

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.config import RunConfig

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerContext:
    """What a server-side strategy factory may use.

    Attributes
    ----------
    config : RunConfig
        The run.
    model : nn.Module
        The global model's architecture, holding the initial weights.
    example_input : Tensor
        A batch of inputs of the right shape (for tracing a model's spec).
    proxy_batches : callable
        ``proxy_batches(k)``: ``k`` training inputs held by the server, in
        batches, seeded by the run seed (empty for ``k = 0``).
    flower_options : dict
        Flower's sampling options for the strategy (fractions and minimum
        node counts), derived from the run's client counts.
    """

    config: RunConfig
    model: nn.Module
    example_input: torch.Tensor
    proxy_batches: Callable[[int], list[torch.Tensor]]
    flower_options: Mapping[str, Any]


@dataclass(frozen=True)
class ClientContext:
    """What a client-side hook may use.

    Attributes
    ----------
    config : RunConfig
        The run.
    partition_id : int
        This client's partition.
    model : nn.Module
        A scratch model of the run's architecture and width.
    model_at_width : callable
        ``model_at_width(w)``: a scratch model of width ``w`` (seeded by the run seed).
    example_input : Tensor
        A batch of inputs of the right shape (for tracing a model's spec).
    """

    config: RunConfig
    partition_id: int
    model: nn.Module
    model_at_width: Callable[[int], nn.Module]
    example_input: torch.Tensor


@dataclass(frozen=True)
class ClientStart:
    """The model a client trains this round, and whether it keeps it.

    Attributes
    ----------
    model : nn.Module
        The model to train (loaded with ``state`` by the ClientApp).
    state : dict of str to Tensor
        Its weights at the start of local training.
    keep : bool
        Keep the trained model on the node until the next round (a client of
        another width than the global model).
    """

    model: nn.Module
    state: StateDict
    keep: bool = False


class Plugin:
    """Base of every strategy plugin."""

    #: The name under which the plugin is registered (``strategy.name``).
    name: ClassVar[str]
    #: The frozen dataclass of its options.
    Options: ClassVar[type]
    #: Decentralized (peer-side) strategy: the server only relays models.
    peer: ClassVar[bool] = False
    #: Needs the model's permutation spec (checked before a run starts).
    aligns: ClassVar[bool] = False
    #: One line for ``fedmerge strategies`` and the README.
    summary: ClassVar[str] = ""

    def check(self, options: Any, config: RunConfig) -> None:
        """Checks that need the whole run (raise ``ValueError("key: ...")``); none by default."""


class ServerPlugin(Plugin):
    """A server-side strategy: clients train, the Flower strategy aggregates."""

    #: Whether its aggregation applies the robust section of its options
    #: (:class:`fedmerge.merge.RobustConfig`, inherited from ``ServerOptions``).
    #: A plugin that sets this to ``False`` refuses any robust option other
    #: than its default instead of ignoring it.
    robust: ClassVar[bool] = True

    def check(self, options: Any, config: RunConfig) -> None:
        """Refuse robust options the strategy would not apply (see :attr:`robust`)."""
        if self.robust:
            return
        from fedmerge.merge import RobustConfig

        for f in dataclasses.fields(RobustConfig):
            value = getattr(options, f.name, f.default)
            if value != f.default:
                raise ValueError(
                    f"{f.name}: got {value!r}; allowed for {self.name}: {f.default!r} "
                    f"({self.name} combines the clients by its own rule, not by a robust one)"
                )

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """Build the Flower strategy (import Flower here, not at module level)."""
        raise NotImplementedError

    def client_start(
        self, options: Any, ctx: ClientContext, global_state: StateDict, kept: StateDict | None
    ) -> ClientStart:
        """The model a client trains: by default the global model itself.

        ``kept`` is the model this client kept from its previous round (see
        :attr:`ClientStart.keep`), ``None`` before the first.
        """
        return ClientStart(ctx.model, global_state)

    def client_width(self, options: Any, partition_id: int, width: int) -> int:
        """Width of a client's own initialisation (``train.independent_init``): ``width``.

        A strategy that fuses clients of several widths overrides this;
        ``width`` is the run's ``model.width``.
        """
        return width

    def reply_arrays(
        self,
        options: Any,
        ctx: ClientContext,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        seed: int,
    ) -> dict[str, StateDict]:
        """Extra named arrays a client sends with its trained model: none by default.

        Called after local training with the trained ``model``, the client's
        data ``x``, ``y`` and a seed for this client and round; each returned
        state dict travels as an ArrayRecord under its name (a name of
        :mod:`strategies.protocol`, not one of the reply's own records) and
        reaches the merge in ``ClientUpdate.message``.
        """
        return {}


class PeerPlugin(Plugin):
    """A decentralized strategy: each peer merges its neighbours' models, then trains."""

    peer = True

    def independent_init(self, options: Any) -> bool:
        """Whether every peer starts from its own initialisation (else all from one)."""
        raise NotImplementedError

    def merges(self, options: Any, server_round: int) -> bool:
        """Whether peers merge in ``server_round`` (else they only train)."""
        raise NotImplementedError

    def align_samples(self, options: Any) -> int:
        """Local samples a peer draws for alignment and BatchNorm re-estimation."""
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
        """One peer's merge step: align (or not) its neighbours, mix, re-estimate statistics."""
        raise NotImplementedError
