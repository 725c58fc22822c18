"""The simulation engine's message loop (:mod:`sims.engine_wake`) on Flower's own in-memory state.

The state, its run, its nodes, the ServerApp's Grid and the messages are
Flower's, set up as ``flwr.simulation.run_simulation`` sets them up; only the
engine's actors are left out: a thread here answers for them, as Flower's
workers do, by storing the reply in the state.
"""

from __future__ import annotations

import logging
import threading
import time
from queue import Empty, Queue

import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import InMemoryGrid

from sims import engine_wake
from strategies import deployment, workers
from strategies.deployment import IN_MEMORY_POLL, PromptGrid
from tests.flower_state import SERVERAPP_IDENTITY, node_reply, simulation_state

#: Far longer than the test waits: a message that arrives came through the wake-up.
NEVER = 120.0


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process-wide identity that Flower's simulation process sets for its ServerApp."""
    for name, value in SERVERAPP_IDENTITY.items():
        monkeypatch.setattr(TaskIdentity, name, value)


def test_a_stored_message_is_queued_without_waiting_for_the_next_look() -> None:
    factory, run, nodes = simulation_state(3)
    state = factory.state()
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    loop = threading.Thread(
        target=engine_wake.add_messages_to_queue,
        args=(state, queue, nodes, stop, NEVER),
        daemon=True,  # a wake-up that fails would keep it waiting NEVER seconds
    )
    loop.start()
    node, other = sorted(nodes)[:2]
    try:
        time.sleep(0.2)  # the loop has made its first look, and waits
        pushed = list(grid.push_messages([Message(RecordDict(), node, "train")]))
        got = queue.get(timeout=30)
        assert got.metadata.message_id == pushed[0]
        assert got.metadata.dst_node_id == node
        # two for one node and one for another: each look takes one per node, and the
        # look after one that took a message comes at once
        grid.push_messages([Message(RecordDict(), node, "train") for _ in range(2)])
        grid.push_messages([Message(RecordDict(), other, "train")])
        got_nodes = sorted(queue.get(timeout=30).metadata.dst_node_id for _ in range(3))
        assert got_nodes == sorted([node, node, other])
    finally:
        stop.set()
        grid.push_messages([Message(RecordDict(), other, "train")])  # ends the loop's wait
        loop.join(timeout=30)
    assert not loop.is_alive()
    assert "store_message_ins" not in vars(state)  # the state's own method again


