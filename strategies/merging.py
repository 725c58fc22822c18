"""The server-side merging strategy: FedAvg's sampling and evaluation, a pluggable merge."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from flwr.app import Message

from strategies.replies import ClientUpdate
from strategies.sampling import RoundOutcome, SeededFedAvg

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class MergeFn(Protocol):
    """``merge(server_round, global_state, updates) -> (new global state, per-round extras)``."""

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The new global state and per-round extras for the metrics row."""
        ...


class MergingStrategy(SeededFedAvg):
    """FedAvg's sampling, evaluation and summary; aggregation by a merge function.

    The merge function is a thin adapter over :mod:`fedmerge.merge` or
    :mod:`fedmerge.align` (see the plugins in :mod:`strategies.plugins`).
    Replies are screened first; only valid updates reach it, in partition
    order. Train metrics are aggregated by Flower's ``train_metrics_aggr_fn``.

    Parameters
    ----------
    merge : MergeFn
        The aggregation.
    accepts_other_widths : bool (default: False)
        Accept replies whose shapes differ from the global model (OT fusion of
        clients of other widths).
    description : str (default: "")
        Logged once by :meth:`summary`.
    **kwargs
        Flower's FedAvg options.
    """

    def __init__(
        self,
        *,
        merge: MergeFn,
        accepts_other_widths: bool = False,
        description: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.merge = merge
        self.accepts_other_widths = accepts_other_widths
        self.description = description

    def summary(self) -> None:
        """Log the configuration once."""
        super().summary()
        if self.description:
            logger.info("%s", self.description)

    def aggregate_round(
        self, server_round: int, global_state: StateDict, replies: Iterable[Message]
    ) -> RoundOutcome:
        """Screen replies, merge the valid ones, aggregate their metrics."""
        screening = self.screen(replies, global_state)
        if not screening.updates:
            return RoundOutcome(None, skipped=screening.skipped, refused=screening.refused)
        state, extras = self.merge(server_round, global_state, screening.updates)
        metrics = self.train_metrics_aggr_fn(
            [u.message.content for u in screening.updates], self.weighted_by_key
        )
        return RoundOutcome(state, metrics, extras, screening.skipped, screening.refused)
