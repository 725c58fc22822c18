"""Base class of the server-side merging strategies."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from strategies.replies import ClientUpdate
from strategies.sampling import SeededFedAvg


class MergingStrategy(SeededFedAvg):
    """FedAvg's sampling, evaluation and summary; aggregation by :meth:`merge`.

    Subclasses implement ``merge(server_round, global_state, updates)``, a thin
    adapter over a pure function of ``fedmerge.merge`` or ``fedmerge.align``.
    Replies are screened first (see :class:`~strategies.sampling.SeededSampling`);
    only valid updates reach ``merge``, in partition order.
    """

    #: Accept replies whose shapes differ from the global model (OT fusion).
    accepts_other_widths = False

    def merge(
        self, server_round: int, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """Return the new global state from the valid client updates."""
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, merge the valid ones, aggregate their metrics."""
        screening = self.screen(replies, allow_shape_mismatch=self.accepts_other_widths)
        if not screening.updates:
            return None, None
        state = self.merge(server_round + self.round_offset, self.global_state, screening.updates)
        self.global_state = state
        metrics = self.train_metrics_aggr_fn(
            [u.message.content for u in screening.updates], self.weighted_by_key
        )
        return ArrayRecord(state), metrics