class HeldQueue(Queue[Message]):
    """A queue whose first ``put`` waits for :attr:`release`: the loop is held mid-look."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.release = threading.Event()

    def put(self, item: Message, block: bool = True, timeout: float | None = None) -> None:
        if not self.holding.is_set():
            self.holding.set()
            assert self.release.wait(30)
        super().put(item, block, timeout)


def test_messages_reach_the_queue_in_the_order_they_were_stored() -> None:
    factory, run, nodes = simulation_state(3)
    state = factory.state()
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    queue = HeldQueue()
    stop = threading.Event()
    loop = threading.Thread(
        target=engine_wake.add_messages_to_queue,
        args=(state, queue, nodes, stop, NEVER),
        daemon=True,
    )
    loop.start()
    first, second, third = list(nodes)  # Flower's order of nodes
    try:
        time.sleep(0.2)  # the loop has made its first look, and waits
        grid.push_messages([Message(RecordDict(), first, "train")])
        assert queue.holding.wait(30)  # the loop is queueing it; two more are stored meanwhile
        grid.push_messages([Message(RecordDict(), n, "train") for n in (third, second)])
        queue.release.set()
        got = [queue.get(timeout=30).metadata.dst_node_id for _ in range(3)]
        assert got == [first, third, second]  # Flower's order would be first, second, third
    finally:
        stop.set()
        grid.push_messages([Message(RecordDict(), first, "train")])  # ends the loop's wait
        loop.join(timeout=30)
    assert not loop.is_alive()


def test_prompt_grid_gets_replies_stored_by_the_engine() -> None:
    factory, run, nodes = simulation_state(2)
    state = factory.state()
    queue: Queue[Message] = Queue()
    stop = threading.Event()

    def actors() -> None:  # as Flower's workers: each message's reply goes into the state
        while not stop.is_set():
            try:
                message = queue.get(timeout=0.1)
            except Empty:
                continue
            state.store_message_res(node_reply(message))

    grid = InMemoryGrid(factory)
    grid.set_run(run)
    engine = threading.Thread(
        target=engine_wake.add_messages_to_queue,
        args=(state, queue, nodes, stop, NEVER),
        daemon=True,
    )
    threads = [engine, threading.Thread(target=actors, daemon=True)]
    for t in threads:
        t.start()
    try:
        # the loop has made its first look and waits: only a wake-up can deliver now
        deadline = time.monotonic() + 30
        while "store_message_ins" not in vars(state) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        prompt = PromptGrid(grid)
        assert prompt._poll == IN_MEMORY_POLL
        messages = [Message(RecordDict(), n, "train") for n in nodes]
        replies = prompt.send_and_receive(messages, timeout=30)
        assert sorted(int(r.content["config"]["node"]) for r in replies) == sorted(nodes)
    finally:
        stop.set()
        grid.push_messages([Message(RecordDict(), sorted(nodes)[0], "train")])  # ends its wait
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)


def test_a_stored_reply_ends_the_prompt_grids_wait_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a simulation the ServerApp's Grid looks again when a reply is stored, not later."""
    factory, run, nodes = simulation_state(2)
    state = factory.state()
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    monkeypatch.setattr(deployment, "IN_MEMORY_POLL", (NEVER, NEVER))  # no look but the first
    prompt = PromptGrid(grid)
    assert deployment.reply_stored(grid) is prompt._wake  # one wrapper per state
    stored: list[str | None] = []

    def actors() -> None:  # as Flower's engine: one reply per message, stored in the state
        answered: set[int] = set()
        deadline = time.monotonic() + 30
        while answered != set(nodes) and time.monotonic() < deadline:
            for node in set(nodes) - answered:
                for message in state.get_message_ins(node_id=node, limit=1):
                    time.sleep(0.2)  # the Grid has made its first look, and waits
                    stored.append(state.store_message_res(node_reply(message)))
                    answered.add(node)
            time.sleep(0.01)

    messages = [Message(RecordDict(), n, "train") for n in nodes]
    got: Queue[list[Message]] = Queue()
    caller = threading.Thread(  # a Grid that missed the wake-up would wait NEVER seconds
        target=lambda: got.put(prompt.send_and_receive(messages, timeout=NEVER)), daemon=True
    )
    for thread in (threading.Thread(target=actors, daemon=True), caller):
        thread.start()
    replies = got.get(timeout=30)
    assert sorted(int(r.content["config"]["node"]) for r in replies) == sorted(nodes)
    assert len(stored) == 2 and None not in stored  # the wrapper returns what Flower's does


def test_every_wait_ends_with_a_reply_stored_after_its_own_look() -> None:
    """Waits on one state's count of stored replies: none is lost to another waiter."""
    stored = deployment.RepliesStored()
    seen = stored.count
    stored.note()  # stored between a look and its wait: the wait does not begin
    stored.wait_past(seen, NEVER)
    seen = stored.count
    ended: Queue[int] = Queue()
    waiters = [
        threading.Thread(target=lambda i=i: (stored.wait_past(seen, NEVER), ended.put(i)))
        for i in range(3)
    ]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.2)  # all three wait
    assert ended.empty()
    stored.note()
    assert sorted(ended.get(timeout=30) for _ in waiters) == [0, 1, 2]
    started = time.monotonic()
    stored.wait_past(stored.count, 0.05)  # nothing stored: it waits its time out
    assert time.monotonic() - started >= 0.05


def test_install_replaces_the_engines_loop_only_under_its_flower_release(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    monkeypatch.setattr(RayBackend, "build", RayBackend.build)
    monkeypatch.setattr(workers, "_ready", None)
    monkeypatch.setattr(engine_wake.flwr, "__version__", "1.43.0")
    with caplog.at_level(logging.WARNING, logger="sims.engine_wake"):
        assert not engine_wake.install()
    assert vce_api.add_messages_to_queue is not engine_wake.add_messages_to_queue
    assert "flwr 1.43.0: the simulation engine keeps its own loop" in caplog.text
    monkeypatch.setattr(engine_wake.flwr, "__version__", "1.42.0")
    assert engine_wake.install()
    assert vce_api.add_messages_to_queue is engine_wake.add_messages_to_queue
    # the ServerApp of this process now waits for the actors of the engine's next build
    assert RayBackend.build.__name__ == "build_and_report"
    assert workers._ready is not None and not workers._ready.is_set()
