"""A Grid wrapper that counts the traffic crossing it: bytes of model weights, replies, errors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from strategies.protocol import CONFIG, MEASUREMENT_PREFIX, PARTITION_ID


def _named_partition(message: Message) -> int:
    config = message.content.get(CONFIG)
    if isinstance(config, ConfigRecord) and PARTITION_ID in config:
        return int(config[PARTITION_ID])  # type: ignore[arg-type]
    return -1


def _waves(messages: list[Message]) -> list[list[Message]]:
    """Split ``messages`` into waves holding at most one message per destination node."""
    waves: list[list[Message]] = []
    seen: dict[int, int] = {}
    for m in messages:
        i = seen.get(m.metadata.dst_node_id, 0)
        seen[m.metadata.dst_node_id] = i + 1
        if i == len(waves):
            waves.append([])
        waves[i].append(m)
    return waves


def arrayrecord_bytes(content: RecordDict) -> int:
    """Bytes of every array in the ArrayRecords of ``content`` (measurement records excluded)."""
    total = 0
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and not key.startswith(MEASUREMENT_PREFIX):
            total += sum(len(array.data) for array in record.values())
    return total


@dataclass
class Traffic:
    """Counters since the last :meth:`MeteredGrid.take`.

    Attributes
    ----------
    bytes_down, bytes_up : int
        Array bytes sent to nodes and received from them.
    replies, errors : int
        Replies without and with an error.
    missing : int
        Messages that got no reply at all (lost: the node did not answer in time).
    train_partitions : list of int
        Partitions that training messages were about (-1: not named), in
        sending order.
    """

    bytes_down: int = 0
    bytes_up: int = 0
    replies: int = 0
    errors: int = 0
    missing: int = 0
    train_partitions: list[int] = field(default_factory=list)


class WrappedGrid(Grid):
    """A Grid that hands every call to the grid it wraps; subclasses override what they change."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:
        """The wrapped grid's ``set_run``."""
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """The wrapped grid's ``create_message``."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The wrapped grid's node ids."""
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """The wrapped grid's ``push_messages``."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The wrapped grid's ``pull_messages``."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """The wrapped grid's ``send_and_receive``."""
        return self._grid.send_and_receive(messages, timeout=timeout)


class MeteredGrid(WrappedGrid):
    """A Flower :class:`~flwr.serverapp.Grid` that counts the traffic of the grid it wraps.

    Every method is the wrapped grid's; ``send_and_receive`` also counts, and
    sends the messages addressed to one node in successive waves, so that a
    node never runs two ClientApp calls at once (several virtual clients
    share a node in simulation).
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self._traffic = Traffic()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Forward to the grid, counting what goes down and comes back up."""
        messages = list(messages)
        t = self._traffic
        for m in messages:
            t.bytes_down += arrayrecord_bytes(m.content)
            if m.metadata.message_type.startswith(MessageType.TRAIN):
                t.train_partitions.append(_named_partition(m))
        replies: list[Message] = []
        for wave in _waves(messages):
            answers = list(self._grid.send_and_receive(wave, timeout=timeout))
            t.missing += max(0, len(wave) - len(answers))
            replies += answers
        for r in replies:
            if r.has_error():
                t.errors += 1
            else:
                t.replies += 1
                t.bytes_up += arrayrecord_bytes(r.content)
        return replies

    def take(self) -> Traffic:
        """Return the counters and start new ones."""
        traffic, self._traffic = self._traffic, Traffic()
        return traffic
