"""A Grid wrapper that counts the bytes of model weights crossing it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

#: Records whose key starts with this are measurement payload (e.g. a peer's
#: merged model sent back only to be evaluated), not protocol traffic.
EVAL_PREFIX = "eval-"


def arrayrecord_bytes(content: RecordDict) -> int:
    """Bytes of every array in the ArrayRecords of ``content`` (``eval-`` ones excluded)."""
    total = 0
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and not key.startswith(EVAL_PREFIX):
            total += sum(len(array.data) for array in record.values())
    return total


@dataclass
class Traffic:
    """Counters since the last :meth:`MeteredGrid.take`."""

    bytes_down: int = 0
    bytes_up: int = 0
    sent: int = 0
    replies: int = 0
    errors: int = 0
    train_losses: list[float] = field(default_factory=list)
    train_nodes: list[int] = field(default_factory=list)
    eval_accuracies: list[float] = field(default_factory=list)


class MeteredGrid:
    """Delegates to a Flower :class:`~flwr.serverapp.Grid` and meters it.

    Counts ArrayRecord bytes of every message sent (down) and every reply
    (up), reply errors, the destinations of training messages, and collects
    the ``train_loss`` metric of replies. Anything else is forwarded to the wrapped grid unchanged.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._traffic = Traffic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward to the grid, counting what goes down and comes back up."""
        messages = list(messages)
        t = self._traffic
        for m in messages:
            t.bytes_down += arrayrecord_bytes(m.content)
            if m.metadata.message_type.startswith(MessageType.TRAIN):
                t.train_nodes.append(m.metadata.dst_node_id)
        t.sent += len(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_error():
                t.errors += 1
                continue
            t.replies += 1
            t.bytes_up += arrayrecord_bytes(r.content)
            metrics = r.content.metric_records
            for record in metrics.values():
                if "train_loss" in record:
                    t.train_losses.append(float(record["train_loss"]))  # type: ignore[arg-type]
                if "eval_accuracy" in record:
                    t.eval_accuracies.append(float(record["eval_accuracy"]))  # type: ignore[arg-type]
        return replies

    def take(self) -> Traffic:
        """Return the counters and start new ones."""
        traffic, self._traffic = self._traffic, Traffic()
        return traffic
