"""Flower's simulation engine, woken by every message the ServerApp stores.

Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``)
looks for messages to hand to its ClientApp actors every 0.1 s
(``add_messages_to_queue``): every round's messages wait 50 ms on average
before the first actor starts, in rounds that last a few tenths of a second
on a small model. :func:`install`, called in a simulation process that the
warm process forks (:mod:`sims.warm`) before Flower's code runs, replaces
that loop with :func:`add_messages_to_queue`: the same looks, in the same
order, but the wait between two of them also ends as soon as a message is
stored in the run's in-memory state, and there is none after a look that
found a message. The messages and their order are Flower's; only the waits
change. A simulation process started without the
warm process keeps Flower's loop.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from queue import Queue

import flwr
from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState

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
    """Flower's loop: each pass queues one undelivered message per node; between passes it waits.

    A pass that found nothing waits until ``look_every`` seconds pass, as
    Flower's does, or until a message is stored in ``state``, whichever comes
    first; a message stored during a pass starts the next pass at once. A
    pass that queued a message is followed by another at once (a node may
    have more), where Flower's waits 0.1 s.
    """
    stored = threading.Event()
    store = state.store_message_ins

    def store_and_wake(message: Message) -> object:
        try:
            return store(message)
        finally:
            stored.set()

    setattr(state, "store_message_ins", store_and_wake)  # noqa: B010  # this state object only
    try:
        while not f_stop.is_set():
            stored.clear()
            took = False
            for node_id in nodes_mapping:
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
                    took = True
            if not took:  # a node may have more: look again at once
                stored.wait(look_every)
    finally:
        vars(state).pop("store_message_ins", None)


def install() -> bool:
    """Have this process's simulation engine run :func:`add_messages_to_queue`; whether it does.

    Only under :data:`FLOWER_RELEASE`, the release whose loop it reproduces.
    """
    if not flwr.__version__.startswith(FLOWER_RELEASE):
        return False
    setattr(vce_api, "add_messages_to_queue", add_messages_to_queue)  # noqa: B010
    return True
