"""Flower's simulation engine, woken by every message the ServerApp stores.

Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``)
looks for messages to hand to its ClientApp actors every 0.1 s
(``add_messages_to_queue``): every round's messages wait 50 ms on average
before the first actor starts, in rounds that last a few tenths of a second
on a small model. :func:`install`, called in a simulation process that the
warm process forks (:mod:`sims.warm`) before Flower's code runs, replaces
that loop with :func:`add_messages_to_queue`: Flower's look at every node
every 0.1 s, and between them a look at the nodes that messages were just
stored for in the run's in-memory state, as soon as they are. A look takes
what Flower's would, one undelivered message per node, in Flower's order of
nodes; only when it looks changes. A simulation process started without the
warm process keeps Flower's loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from queue import Queue

import flwr
from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState

logger = logging.getLogger(__name__)

#: The Flower release whose loop :func:`add_messages_to_queue` reproduces; any other
#: release keeps its own.
FLOWER_RELEASE = "1.42."
#: Seconds between two looks when no message is stored meanwhile (Flower's interval).
LOOK_EVERY = 0.1


def add_messages_to_queue(
    state: LinkState,
    queue: Queue[Message],
    nodes_mapping: Mapping[int, int],
    f_stop: threading.Event,
    look_every: float = LOOK_EVERY,
) -> None:
    """Flower's loop, woken by stores: each look queues one undelivered message per node.

    Every ``look_every`` seconds it looks at every node, as Flower's loop
    does. In between, a message stored in ``state`` wakes it at once to look
    at the nodes that messages were stored for since its last look, and a
    look that queued a message is followed at once by another at those
    nodes (a node may have more), where Flower's waits 0.1 s. Nodes are
    looked at in ``nodes_mapping``'s order, as in Flower's loop.

    Parameters
    ----------
    state : LinkState
        The run's in-memory state; its ``store_message_ins`` is wrapped
        while the loop runs (on this object only), then restored.
    queue : Queue of Message
        Where the engine's workers take messages from.
    nodes_mapping : Mapping of int to int
        Node id -> partition id of the simulation's nodes.
    f_stop : threading.Event
        Set when the engine stops; the loop ends at its next look, at most
        ``look_every`` seconds later (Flower's ends at once; its workers take
        up to 1 s more).
    look_every : float
        Seconds between two looks at every node.
    """
    stored = threading.Event()
    lock = threading.Lock()
    woken: set[int] = set()  # nodes a message was stored for, since the last look at them
    store = state.store_message_ins
    before = vars(state).get("store_message_ins")  # an earlier wrapper of this object, if any

    def store_and_wake(message: Message) -> str | None:
        try:
            return store(message)
        finally:
            with lock:
                woken.add(message.metadata.dst_node_id)
            stored.set()

    setattr(state, "store_message_ins", store_and_wake)  # noqa: B010  # this state object only
    last_full = -look_every
    try:
        while not f_stop.is_set():
            stored.clear()
            with lock:
                woken_now = set(woken)
                woken.clear()
            if time.monotonic() - last_full >= look_every:
                last_full = time.monotonic()
                nodes = list(nodes_mapping)
            else:
                nodes = [n for n in nodes_mapping if n in woken_now]
            took: set[int] = set()
            for node_id in nodes:
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
                    took.add(node_id)
            if took:  # they may have more: look at them again at once
                with lock:
                    woken.update(took)
                continue
            stored.wait(max(0.0, last_full + look_every - time.monotonic()))
    finally:
        if vars(state).get("store_message_ins") is store_and_wake:
            if before is None:
                vars(state).pop("store_message_ins")
            else:
                setattr(state, "store_message_ins", before)  # noqa: B010


def install() -> bool:
    """Have this process's simulation engine run :func:`add_messages_to_queue`; whether it does.

    Only under :data:`FLOWER_RELEASE`, the release whose loop it reproduces;
    under another, a warning says that the engine keeps Flower's loop.
    """
    if not flwr.__version__.startswith(FLOWER_RELEASE):
        logger.warning(
            "flwr %s: the simulation engine keeps its own loop, which looks for messages "
            "every 0.1 s (fedmerge's wakes on each message under flwr %sx)",
            flwr.__version__,
            FLOWER_RELEASE,
        )
        return False
    setattr(vce_api, "add_messages_to_queue", add_messages_to_queue)  # noqa: B010
    return True
