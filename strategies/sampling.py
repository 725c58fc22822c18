"""Seeded client sampling over an explicit node-id -> partition-id map."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from fedmerge.merge import RobustConfig, weighted_average
from strategies import protocol
from strategies.replies import (
    EvaluationScreening,
    Screening,
    reply_partition,
    screen_evaluations,
    screen_replies,
)
from strategies.robust import robust_combine

logger = logging.getLogger(__name__)


def unique_partitions(partition_to_node: Mapping[int, int]) -> dict[int, int]:
    """Node id -> partition id for the nodes that hold exactly one partition."""
    count: dict[int, int] = {}
    for node in partition_to_node.values():
        count[node] = count.get(node, 0) + 1
    return {n: p for p, n in partition_to_node.items() if count[n] == 1}


def metric_statistics(records: list[RecordDict], metric: str) -> MetricRecord:
    """Mean, std, min, max and count of one metric over replies, in the order given.

    The ``train_metrics_aggr_fn``/``evaluate_metrics_aggr_fn`` of fedmerge's
    strategies: keys ``<metric>.mean``, ``.std``, ``.min``, ``.max``, ``.n``
    (an empty record when no reply has the metric).
    """
    values = [
        float(r[metric])  # type: ignore[arg-type]
        for record in records
        for r in record.metric_records.values()
        if metric in r
    ]
    if not values:
        return MetricRecord({})
    a = np.asarray(values, dtype=np.float64)
    return MetricRecord(
        {
            f"{metric}.mean": float(a.mean()),
            f"{metric}.std": float(a.std()),
            f"{metric}.min": float(a.min()),
            f"{metric}.max": float(a.max()),
            f"{metric}.n": len(a),
        }
    )


def _train_loss_stats(records: list[RecordDict], weight_key: str) -> MetricRecord:
    return metric_statistics(records, protocol.TRAIN_LOSS)


def _eval_accuracy_stats(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Statistics of ``eval_accuracy``, plus the sample-weighted accuracy and loss.

    ``eval_accuracy.weighted`` and ``eval_loss.weighted`` weigh every reply
    by its ``weight_key`` count (Flower's federated evaluation); they are the
    row's accuracy and loss with ``evaluation.server = "clients"``.
    """
    stats = metric_statistics(records, protocol.EVAL_ACCURACY)
    rows = [
        (float(r[weight_key]), float(r[protocol.EVAL_ACCURACY]), float(r[protocol.EVAL_LOSS]))  # type: ignore[arg-type]
        for record in records
        for r in record.metric_records.values()
        if {weight_key, protocol.EVAL_ACCURACY, protocol.EVAL_LOSS} <= set(r)
    ]
    total = sum(n for n, _, _ in rows)
    if total > 0:
        stats["eval_accuracy.weighted"] = sum(n * a for n, a, _ in rows) / total
        stats["eval_loss.weighted"] = sum(n * loss for n, _, loss in rows) / total
    return stats


@dataclass
class RoundOutcome:
    """What one round of aggregation returns to the ServerApp's recorder.

    Attributes
    ----------
    state : dict of str to Tensor, optional
        The new global model (``None``: no valid update, the model is unchanged).
    train_metrics : MetricRecord, optional
        Flower's aggregated train metrics (the strategy's ``train_metrics_aggr_fn``).
    extras : dict
        Strategy-specific per-round values for the metrics row
        (``units_permuted``, ``transport_cost_mean``, ...).
    skipped : list of str
        One reason per reply that was not aggregated.
    refused : int
        How many of the skipped replies arrived without an error and were
        refused by the screening.
    """

    state: dict[str, torch.Tensor] | None
    train_metrics: MetricRecord | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    refused: int = 0


