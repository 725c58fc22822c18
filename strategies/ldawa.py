"""L-DAWA as a Flower strategy."""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedmerge.merge.average import weighted_average
from fedmerge.merge.ldawa import LDAWAConfig, ldawa_aggregate
from strategies.merging import MergingStrategy
from strategies.replies import ClientUpdate

logger = logging.getLogger(__name__)


class LDAWA(MergingStrategy):
    """Layer-wise divergence-aware weight aggregation (Rehman et al., ICCV 2023).

    Each layer of the new global model is the mean over clients of the
    client's layer weighted by its cosine similarity with the previous global
    layer (:func:`fedmerge.merge.ldawa.ldawa_aggregate`). Paper:
    https://arxiv.org/abs/2307.07393

    Parameters
    ----------
    config : LDAWAConfig
        Normalisation, negative cosines, BatchNorm statistics, layer
        granularity, sample counts; the defaults are the paper's.
    warmup_rounds : int (default: 0)
        Rounds of plain sample-weighted FedAvg before L-DAWA starts (the
        reference code warms up with FedAvg).
    **kwargs
        Flower's FedAvg options (sampling fractions, minimum nodes, keys).
    """

    def __init__(self, *, config: LDAWAConfig, warmup_rounds: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if warmup_rounds < 0:
            raise ValueError(
                f"strategy.ldawa_warmup_rounds: got {warmup_rounds}; allowed: an integer >= 0"
            )
        self.config = config
        self.warmup_rounds = warmup_rounds

    def summary(self) -> None:
        """Log the configuration once."""
        super().summary()
        logger.info("L-DAWA: warm-up %d rounds, %s", self.warmup_rounds, self.config)

    def merge(
        self, server_round: int, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """FedAvg during warm-up, L-DAWA after."""
        counts = [u.num_examples for u in updates]
        if server_round <= self.warmup_rounds:
            return weighted_average([u.state for u in updates], [float(c) for c in counts])
        return ldawa_aggregate(global_state, [u.state for u in updates], counts, self.config)
