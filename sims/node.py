"""A SuperNode with a long-lived ClientApp process: both started, watched and stopped by PID.

``fedmerge supernode`` runs ``flower-supernode --isolation process`` and
``python -m sims.clientapp_worker`` (:mod:`sims.clientapp_worker`), which
serves every message of every run from one process, instead of Flower's
default of one fresh ``flwr-clientapp`` process per message. This process
stays as their supervisor: when either exits, the other is stopped and the
supervisor exits with the first one's code; SIGTERM or Ctrl-C stops both.
Both children are also tied to the supervisor's life (Linux: the parent-death
signal; the worker also watches the supervisor's PID), so that a supervisor
killed with SIGKILL leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from sims.processes import alive, stop_tree
from sims.warm import WORKER, shim

#: Seconds from SIGTERM to SIGKILL when the node stops.
STOP_GRACE = 5.0
#: Flower's default port of a SuperNode's Runtime API.
DEFAULT_RUNTIME_PORT = 9094
#: ``prctl`` option that sends a signal to a process when its parent dies.
_PR_SET_PDEATHSIG = 1


def worker_command(runtime_port: int, parent_pid: int) -> list[str]:
    """The command line of the ClientApp process that serves the SuperNode at ``runtime_port``.

    Where a warm process serves the environment (:func:`sims.warm.shim`), the
    process is forked from it through its shim.
    """
    warm = shim(WORKER)
    program = [str(warm)] if warm is not None else [sys.executable, "-m", "sims.clientapp_worker"]
    return [
        *program,
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port}",
        "--insecure",
        "--parent-pid",
        str(parent_pid),
    ]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(commands: Sequence[Sequence[str]], env: Mapping[str, str]) -> int:
    """Start ``commands``, wait until one exits, stop the others by PID; its exit code.

    SIGTERM (turned into ``SystemExit`` by the CLI) and Ctrl-C stop every
    child as well, through the ``finally`` clause.
    """
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd in commands:
            procs.append(
                subprocess.Popen(  # preexec_fn: no thread runs yet in this process
                    list(cmd), env=dict(env), preexec_fn=_die_with_parent
                )
            )
        while True:
            for proc in procs:
                code = proc.poll()
                if code is not None:
                    return int(code)
            time.sleep(0.2)
    finally:
        running = [p.pid for p in procs if alive(p.pid)]
        if running:
            stop_tree(running, STOP_GRACE)
        for proc in procs:
            proc.wait()


def runtime_port(port: int | None) -> int:
    """The SuperNode's Runtime API port: ``port``, or Flower's default."""
    return DEFAULT_RUNTIME_PORT if port is None else port


def supernode_with_worker(supernode: Sequence[str], port: int | None) -> list[list[str]]:
    """``supernode`` in process isolation, and the worker command that serves it."""
    return [
        [*supernode, "--isolation", "process"],
        worker_command(runtime_port(port), os.getpid()),
    ]
