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
is start-up, not part of round 1's time. In a shared runtime with a Ray head
of its own, it keeps the run's actors for the next run (:func:`keep_actors`).
And Ray's driver connects as soon as the head's raylet is up
(:func:`wait_for_raylet`), not up to a second later.

A simulation process started without the warm process keeps Flower's loop,
and its ServerApp does not wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
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

from sims.warm import KEEP_ACTORS_ENV
from strategies import workers

if TYPE_CHECKING:
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

logger = logging.getLogger(__name__)

#: The Flower release whose loop :func:`add_messages_to_queue` reproduces; any other
#: release keeps its own.
FLOWER_RELEASE = "1.42."
#: Seconds between two looks when no message is stored meanwhile (Flower's interval).
LOOK_EVERY = 0.1
#: Seconds between two looks for the Ray head's raylet (:func:`wait_for_raylet`).
RAYLET_LOOK_EVERY = 0.02
#: Seconds that :func:`wait_for_raylet` looks for at most; then Ray's driver looks on,
#: once a second, up to its own limit.
RAYLET_WAIT = 10.0


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
    setattr(raybackend.RayBackend, "init_ray", _after_raylet(raybackend.RayBackend.init_ray))  # noqa: B010
    namespace = os.environ.get(KEEP_ACTORS_ENV)
    if namespace:
        keep_actors(namespace)
    return True


def wait_for_raylet(address: str, timeout: float = RAYLET_WAIT) -> bool:
    """Wait until the Ray cluster at ``address`` (``HOST:PORT``) has a raylet alive.

    A driver that connects before the head's raylet has registered with the
    head's GCS sleeps a whole second before it looks again (Ray's
    ``get_node_to_connect_for_driver``). A runtime submits its first run
    while its head starts, and the raylet registers once its agents are up,
    forked from the warm process after its imports: the first run's driver
    often came that early. This asks the GCS the same question every
    :data:`RAYLET_LOOK_EVERY` seconds, so that the driver that follows finds
    the raylet at once.

    Returns
    -------
    bool
        Whether a raylet was alive within ``timeout`` seconds. If not, or if
        nothing listens at ``address`` yet (Ray's client would wait for it
        for half a minute), the driver connects, waits or fails as Ray's own
        does.
    """
    # imported by Flower's backend already; Ray's type stubs leave both out
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.core.generated.gcs_pb2 import GcsNodeInfo  # type: ignore[attr-defined]

    deadline = time.monotonic() + timeout
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout, 1.0)).close()
        client = GcsClient(address=address)
    except (OSError, ValueError) as exc:
        logger.debug("no Ray head answers at %s yet: %s", address, exc)
        return False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            alive = client.get_all_node_info(
                timeout=min(left, 1.0), state_filter=GcsNodeInfo.GcsNodeState.ALIVE
            )
        except Exception as exc:  # Ray's own connect reports what stays
            logger.debug("the Ray head at %s did not answer: %s", address, exc)
            return False
        if alive:
            return True
        time.sleep(RAYLET_LOOK_EVERY)


def _after_raylet(
    init_ray: Callable[[RayBackend, Any], None],
) -> Callable[[RayBackend, Any], None]:
    """``RayBackend.init_ray``, after its cluster's raylet is up (:func:`wait_for_raylet`).

    Only where ``RAY_ADDRESS`` is ``HOST:PORT``, the form a runtime sets for
    its own head or a scenario's ``simulation.ray_address``; a Ray Client
    address (``ray://``) connects as Ray's own.
    """

    def init_after_raylet(backend: RayBackend, backend_config: Any) -> None:
        import ray  # imported by Flower's backend already

        address = os.environ.get("RAY_ADDRESS", "")
        if ":" in address and "://" not in address and not ray.is_initialized():
            wait_for_raylet(address)
        init_ray(backend, backend_config)

    return init_after_raylet


