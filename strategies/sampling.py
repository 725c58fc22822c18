"""Seeded client sampling over an explicit node-id -> partition-id map."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Result

from strategies.replies import Screening, screen_replies

logger = logging.getLogger(__name__)


class SeededSampling:
    """Mixin for Flower strategies: reproducible sampling and reply order.

    Flower's strategies sample nodes with the module-level ``random`` and
    aggregate replies in arrival order, so two runs with the same seed can
    differ. This mixin samples *partition ids* with a seeded
    ``numpy.random.Generator`` and maps them to node ids, and sorts replies by
    partition id before aggregation. It also keeps the current global model
    (``global_state``) and screens replies: errors, missing records, other
    names or shapes and non-finite values are skipped and counted, never
    merged; the round goes on with the rest. Everything else (record keys, metric
    aggregation, evaluation, ``summary()``) is the wrapped strategy's.

    Call :meth:`bind_nodes` before :meth:`start`.
    """

    fraction_train: float
    fraction_evaluate: float
    arrayrecord_key: str
    configrecord_key: str
    weighted_by_key: str
    global_state: dict[str, torch.Tensor]
    _round_report: dict[str, Any]
    _node_to_partition: dict[int, int]
    _partition_to_node: dict[int, int]
    _rng: np.random.Generator
    clients_per_round: int

    def bind_nodes(
        self,
        partition_to_node: Mapping[int, int],
        *,
        clients_per_round: int,
        rng: np.random.Generator,
    ) -> None:
        """Set the node map, the number of clients per round and the sampler."""
        self._partition_to_node = dict(partition_to_node)
        self._node_to_partition = {n: p for p, n in self._partition_to_node.items()}
        self.clients_per_round = clients_per_round
        self._rng = rng
        self.round_offset = 0

    def sampler_state(self) -> dict:
        """State of the sampling generator (saved in checkpoints)."""
        return dict(self._rng.bit_generator.state)

    def resume_from(self, completed_rounds: int, sampler_state: dict) -> None:
        """Continue after ``completed_rounds``: restore the sampler, shift round numbers.

        Flower's ``Strategy.start`` counts rounds from 1; after a resume the
        strategy is started for the remaining rounds and adds this offset to
        the ``server-round`` it sends, so clients derive the same seeds as in
        an uninterrupted run.
        """
        self._rng.bit_generator.state = sampler_state
        self.round_offset = completed_rounds

    def sample_partitions(self, k: int) -> list[int]:
        """Draw ``k`` distinct partition ids, in sorted order."""
        ids = sorted(self._partition_to_node)
        chosen = self._rng.choice(len(ids), size=min(k, len(ids)), replace=False)
        return sorted(ids[i] for i in chosen)

    def partition_of(self, message: Message) -> int:
        """Partition id of the node that sent ``message`` (-1 if unknown)."""
        return self._node_to_partition.get(message.metadata.src_node_id, -1)

    def extra_train_config(self) -> dict[str, float | int | str]:
        """Keys added to every training ConfigRecord (FedProx adds its mu)."""
        return {}

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, partitions: list[int], kind: str
    ) -> list[Message]:
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [
            Message(content=record, message_type=kind, dst_node_id=self._partition_to_node[p])
            for p in partitions
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to ``clients_per_round`` seeded-sampled nodes."""
        if self.fraction_train == 0.0:
            return []
        server_round += self.round_offset
        partitions = self.sample_partitions(self.clients_per_round)
        logger.info("round %d: training partitions %s", server_round, partitions)
        config["server-round"] = server_round
        for key, value in self.extra_train_config().items():
            config[key] = value
        return self._messages(arrays, config, partitions, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to a seeded sample of ``fraction_evaluate`` nodes."""
        if self.fraction_evaluate == 0.0:
            return []
        k = max(1, int(len(self._partition_to_node) * self.fraction_evaluate))
        config["server-round"] = server_round + self.round_offset
        return self._messages(arrays, config, self.sample_partitions(k), MessageType.EVALUATE)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
        """Remember the initial global model, then run Flower's round loop."""
        self.global_state = dict(initial_arrays.to_torch_state_dict())
        return super().start(grid, initial_arrays, *args, **kwargs)  # type: ignore[misc]

    def take_round_report(self) -> dict[str, Any]:
        """Per-round extras for the metrics row (skipped replies, ...); resets them."""
        report, self._round_report = getattr(self, "_round_report", {}), {}
        return report

    def report(self, **items: Any) -> None:
        """Add items to this round's report."""
        if not hasattr(self, "_round_report"):
            self._round_report = {}
        self._round_report.update(items)

    def screen(self, replies: Iterable[Message], **kwargs: Any) -> Screening:
        """Valid updates in partition order; skipped replies are counted in the report."""
        screening = screen_replies(
            replies,
            getattr(self, "global_state", None),
            self._node_to_partition,
            arrays_key=self.arrayrecord_key,
            weight_key=self.weighted_by_key,
            **kwargs,
        )
        self.report(skipped=len(screening.skipped), skipped_reasons=screening.skipped)
        return screening

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, then aggregate the valid ones in partition order."""
        screening = self.screen(replies)
        valid = [u.message for u in screening.updates]
        if not valid:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        if arrays is not None:
            self.global_state = dict(arrays.to_torch_state_dict())
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate evaluation replies in partition order."""
        ordered = sorted(replies, key=self.partition_of)
        return super().aggregate_evaluate(server_round, ordered)  # type: ignore[misc]


class SeededFedAvg(SeededSampling, FedAvg):
    """Flower's :class:`~flwr.serverapp.strategy.FedAvg` with seeded sampling.

    FedAvg (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629):
    the new global model is the sample-count-weighted mean of the replies.
    """


class SeededFedProx(SeededSampling, FedProx):
    """Flower's :class:`~flwr.serverapp.strategy.FedProx` with seeded sampling.

    FedProx (Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127):
    FedAvg aggregation; clients add ``mu/2 * ||w - w_global||^2`` to their
    loss. ``proximal-mu`` travels in every training ConfigRecord.
    """

    proximal_mu: float

    def extra_train_config(self) -> dict[str, float | int | str]:
        """Add FedProx's ``proximal-mu``."""
        return {"proximal-mu": float(self.proximal_mu)}
