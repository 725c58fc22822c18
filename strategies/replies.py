"""Screening of training replies: what is merged, what is skipped and why."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from strategies import protocol

logger = logging.getLogger(__name__)


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
    """Valid updates of a round and the reasons replies were skipped."""

    updates: list[ClientUpdate] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def screen_replies(
    replies: Iterable[Message],
    reference: Mapping[str, torch.Tensor] | None,
    partition_of: Mapping[int, int],
    *,
    arrays_key: str = "arrays",
    weight_key: str = "num-examples",
    allow_shape_mismatch: bool = False,
) -> Screening:
    """Unpack replies; skip (and say why) every one that must not be merged.

    A reply is skipped when it carries an error, has no ``arrays_key``
    ArrayRecord or no ``weight_key`` metric, has other parameter names than
    ``reference``, arrays of other shapes (unless ``allow_shape_mismatch``,
    for fusion of different widths), or any non-finite value.

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
        if not counts or not isinstance(counts[0], int | float) or counts[0] < 0:
            out.skipped.append(f"{who}: no valid metric {weight_key!r}")
            continue
        try:
            state = arrays.to_torch_state_dict()
        except Exception as exc:  # malformed payload: never merged
            out.skipped.append(f"{who}: unreadable arrays ({exc})")
            continue
        if reference is not None:
            if set(state) != set(reference):
                diff = sorted(set(state) ^ set(reference))[:3]
                out.skipped.append(f"{who}: parameter names differ ({', '.join(diff)})")
                continue
            bad = [k for k in state if state[k].shape != reference[k].shape]
            if bad and not allow_shape_mismatch:
                k = bad[0]
                out.skipped.append(
                    f"{who}: {k} has shape {tuple(state[k].shape)}, "
                    f"global has {tuple(reference[k].shape)}"
                )
                continue
        nonfinite = [
            k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if nonfinite:
            out.skipped.append(f"{who}: non-finite values in {nonfinite[0]}")
            continue
        out.updates.append(ClientUpdate(-1 if pid is None else pid, state, int(counts[0]), msg))
    out.updates.sort(key=lambda u: u.partition)
    for reason in out.skipped:
        logger.warning("skipped reply: %s", reason)
    return out
