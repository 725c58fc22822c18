"""Screening of training replies: what is merged, what is skipped and why."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmerge.merge import median_of, update_norms
from strategies import protocol

logger = logging.getLogger(__name__)


#: What Ray's error replies say when a simulated client's worker process died.
DEAD_WORKER_ERRORS = ("ActorDiedError", "RayActorError")


class DeadWorkerError(RuntimeError):
    """A Ray worker of the simulation died; Flower's runtime would not replace it."""


def stop_on_dead_worker(server_round: int, reasons: Iterable[str]) -> None:
    """Raise :class:`DeadWorkerError` if a reply of this round says its Ray worker died.

    Flower's simulation runtime keeps handing messages to a dead actor, so
    every later round would lose the clients it serves (and the run would
    carry on, degraded). The round loops call this after a round is recorded
    and checkpointed, so the run stops there and resumes, with fresh workers,
    when it is started again.
    """
    for reason in reasons:
        if any(name in reason for name in DEAD_WORKER_ERRORS):
            who = reason.split(":", 1)[0]
            raise DeadWorkerError(
                f"round {server_round}: the Ray worker of {who} died (ActorDiedError; killed, "
                "crashed or out of memory), and Flower's simulation runtime does not replace "
                f"it. The run stopped after round {server_round} with its checkpoint; run the "
                "same command again to resume with fresh workers"
            )


def reply_partition(msg: Message, node_to_partition: Mapping[int, int]) -> int | None:
    """The partition a reply is about: named in its ConfigRecord, else its node's (if one).

    fedmerge's ClientApp names the partition in every reply; an error reply
    has no content, so its node must map to one partition to be known.
    """
    if not msg.has_error():
        config = msg.content.get(protocol.CONFIG)
        if isinstance(config, ConfigRecord) and protocol.PARTITION_ID in config:
            return int(config[protocol.PARTITION_ID])  # type: ignore[arg-type]
    return node_to_partition.get(msg.metadata.src_node_id)


@dataclass(frozen=True)
class ClientUpdate:
    """One valid training reply, unpacked."""

    partition: int
    state: dict[str, torch.Tensor]
    num_examples: int
    message: Message


@dataclass
class Screening:
    """Valid updates of a round and the reasons replies were skipped.

    Attributes
    ----------
    updates : list of ClientUpdate
        Valid training replies, in partition order.
    skipped : list of str
        One reason per reply that is not used (error replies included).
    refused : int
        How many of the skipped replies arrived without an error but were
        refused by the screening (bad counts, values or norms).
    """

    updates: list[ClientUpdate] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: int = 0

    def refuse(self, reason: str) -> None:
        """Skip a reply that arrived without an error, for ``reason``."""
        self.skipped.append(reason)
        self.refused += 1


@dataclass
class EvaluationScreening:
    """Valid evaluation replies of a round and the reasons the others were skipped.

    Attributes
    ----------
    replies : list of Message
        Valid replies, in partition order.
    skipped : list of str
        One reason per reply that is not used (error replies included).
    refused : int
        Replies without an error that the screening refused.
    """

    replies: list[Message] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: int = 0