def keep_actors(namespace: str) -> None:
    """Have this process's engine take over the actors of the run before it, and leave its own.

    Flower's actor pool creates its actors for the run and ends them when
    the run ends. Here each actor is a named, detached Ray actor in
    ``namespace`` (``get_if_exists``): the pool of the next run on the same
    Ray head gets the same actors, already started, and this run's end
    leaves them running. A name holds the actors' resources and arguments
    (:func:`pool_key`); an actor of the namespace that the new pool does not
    name (other resources, or more actors than it takes) is ended first, so
    that its CPUs and GPUs are free. Only for a Ray head that the runtime
    started itself (:data:`sims.warm.KEEP_ACTORS_ENV`), whose stop ends
    the actors: nothing is left in a cluster that is not fedmerge's.

    Ray's driver shows the output of its own job's workers only, and a kept
    actor's worker belongs to the job of the run that started it: this
    driver shows every worker's output instead. On that head one run goes at
    a time, and the workers are its actors.
    """
    import ray._private.worker
    from flwr.simulation.ray_transport import ray_actor

    ray._private.worker.global_worker._filter_logs_by_job = False

    init = ray_actor.BasicActorPool.__init__

    def init_with_kept_actors(
        pool: ray_actor.BasicActorPool,
        actor_type: type[ray_actor.VirtualClientEngineActor],
        client_resources: dict[str, int | float],
        actor_kwargs: dict[str, Any],
    ) -> None:
        import ray

        init(pool, actor_type, client_resources, actor_kwargs)
        key = pool_key(actor_type, client_resources, actor_kwargs)
        names = (f"{key}-{i}" for i in itertools.count())
        wanted = {f"{key}-{i}" for i in range(pool.actors_capacity)}
        for other in ray.util.list_named_actors(all_namespaces=True):
            if other["namespace"] == namespace and other["name"] not in wanted:
                with contextlib.suppress(ValueError):  # gone meanwhile
                    ray.kill(ray.get_actor(other["name"], namespace=namespace))
        options = {"namespace": namespace, "lifetime": "detached", "get_if_exists": True}
        args = actor_kwargs or {}
        pool.create_actor_fn = lambda: (
            cast(Any, actor_type)
            .options(name=next(names), **options, **client_resources)
            .remote(**args)
        )

    def leave_actors(pool: ray_actor.BasicActorPool) -> None:
        logger.debug("%d actors kept for the next run", len(pool.pool))

    setattr(ray_actor.BasicActorPool, "__init__", init_with_kept_actors)  # noqa: B010
    setattr(ray_actor.BasicActorPool, "terminate_all_actors", leave_actors)  # noqa: B010


def pool_key(
    actor_type: type, client_resources: Mapping[str, float], actor_kwargs: Mapping[str, Any] | None
) -> str:
    """The name prefix of a pool's kept actors: their class, resources and arguments (digest)."""
    described = {
        "class": repr(actor_type),  # Ray's ActorClass(NAME)
        "resources": dict(sorted(client_resources.items())),
        "arguments": {
            k: getattr(v, "__qualname__", repr(v)) for k, v in sorted((actor_kwargs or {}).items())
        },
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
    return f"clientapp-{digest}"


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
        workers.offer_flush(lambda timeout: flush_output(actors, timeout))

    return build_and_report


#: What starts the line that :func:`flush_output` has every actor print; never shown.
FLUSH_LINE = "fedmerge-output-flushed"


def flush_output(actors: list[Any], timeout: float) -> bool:
    """Wait until what ``actors`` printed so far has been shown in this process; whether it was.

    Ray's log monitor reads each worker's standard output and error (two
    files) in order and sends their new lines to the driver, whose thread
    prints them (a tenth of a second or so later). Each actor prints a line
    of its own (:data:`FLUSH_LINE`, a token, its index) on both; once all of
    them have come back, everything printed before them has been shown. Those
    lines themselves are taken out before Ray prints the batch they came in,
    and the wait ends once it has printed the rest of that batch. An actor
    whose call fails (it died) or does not return in time is not waited for.
    """
    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def print_line(actor: object, line: str) -> None:
        """Print ``line`` on the actor's standard output and error (run in the actor).

        Defined here, so that Ray sends the function itself: a worker need not
        be able to import this module.
        """
        import sys

        print(line, flush=True)
        print(line, file=sys.stderr, flush=True)

    deadline = time.monotonic() + timeout
    token = f"{FLUSH_LINE}-{os.urandom(8).hex()}"
    expected = {(i, err) for i in range(len(actors)) for err in (False, True)}
    seen: set[tuple[int, bool]] = set()
    lock = threading.Lock()  # seen and expected: Ray's printing thread and this one
    shown = threading.Event()

    def take(data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        ours = [line for line in lines if line.startswith(token)]
        if ours:
            data["lines"] = [line for line in lines if not line.startswith(token)]
            err = bool(data.get("is_err"))
            with lock:
                seen.update((int(line.rsplit(" ", 1)[1]), err) for line in ours)

    def after_printing(data: dict[str, Any]) -> None:
        with lock:
            if seen >= expected:
                shown.set()

    first, last = f"{token}-take", f"{token}-shown"
    with dispatcher._lock:  # first and last, around Ray's own printing
        dispatcher.handlers = [(first, take), *dispatcher.handlers, (last, after_printing)]
    try:
        calls = [
            actor.__ray_call__.remote(print_line, f"{token} {i}") for i, actor in enumerate(actors)
        ]
        returned, _ = ray.wait(calls, num_returns=len(calls), timeout=timeout)

        def printed(call: Any) -> bool:
            if call not in returned:  # not back in time
                return False
            try:
                ray.get(call, timeout=0)
            except Exception:  # the actor died: its lines never come
                return False
            return True

        for i, call in enumerate(calls):
            if not printed(call):
                with lock:
                    expected.difference_update({(i, False), (i, True)})
        with lock:
            if seen >= expected:
                shown.set()
        return shown.wait(max(0.0, deadline - time.monotonic()))
    finally:
        dispatcher.remove_handler(first)
        dispatcher.remove_handler(last)