class SeededSampling:
    """Mixin for Flower strategies: reproducible sampling, screened replies, explicit rounds.

    Flower's strategies sample nodes with the module-level ``random`` and
    aggregate replies in arrival order, so two runs with the same seed can
    differ. This mixin samples *partition ids* with a seeded
    ``numpy.random.Generator``, maps them to node ids, and sorts replies by
    partition id before aggregation. Replies are screened first: errors,
    missing records, other names or shapes, non-finite values or metrics,
    sample counts that are not finite or below 1 (or above the partition's
    size, where :meth:`bind_nodes` got the sizes) and, with ``screen_norm_ratio``,
    updates far longer than the round's median are skipped and counted,
    never merged; the round goes on with the rest. Client-side evaluation
    replies are screened the same way (:meth:`screen_evaluation`).

    :meth:`aggregate_round` takes the current global model as an argument and
    returns a :class:`RoundOutcome`; fedmerge's ServerApp drives rounds with
    it. Flower's ``aggregate_train`` works too (for ``Strategy.start``): it
    aggregates against the arrays the last ``configure_train`` sent.

    Call :meth:`bind_nodes` before the first round.

    Parameters
    ----------
    robust : RobustConfig, optional
        Clipping and robust aggregator of FedAvg's mean (merging strategies
        apply their own, see :mod:`strategies.robust`); none by default.
    screen_norm_ratio : float (default: 0.0)
        Refuse updates whose norm exceeds this many times the round's median
        update norm (0: off).
    **kwargs
        The Flower strategy's options.
    """

    fraction_train: float
    fraction_evaluate: float
    arrayrecord_key: str
    configrecord_key: str
    weighted_by_key: str
    #: Accept replies whose shapes differ from the global model (OT fusion).
    accepts_other_widths: bool = False
    #: Clipping and robust aggregator of FedAvg's mean (merging strategies do their own).
    robust: RobustConfig = RobustConfig()
    #: Refuse updates longer than this many times the round's median norm (0: off).
    screen_norm_ratio: float = 0.0
    #: Partition id -> training samples, where the server knows them (simulation).
    partition_sizes: Mapping[int, int] | None = None

    def __init__(
        self,
        *,
        robust: RobustConfig | None = None,
        screen_norm_ratio: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """Keep the screening and robust options; the rest goes to the Flower strategy."""
        super().__init__(**kwargs)
        self.robust = robust if robust is not None else RobustConfig()
        self.screen_norm_ratio = screen_norm_ratio

    def bind_nodes(
        self,
        partition_to_node: Mapping[int, int],
        *,
        clients_per_round: int,
        rng: np.random.Generator,
        partition_sizes: Mapping[int, int] | None = None,
    ) -> None:
        """Set the node map, the number of clients per round and the sampler.

        Several partitions may share a node (virtual clients in simulation):
        every message names its partition, and so does every reply. With
        ``partition_sizes`` (simulation: the server derives the partitions
        from the run configuration), a reply that reports more samples than
        its partition holds is refused.
        """
        self.partition_sizes = None if partition_sizes is None else dict(partition_sizes)
        self._partition_to_node = dict(partition_to_node)
        self._node_to_partition = unique_partitions(self._partition_to_node)
        self.clients_per_round = clients_per_round
        self._rng = rng
        self._sent: dict[str, torch.Tensor] | None = None

    @property
    def sampler_state(self) -> dict[str, Any]:
        """State of the sampling generator (saved in checkpoints; assign to restore)."""
        return dict(self._rng.bit_generator.state)

    @sampler_state.setter
    def sampler_state(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state

    def sample_partitions(self, k: int) -> list[int]:
        """Draw ``k`` distinct partition ids, in sorted order."""
        ids = sorted(self._partition_to_node)
        chosen = self._rng.choice(len(ids), size=min(k, len(ids)), replace=False)
        return sorted(ids[i] for i in chosen)

    def dispatch_order(self, partitions: list[int]) -> list[int]:
        """``partitions`` in the order their messages are sent: the largest first, where known.

        In simulation (``partition_sizes`` known) the engine hands messages
        to its actors in the order they were sent, so sending the largest
        partitions first (longest-processing-time-first scheduling) keeps
        the round from waiting for one large client that started last while
        the other actors idle. Ties go by partition id. Results do not
        depend on it: replies are put in partition order before they are
        aggregated.
        """
        sizes = self.partition_sizes
        if sizes is None:
            return list(partitions)
        return sorted(partitions, key=lambda p: (-sizes.get(p, 0), p))

    def partition_of(self, message: Message) -> int:
        """Partition id a reply is about (-1 if unknown)."""
        pid = reply_partition(message, self._node_to_partition)
        return -1 if pid is None else pid

    def extra_train_config(self) -> dict[str, float | int | str]:
        """Keys added to every training ConfigRecord (FedProx adds its mu)."""
        return {}

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, partitions: list[int], kind: str
    ) -> list[Message]:
        messages = []
        for p in self.dispatch_order(partitions):
            own = ConfigRecord({**config, protocol.PARTITION_ID: p})
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: own})
            messages.append(
                Message(content=record, message_type=kind, dst_node_id=self._partition_to_node[p])
            )
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to ``clients_per_round`` seeded-sampled nodes."""
        self._sent = dict(arrays.to_torch_state_dict())
        if self.fraction_train == 0.0:
            return []
        partitions = self.sample_partitions(self.clients_per_round)
        logger.info("round %d: training partitions %s", server_round, partitions)
        config[protocol.SERVER_ROUND] = server_round
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
        config[protocol.SERVER_ROUND] = server_round
        return self._messages(arrays, config, self.sample_partitions(k), MessageType.EVALUATE)

    def screen(
        self, replies: Iterable[Message], global_state: dict[str, torch.Tensor]
    ) -> Screening:
        """Valid updates in partition order, and why the others were skipped."""
        return screen_replies(
            replies,
            global_state,
            self._node_to_partition,
            arrays_key=self.arrayrecord_key,
            weight_key=self.weighted_by_key,
            allow_shape_mismatch=self.accepts_other_widths,
            partition_sizes=self.partition_sizes,
            norm_ratio=self.screen_norm_ratio,
        )

    def screen_evaluation(self, replies: Iterable[Message]) -> EvaluationScreening:
        """Valid client-side evaluation replies in partition order, and why the others were not."""
        return screen_evaluations(
            replies,
            self._node_to_partition,
            weight_key=self.weighted_by_key,
            partition_sizes=self.partition_sizes,
        )

    def aggregate_round(
        self, server_round: int, global_state: dict[str, torch.Tensor], replies: Iterable[Message]
    ) -> RoundOutcome:
        """Screen the replies, then aggregate the valid ones with Flower's FedAvg.

        With clipping or a robust aggregator (:attr:`robust`), the valid
        updates go through :func:`strategies.robust.robust_combine` instead,
        whose mean is the sample-weighted mean.
        """
        screening = self.screen(replies, global_state)
        valid = [u.message for u in screening.updates]
        skipped, refused = screening.skipped, screening.refused
        if not valid:
            return RoundOutcome(None, skipped=skipped, refused=refused)
        if not self.robust.is_plain:
            updates = screening.updates
            state, extras = robust_combine(
                self.robust,
                global_state,
                [u.state for u in updates],
                [u.num_examples for u in updates],
                [u.partition for u in updates],
                mean=lambda states, counts: weighted_average(states, [float(c) for c in counts]),
            )
            metrics = self.train_metrics_aggr_fn(  # type: ignore[attr-defined]
                [m.content for m in valid], self.weighted_by_key
            )
            return RoundOutcome(state, metrics, extras, skipped, refused)
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        merged = None if arrays is None else dict(arrays.to_torch_state_dict())
        return RoundOutcome(merged, metrics, skipped=skipped, refused=refused)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's API: :meth:`aggregate_round` against the arrays last sent."""
        if self._sent is None:
            raise RuntimeError("aggregate_train: configure_train has not sent a model yet")
        outcome = self.aggregate_round(server_round, self._sent, replies)
        arrays = None if outcome.state is None else ArrayRecord(outcome.state)
        return arrays, outcome.train_metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the valid evaluation replies (:meth:`screen_evaluation`) in partition order."""
        valid = self.screen_evaluation(replies).replies
        if not valid:
            return None
        return super().aggregate_evaluate(server_round, valid)  # type: ignore[misc, no-any-return]


def _with_statistics(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.setdefault("train_metrics_aggr_fn", _train_loss_stats)
    kwargs.setdefault("evaluate_metrics_aggr_fn", _eval_accuracy_stats)
    return kwargs


class SeededFedAvg(SeededSampling, FedAvg):
    """Flower's :class:`~flwr.serverapp.strategy.FedAvg` with seeded sampling.

    FedAvg (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629):
    the new global model is the sample-count-weighted mean of the replies.
    Train and evaluation metrics are aggregated as statistics
    (:func:`metric_statistics`) of ``train_loss`` and ``eval_accuracy``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_with_statistics(kwargs))


class SeededFedProx(SeededSampling, FedProx):
    """Flower's :class:`~flwr.serverapp.strategy.FedProx` with seeded sampling.

    FedProx (Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127):
    FedAvg aggregation; clients add ``mu/2 * ||w - w_global||^2`` to their
    loss. ``proximal-mu`` travels in every training ConfigRecord.
    """

    proximal_mu: float

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_with_statistics(kwargs))

    def extra_train_config(self) -> dict[str, float | int | str]:
        """Add FedProx's ``proximal-mu``."""
        return {protocol.PROXIMAL_MU: float(self.proximal_mu)}