def check_count(value: object, size: int | None, weight_key: str) -> str | None:
    """Why a reported sample count is refused (``None``: it is valid).

    A count must be a finite number >= 1 (one sample at least: weights of
    a round never sum to zero) and, when the partition's size is known
    (simulation), at most that size.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"no valid metric {weight_key!r}"
    if not math.isfinite(value) or value < 1:
        return f"{weight_key} {value!r} is not a finite number >= 1"
    if size is not None and value > size:
        return f"{weight_key} {value!r} exceeds the partition size {size}"
    return None


def check_metrics(content: RecordDict) -> str | None:
    """Why the metrics of a reply are refused: a non-finite value (``None``: all finite)."""
    for record in content.metric_records.values():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                return f"metric {key!r} is not finite ({value!r})"
    return None


def screen_replies(
    replies: Iterable[Message],
    reference: Mapping[str, torch.Tensor] | None,
    partition_of: Mapping[int, int],
    *,
    arrays_key: str = "arrays",
    weight_key: str = "num-examples",
    allow_shape_mismatch: bool = False,
    partition_sizes: Mapping[int, int] | None = None,
    norm_ratio: float = 0.0,
) -> Screening:
    """Unpack replies; skip (and say why) every one that must not be merged.

    A reply is skipped when it carries an error, has no ``arrays_key``
    ArrayRecord or no valid ``weight_key`` metric (a finite number >= 1, at
    most the partition's size when ``partition_sizes`` knows it), a
    non-finite metric (a train loss of NaN), other parameter names than
    ``reference``, arrays of other shapes (unless ``allow_shape_mismatch``,
    for fusion of different widths), or any non-finite value. With
    ``norm_ratio`` k > 0, an update whose Euclidean norm ``||W_i - W_g||``
    exceeds k times the median update norm of the round's remaining replies
    is refused too.

    Parameters
    ----------
    replies : iterable of Message
        Replies of one training round.
    reference : mapping of str to Tensor, optional
        The global model; names and shapes of replies must match it.
    partition_of : mapping of int to int
        Node id -> partition id, for nodes that hold one partition (replies
        that name their partition use that; see :func:`reply_partition`).
        Valid updates are returned in partition order.
    arrays_key, weight_key : str
        Record keys of the weights and of the sample count.
    allow_shape_mismatch : bool (default: False)
        Accept arrays whose shapes differ from the reference.
    partition_sizes : mapping of int to int, optional
        Partition id -> its number of training samples, where the server
        knows them (simulation): a larger reported count is refused.
    norm_ratio : float (default: 0.0)
        Refuse updates whose norm is above ``norm_ratio`` x the median norm
        of the round (0: off). Updates of another width than the reference
        are not norm-screened.

    Returns
    -------
    Screening
        Valid updates sorted by partition id, and one reason per skipped reply.
    """
    out = Screening()
    for msg in replies:
        node = msg.metadata.src_node_id
        pid = reply_partition(msg, partition_of)
        who = f"partition {'?' if pid is None else pid} (node {node})"
        if msg.has_error():
            out.skipped.append(f"{who}: error {msg.error.reason}")
            continue
        arrays = msg.content.get(arrays_key)
        if not isinstance(arrays, ArrayRecord):
            out.skipped.append(f"{who}: no ArrayRecord {arrays_key!r}")
            continue
        counts = [
            r[weight_key]
            for r in msg.content.values()
            if isinstance(r, MetricRecord) and weight_key in r
        ]
        size = None if partition_sizes is None or pid is None else partition_sizes.get(pid)
        why = check_count(counts[0], size, weight_key) if counts else None
        why = why or check_metrics(msg.content)
        if not counts:
            why = f"no valid metric {weight_key!r}"
        if why is not None:
            out.refuse(f"{who}: {why}")
            continue
        try:
            state = arrays.to_torch_state_dict()
        except Exception as exc:  # malformed payload: never merged
            out.refuse(f"{who}: unreadable arrays ({exc})")
            continue
        if reference is not None:
            if set(state) != set(reference):
                diff = sorted(set(state) ^ set(reference))[:3]
                out.refuse(f"{who}: parameter names differ ({', '.join(diff)})")
                continue
            bad = [k for k in state if state[k].shape != reference[k].shape]
            if bad and not allow_shape_mismatch:
                k = bad[0]
                out.refuse(
                    f"{who}: {k} has shape {tuple(state[k].shape)}, "
                    f"global has {tuple(reference[k].shape)}"
                )
                continue
        nonfinite = [
            k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if nonfinite:
            out.refuse(f"{who}: non-finite values in {nonfinite[0]}")
            continue
        count = int(counts[0])  # type: ignore[arg-type]
        out.updates.append(ClientUpdate(-1 if pid is None else pid, state, count, msg))
    out.updates.sort(key=lambda u: u.partition)
    if norm_ratio > 0 and reference is not None:
        _screen_norms(out, reference, norm_ratio)
    for reason in out.skipped:
        logger.warning("skipped reply: %s", reason)
    return out


def _screen_norms(out: Screening, reference: Mapping[str, torch.Tensor], ratio: float) -> None:
    """Refuse updates whose norm exceeds ``ratio`` x the median norm (same-shape updates only)."""
    same = [
        u for u in out.updates if all(u.state[k].shape == reference[k].shape for k in reference)
    ]
    if not same:
        return
    norms = update_norms(reference, [u.state for u in same])
    limit = ratio * median_of(norms)
    drop = set()
    for u, norm in zip(same, norms, strict=True):
        if norm > limit:
            drop.add(id(u))
            node = u.message.metadata.src_node_id
            out.refuse(
                f"partition {u.partition} (node {node}): update norm {norm:.4g} exceeds "
                f"{ratio:g} x the median norm {limit / ratio:.4g}"
            )
    out.updates = [u for u in out.updates if id(u) not in drop]


def screen_evaluations(
    replies: Iterable[Message],
    partition_of: Mapping[int, int],
    *,
    weight_key: str = "num-examples",
    partition_sizes: Mapping[int, int] | None = None,
) -> EvaluationScreening:
    """Client-side evaluation replies that may be aggregated, and why the others may not.

    A reply is skipped when it carries an error, has no valid ``weight_key``
    metric (as in :func:`screen_replies`; at most the partition's size when
    known, since a client evaluates on its training partition), or a
    non-finite metric value.

    Parameters
    ----------
    replies : iterable of Message
        Evaluation replies of one round.
    partition_of : mapping of int to int
        Node id -> partition id, for nodes that hold one partition.
    weight_key : str (default: "num-examples")
        Metric key of the sample count.
    partition_sizes : mapping of int to int, optional
        Partition id -> number of samples, where the server knows them.

    Returns
    -------
    EvaluationScreening
        Valid replies sorted by partition id, and one reason per skipped reply.
    """
    out = EvaluationScreening()
    valid: list[tuple[int, Message]] = []
    for msg in replies:
        pid = reply_partition(msg, partition_of)
        who = f"partition {'?' if pid is None else pid} (node {msg.metadata.src_node_id})"
        if msg.has_error():
            out.skipped.append(f"{who}: evaluation error {msg.error.reason}")
            continue
        counts = [
            r[weight_key]
            for r in msg.content.values()
            if isinstance(r, MetricRecord) and weight_key in r
        ]
        size = None if partition_sizes is None or pid is None else partition_sizes.get(pid)
        why = check_count(counts[0], size, weight_key) if counts else f"no metric {weight_key!r}"
        why = why or check_metrics(msg.content)
        if why is not None:
            out.skipped.append(f"{who}: evaluation {why}")
            out.refused += 1
            continue
        valid.append((-1 if pid is None else pid, msg))
    out.replies = [m for _, m in sorted(valid, key=lambda pm: pm[0])]
    for reason in out.skipped:
        logger.warning("skipped evaluation reply: %s", reason)
    return out
