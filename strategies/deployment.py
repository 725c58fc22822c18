"""A deployed federation: nodes that rejoin, replies attributed to partitions, honest status.

On a SuperLink, node ids are random per node process and partition ids are
what the run is about. :class:`RejoiningGrid` keeps the partition -> node map
of discovery up to date: a SuperNode restarted with the same ``partition-id``
gets a new node id, and is asked for its partition before the next message
to that partition goes out; messages keep the node ids of discovery, so that
the strategy's own map stays valid. Error replies made by the SuperLink (a
node that went away) come from the SuperLink, not the node: they are
attributed back to the node, and hence the partition, they were sent to.

:func:`failed_summary` and :func:`lost_partitions` make ``summary.json`` say
what happened: ``failed`` with the error, or which partitions were lost.
:class:`RejoiningGrid`, and :class:`PromptGrid` for a run whose partitions
are assigned (a simulation's), look for replies every few milliseconds
rather than at the intervals of Flower's Grids (:func:`send_and_receive`);
in a simulation, whose replies are stored in the ServerApp's own process,
each stored reply wakes the look at once (:func:`reply_stored`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fedmerge.run_end import FINISHED_STATUSES
from strategies import protocol
from strategies.metering import WrappedGrid

logger = logging.getLogger(__name__)

#: How a skip reason names its partition (``strategies.replies``).
_PARTITION_OF_REASON = re.compile(r"^partition (\d+) ")
#: First and longest wait (s) between two looks for replies in :func:`send_and_receive`
#: through a deployed SuperLink (each look is a request to it).
REPLY_POLL: tuple[float, float] = (0.01, 0.2)
#: The same through a simulation's in-memory state (each look checks each awaited message),
#: where every stored reply also wakes the look (:func:`reply_stored`): these looks only
#: catch what is not stored that way (Flower's replies for messages that expired).
IN_MEMORY_POLL: tuple[float, float] = (0.02, 0.2)
#: A wait is at least this many times as long as the look before it: many awaited messages
#: make each look longer, and the looks must not take the time the replies need.
LOOK_SHARE = 10.0


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float | None,
    poll: tuple[float, float] = REPLY_POLL,
    wake: RepliesStored | None = None,
) -> list[Message]:
    """``grid.send_and_receive``, looking for replies every few ms instead of every 0.1 or 3 s.

    Flower 1.42's deployed Grid sleeps 3 s between two pulls of replies,
    which alone makes every round of a deployment last 3 s or more; its
    simulation Grid sleeps 0.1 s, which a round of a small model waits half
    of on average. This pushes the messages and looks for the replies at
    once, then after a wait that grows by half each time from ``poll``'s
    first to its longest, and is never shorter than :data:`LOOK_SHARE` times
    the look before it; like Flower's, ``timeout=None`` waits for every reply.
    With ``wake`` (:func:`reply_stored`), a reply stored since the look
    began ends the wait at once, past that shortest share.
    """
    ids = {str(i) for i in grid.push_messages(messages)}
    end = None if timeout is None else time.monotonic() + timeout
    wait, longest = poll
    replies: list[Message] = []
    while True:
        seen = wake.count if wake is not None else 0  # a reply stored from here on wakes us
        started = time.monotonic()
        got = list(grid.pull_messages(ids))
        look = time.monotonic() - started
        replies += got
        ids.difference_update(m.metadata.reply_to_message_id for m in got)
        if not ids or (end is not None and time.monotonic() >= end):
            return replies
        share = LOOK_SHARE * look  # looks take at most a tenth of the time
        if wake is None:
            time.sleep(max(wait, share))
        else:
            time.sleep(share)
            wake.wait_past(seen, max(0.0, wait - share))
        wait = min(longest, wait * 1.5)


class RepliesStored:
    """How many replies a state has stored so far (:func:`reply_stored`); a wait for the next.

    A count, not an event that each waiter clears: any number of threads
    may wait, each for a reply stored after its own look began.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.count = 0

    def note(self) -> None:
        """One more reply is stored: wake every wait."""
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_past(self, seen: int, timeout: float) -> None:
        """Return once :attr:`count` is no longer ``seen``, or after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self.count != seen, timeout)


def reply_stored(grid: InMemoryGrid) -> RepliesStored:
    """What counts the replies stored in ``grid``'s in-memory state from now on.

    In a simulation, Flower's engine stores each ClientApp's reply in the
    state that the ServerApp's Grid reads (``store_message_res``, wrapped
    here on that state object only). The wrapper stays for the process's
    life; a second call for the same state returns the same count.
    """
    state = grid.state
    store = state.store_message_res
    known = getattr(store, "replies_stored", None)
    if isinstance(known, RepliesStored):
        return known
    stored = RepliesStored()

    def store_and_wake(message: Message) -> str | None:
        try:
            return store(message)
        finally:
            stored.note()

    setattr(store_and_wake, "replies_stored", stored)  # noqa: B010
    setattr(state, "store_message_res", store_and_wake)  # noqa: B010  # this state object only
    return stored


class PromptGrid(WrappedGrid):
    """A Grid whose ``send_and_receive`` looks for replies often (:func:`send_and_receive`).

    Through a simulation's in-memory state as soon as a reply is stored
    (:func:`reply_stored`) and every 20-200 ms besides (:data:`IN_MEMORY_POLL`),
    through a SuperLink every 10-200 ms (:data:`REPLY_POLL`).

    Parameters
    ----------
    grid : Grid
        The Grid that Flower gave the ServerApp; every other call goes to it.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self._poll = IN_MEMORY_POLL if isinstance(grid, InMemoryGrid) else REPLY_POLL
        self._wake = reply_stored(grid) if isinstance(grid, InMemoryGrid) else None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push ``messages``; pull until every one has its reply or ``timeout`` passes."""
        return send_and_receive(
            self._grid, messages, timeout=timeout, poll=self._poll, wake=self._wake
        )


def with_source(reply: Message, node: int) -> Message:
    """``reply``, marked as coming from ``node`` (in place; Flower sets message ids this way)."""
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def query_message(node: int) -> Message:
    """The discovery question to ``node``: which partition it holds."""
    return Message(
        RecordDict({protocol.CONFIG: ConfigRecord({})}),
        dst_node_id=node,
        message_type=MessageType.QUERY,
    )


class RejoiningGrid(WrappedGrid):
    """A Grid that routes each partition's messages to the node that holds it now.

    Parameters
    ----------
    grid : Grid
        The SuperLink's grid.
    partition_to_node : mapping of int to int
        Discovery's map; messages are addressed with these node ids.
    timeout : float
        Seconds to wait for a new node's answer to the discovery question.
    """

    def __init__(self, grid: Grid, partition_to_node: Mapping[int, int], timeout: float) -> None:
        super().__init__(grid)
        self._original = dict(partition_to_node)
        self._current = dict(partition_to_node)
        self._asked: set[int] = set(partition_to_node.values())
        self._timeout = timeout

    # -- rerouting ------------------------------------------------------------------
    @property
    def routes(self) -> dict[int, int]:
        """Partition id -> the node id that holds it now."""
        return dict(self._current)

    def _rejoin(self) -> None:
        """Ask nodes that registered since discovery which partition they hold."""
        new = sorted(set(self._grid.get_node_ids()) - self._asked)
        if not new:
            return
        self._asked.update(new)
        replies = send_and_receive(
            self._grid, [query_message(n) for n in new], timeout=self._timeout
        )
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("node %d did not say its partition: %s", node, reply.error.reason)
                continue
            pid = int(reply.content[protocol.CONFIG][protocol.PARTITION_ID])  # type: ignore[arg-type]
            if pid not in self._original:
                logger.warning("node %d claims unknown partition %d; ignored", node, pid)
                continue
            logger.info(
                "partition %d rejoined on node %d (was node %d)", pid, node, self._current[pid]
            )
            self._current[pid] = node

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send each message to its partition's current node; replies keep discovery's ids."""
        messages = list(messages)
        self._rejoin()
        partition_of = {n: p for p, n in self._original.items()}
        addressed: list[int] = []
        for m in messages:
            node = m.metadata.dst_node_id
            addressed.append(node)
            pid = partition_of.get(node)
            if pid is not None:
                m.metadata.dst_node_id = self._current[pid]
        replies = send_and_receive(self._grid, messages, timeout=timeout)
        answered = {r.metadata.reply_to_message_id for r in replies}
        replies += [  # name the partitions that did not answer, rather than just count them
            Message(Error(code=0, reason=f"no reply within {timeout} s"), reply_to=m)
            for m in messages
            if m.metadata.message_id not in answered
        ]
        original = {
            m.metadata.message_id: node for m, node in zip(messages, addressed, strict=True)
        }
        for m, node in zip(messages, addressed, strict=True):
            m.metadata.dst_node_id = node
        return [
            with_source(r, original.get(r.metadata.reply_to_message_id, r.metadata.src_node_id))
            for r in replies
        ]


