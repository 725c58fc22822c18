"""How soon a simulation's ServerApp has a round's replies: woken by each stored reply, or polling.

In a simulation, Flower's engine stores each ClientApp's reply in the
in-memory state that the ServerApp's Grid reads. Here a thread stands in for
the engine (a round of ten messages, replies stored at random times over
0.05-0.5 s, seeded) on Flower's own state and Grid, and the ServerApp's
``send_and_receive`` waits for them two ways, alternating round by round:

(a) polling only, every 2 ms growing to 20 ms (fedmerge's schedule before
    each stored reply woke the Grid);
(b) fedmerge's :class:`strategies.deployment.PromptGrid`: woken by each
    stored reply (:func:`strategies.deployment.reply_stored`), with looks
    every 20-200 ms besides.

Prints, for each, the median and largest time from the last reply's store
to ``send_and_receive``'s return, and the looks per round (each look checks
every awaited message).

Run:  .venv/bin/python benchmarks/reply_wait.py [--rounds 30] [--clients 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.flower_state

from flwr.app import Message, RecordDict
from flwr.server.superlink.linkstate import LinkState
from flwr.superlink.grid import InMemoryGrid

from strategies.deployment import PromptGrid, send_and_receive
from tests.flower_state import node_reply, set_serverapp_identity, simulation_state

#: (a)'s looks: first and longest wait (s), as ``IN_MEMORY_POLL`` was without wake-ups.
POLLING = (0.002, 0.02)


def engine(state: LinkState, nodes: list[int], delays: list[float], last: list[float]) -> None:
    """Reply to the i-th message found ``delays[i]`` s after the first; note when the last was."""
    pending, started, i = list(nodes), None, 0
    while pending:
        for node in list(pending):
            for message in state.get_message_ins(node_id=node, limit=1):
                started = started or time.monotonic()
                time.sleep(max(0.0, started + delays[i] - time.monotonic()))
                i += 1
                state.store_message_res(node_reply(message))
                last[0] = time.monotonic()
                pending.remove(node)
        time.sleep(0.001)


def one_round(
    grid: PromptGrid, woken: bool, nodes: list[int], rng: random.Random
) -> tuple[float, int]:
    """One round's wait: seconds from the last stored reply to the return, and looks taken."""
    inner = grid._grid
    state = inner.state
    delays = sorted(rng.uniform(0.05, 0.5) for _ in nodes)
    last = [0.0]
    looks = [0]
    pull = inner.pull_messages

    def counted(ids: set[str]) -> object:
        looks[0] += 1
        return pull(ids)

    thread = threading.Thread(target=engine, args=(state, nodes, delays, last), daemon=True)
    thread.start()
    messages = [Message(RecordDict(), n, "train") for n in nodes]
    setattr(inner, "pull_messages", counted)  # noqa: B010
    try:
        if woken:
            replies = grid.send_and_receive(messages, timeout=30)
        else:
            replies = send_and_receive(inner, messages, timeout=30, poll=POLLING)
        done = time.monotonic()
    finally:
        setattr(inner, "pull_messages", pull)  # noqa: B010
    thread.join(timeout=30)
    if len(replies) != len(nodes):
        raise RuntimeError(f"{len(replies)} replies for {len(nodes)} messages")
    return done - last[0], looks[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds of each way (default 30)")
    parser.add_argument("--clients", type=int, default=10, help="messages per round (default 10)")
    args = parser.parse_args()
    set_serverapp_identity()
    factory, run, mapping = simulation_state(args.clients)
    inner = InMemoryGrid(factory)
    inner.set_run(run)
    grid = PromptGrid(inner)
    nodes = list(mapping)
    rng = random.Random(0)
    results: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for woken in (False, True):
            results[woken].append(one_round(grid, woken, nodes, rng))
    for woken, label in ((False, "(a) polling 2-20 ms"), (True, "(b) woken by each reply")):
        waits = [w * 1000 for w, _ in results[woken]]
        looks = [n for _, n in results[woken]]
        print(
            f"{label:<24}: last reply -> in hand: median {statistics.median(waits):6.2f} ms, "
            f"largest {max(waits):6.2f} ms; looks per round: median {statistics.median(looks):.0f}"
        )


if __name__ == "__main__":
    main()
