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
what Flower's would, one undelivered message per node; the nodes that
messages were stored for come first, in the order the messages were stored
(first sent, first handed to an actor), then the others in Flower's order.

:func:`install` also has the engine say when its actors are up
(:func:`strategies.workers.expect`): a run's ServerApp waits for them before
its first round (:func:`strategies.workers.wait`), so that the actors' start
is start-up, not part of round 1's time.

A simulation process started without the warm process keeps Flower's loop,
and its ServerApp does not wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from queue import Queue
from typing import TYPE_CHECKING, Any, cast

import flwr
from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState

from strategies import workers

if TYPE_CHECKING:
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

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
    nodes (a node may have more), where Flower's waits 0.1 s. A look takes
    the nodes that messages were stored for in the order of their first
    message since the last look, then, in a look at every node, the others
    in ``nodes_mapping``'s order (Flower's): messages to different nodes
    reach the actors in the order they were sent.

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
    # nodes a message was stored for since the last look at them, in the order of storing
    woken: dict[int, None] = {}
    store = state.store_message_ins
    before = vars(state).get("store_message_ins")  # an earlier wrapper of this object, if any

    def store_and_wake(message: Message) -> str | None:
        try:
            return store(message)
        finally:
            with lock:
                woken.setdefault(message.metadata.dst_node_id)
            stored.set()

    setattr(state, "store_message_ins", store_and_wake)  # noqa: B010  # this state object only
    last_full = -look_every
    try:
        while not f_stop.is_set():
            stored.clear()
            with lock:
                nodes = [n for n in woken if n in nodes_mapping]
                woken.clear()
            if time.monotonic() - last_full >= look_every:
                last_full = time.monotonic()
                first = set(nodes)
                nodes += [n for n in nodes_mapping if n not in first]
            took: list[int] = []
            for node_id in nodes:
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
                    took.append(node_id)
            if took:  # they may have more: look at them again at once, first
                with lock:
                    later = list(woken)
                    woken.clear()
                    woken.update(dict.fromkeys(took + later))
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
    from flwr.server.superlink.fleet.vce.backend import raybackend  # imports Ray

    setattr(raybackend.RayBackend, "build", _build_and_report(raybackend.RayBackend.build))  # noqa: B010
    return True


def _build_and_report(
    build: Callable[[RayBackend, Callable[[], ClientApp]], None],
) -> Callable[[RayBackend, Callable[[], ClientApp]], None]:
    """``RayBackend.build``, which then sets :func:`strategies.workers.expect`'s event.

    The event is set once every actor of the pool has been created (its
    ``__ray_ready__`` answered), or once one of them failed to be: Flower's
    engine reports a dead actor itself, and the ServerApp's first round
    then meets it as it would have.
    """
    ready = workers.expect()

    def build_and_report(backend: RayBackend, app_fn: Callable[[], ClientApp]) -> None:
        build(backend, app_fn)
        import ray  # imported by Flower's backend already

        actors = list(backend.pool.pool) if backend.pool is not None else []
        pings = [cast(Any, actor).__ray_ready__.remote() for actor in actors]  # Ray adds it

        def report() -> None:
            try:
                ray.get(pings)
            except Exception as exc:  # a dead actor: Flower's engine reports it
                logger.debug("an actor failed to start: %s", exc)
            finally:
                ready.set()

        threading.Thread(target=report, name="fedmerge-actors-ready", daemon=True).start()

    return build_and_report
