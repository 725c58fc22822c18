"""The warm process's drivers' process: simulation processes forked with Ray imported.

A real warm process (``python -m sims.warm serve``), asked the way a shim asks
it. The simulation process it forks is Flower's own ``flwr-simulation``,
given a SuperLink address where nothing listens, so it keeps retrying until
its connection to the warm process is closed (then it exits).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sims.processes import alive, command_line, descendants, stat_fields, stop_tree
from sims.warm import DRIVER, prepare_drivers
from tests.sims.warm_requests import ask, start_warm


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[tuple[dict[str, str], subprocess.Popen[bytes]]]:
    """A warm process of its own, listening; stopped with all it forked."""
    env, proc = start_warm(tmp_path, tmp_path / "warm.log")
    try:
        yield env, proc
    finally:
        stop_tree([proc.pid], 1.0)
        proc.wait()


def _ask(env: dict[str, str]) -> tuple[socket.socket, int]:
    """Ask for a ``flwr-simulation`` as its shim would; the connection and the child's PID."""
    with open(os.devnull, "wb") as null:
        args = ["--runtime-api-address", "127.0.0.1:9", "--token", "t", "--insecure"]
        return ask(env, DRIVER, args, [null.fileno()] * 3)


def _parent(pid: int) -> int:
    fields = stat_fields(pid)
    assert fields is not None, f"process {pid} is gone"
    return int(fields[1])


def _prepared_driver(env: dict[str, str]) -> tuple[socket.socket, int, int]:
    """Prepare for drivers of ``env``, ask for one: its connection, its PID, its parent's PID."""
    prepare_drivers(env)
    conn, pid = _ask(env)
    return conn, pid, _parent(pid)


def test_a_driver_with_the_prepared_environment_is_forked_from_the_drivers_process(
    warm: tuple[dict[str, str], subprocess.Popen[bytes]],
) -> None:
    env, proc = warm
    conn, pid, drivers = _prepared_driver(env)
    assert command_line(drivers).strip() == f"{sys.executable} -m sims.warm drivers"
    assert _parent(drivers) == proc.pid

    # Ray was imported with `env`: a driver of another environment is forked by the
    # warm process itself.
    other, other_pid = _ask({**env, "RAY_DEDUP_LOGS": "0"})
    assert _parent(other_pid) == proc.pid

    conn.close()  # the shim is gone: so is its child
    other.close()
    deadline = time.monotonic() + 30  # both reaped: the drivers' process stays for the next
    while descendants(proc.pid) != [drivers] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert descendants(proc.pid) == [drivers]
    assert not alive(pid) and not alive(other_pid)


def test_the_drivers_process_ends_with_the_warm_process(
    warm: tuple[dict[str, str], subprocess.Popen[bytes]],
) -> None:
    env, proc = warm
    conn, pid, drivers = _prepared_driver(env)
    proc.kill()  # no chance to stop anything: the socket pair closes
    proc.wait()
    conn.close()
    deadline = time.monotonic() + 30
    while (alive(drivers) or alive(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert not alive(drivers)