def lost_partitions(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Which partitions a run lost, in which rounds, and why (from the rows' skip reasons).

    Returns
    -------
    dict
        ``lost_partitions``: sorted partition ids named by a skipped reply;
        ``lost``: ``{"round", "reason"}`` of every skipped reply.
    """
    lost: list[dict[str, Any]] = []
    partitions: set[int] = set()
    for row in rows:
        for key in ("skipped_reasons", "eval_skipped_reasons"):
            for reason in row.get(key) or []:
                lost.append({"round": row["round"], "reason": str(reason)})
                match = _PARTITION_OF_REASON.match(str(reason))
                if match:
                    partitions.add(int(match.group(1)))
    return {"lost_partitions": sorted(partitions), "lost": lost}


def failed_summary(config: Mapping[str, Any], stage: str, error: BaseException) -> dict[str, Any]:
    """``summary.json`` of a run that stopped with ``error`` during ``stage``."""
    strategy = config.get("strategy")
    return {
        "status": "failed",
        "stage": stage,
        "error": f"{type(error).__name__}: {error}",
        "scenario": config.get("name"),
        "strategy": strategy.get("name") if isinstance(strategy, Mapping) else None,
        "seed": config.get("seed"),
    }


def read_status(run_dir: Path) -> str | None:
    """The status in ``run_dir/summary.json`` if it says the run finished, else ``None``."""
    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if status in FINISHED_STATUSES else None


def log_through_flower() -> None:
    """Send the INFO lines of ``strategies.*`` through Flower's handlers.

    ``flwr run --stream`` shows what Flower's logger writes; fedmerge's own
    lines (one per round for every strategy, peers included, nodes rejoining,
    skipped replies) go the same way.
    """
    ours = logging.getLogger("strategies")
    ours.setLevel(logging.INFO)
    for handler in logging.getLogger("flwr").handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False
