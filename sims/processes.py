"""Process trees that fedmerge starts, and a watchdog that stops them when fedmerge dies.

Standard library only: ``python -m sims.processes PARENT_PID GUARD_FILE
[NAME=VALUE]`` runs the watchdog in a process of its own, without importing
torch, Flower or Ray.

The watchdog polls its parent. When the parent is gone (SIGKILL, an
out-of-memory kill, a crash), it reads the processes listed in ``GUARD_FILE``
(the SuperLink, the Ray head, ``flwr run``; written by the parent as it starts
them, each as its PID and start time, so that a PID that another process has
taken since is left alone), collects every process below them and stops them all: a run's
ServerApp at once with SIGKILL (:func:`stop_run_tree`), the rest with SIGTERM,
then SIGKILL after a grace period. With ``NAME=VALUE``, it then stops every
process whose environment has that variable (:func:`stop_marked`): those
that left the trees. A parent that exits normally stops its processes itself
and then the watchdog.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

#: Environment every Flower process of a run gets (see README, "Environment").
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray >= 2.50 warns that it will stop overriding CUDA_VISIBLE_DEVICES for
    # actors with num_gpus=0; opt in to that future behaviour now.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # A process that dies of a fatal signal (a crash in native code, a bus error on a
    # memory-mapped file) writes its Python stack to its log instead of vanishing.
    "PYTHONFAULTHANDLER": "1",
    # Each line reaches the log as it is printed, so a program stopped by a signal
    # (`flwr run --stream` once its run is over, see sims.runtime) loses none.
    "PYTHONUNBUFFERED": "1",
}

#: A SuperExec that looks for a task every 0.1 s instead of Flower's 1 s; for the SuperExecs
#: that start a process per task, where the wait adds to every task: a simulation runtime's
#: (which polls that often only when a run comes, see :func:`sims.warm.wake_superexec`) and a
#: SuperNode's under ``--isolation subprocess`` (a ClientApp process per message). Each look
#: costs the polled process a request; a deployed SuperLink's SuperExec, which starts a
#: ServerApp once per run, keeps Flower's interval (``benchmarks/deploy_idle.py``).
FAST_TASK_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def flower_environment(defaults: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower program that a ``fedmerge`` command starts.

    This process's environment with :data:`FLOWER_ENV` set, ``defaults``
    where that environment sets nothing, and this interpreter's scripts first
    on ``PATH``: Flower's SuperLink and SuperNode start ``flower-superexec``
    and ``flwr-clientapp`` by name, which a virtual environment that was not
    activated would not have there.
    """
    env = {**(defaults or {}), **os.environ, **FLOWER_ENV}
    env["PATH"] = os.pathsep.join(
        filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    return env


#: Seconds between two looks at the parent.
POLL = 0.25

#: Seconds to wait for processes to end after SIGKILL (:func:`stop_tree`).
KILL_WAIT = 5.0

#: Seconds from SIGTERM to SIGKILL when the watchdog stops an orphaned tree.
ORPHAN_GRACE = 2.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (another program may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (read from /proc; empty elsewhere)."""
    return _below([pid])


def _below(roots: list[int]) -> list[int]:
    """PIDs of every process below any of ``roots``, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name, ``None`` once ``pid`` is gone.

    Index 0 is proc(5)'s field 3 (the state): the parent is ``[1]``, the user
    and system CPU ticks ``[11]`` and ``[12]``, the start time ``[19]``.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc``), or ``None``.

    A PID and its start time name one process: once a process has ended and
    been reaped, the kernel gives its PID to a later one (it wraps at
    ``/proc/sys/kernel/pid_max``, 32,768 on many machines, which a long sweep
    or a test suite passes).
    """
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])


def still_running(started: Mapping[int, int | None]) -> list[int]:
    """Those of ``started`` (PID -> :func:`start_time`) that still run that same process."""
    return [pid for pid, start in started.items() if alive(pid) and start_time(pid) == start]


def cpu_seconds(fields: list[str]) -> float:
    """The user plus system CPU time, in seconds, of a process's :func:`stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, is not alive)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


#: The program of a simulated run's ServerApp process (Flower's SuperExec starts it).
SERVERAPP = "flwr-simulation"


def command_line(pid: int) -> str:
    """``pid``'s command line, its words joined by spaces ("" once it is gone)."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def runs_program(pid: int, name: str) -> bool:
    """Whether ``pid``'s command line starts with program ``name`` (itself, or run by Python).

    The first three words are looked at: ``name ...``, ``python name ...`` and
    ``python -S name ...`` (a shim of :mod:`sims.warm`); a process forked from
    the warm process names itself after its program.
    """
    return any(Path(word).name == name for word in command_line(pid).split()[:3])


def stop_run_tree(roots: list[int], grace: float) -> list[int]:
    """:func:`stop_tree` for a runtime's processes: any run's ServerApp is SIGKILLed first.

    Signalled with the rest, a ServerApp that is in a round outlives its Ray
    workers by a moment, finds them dead, and records the round as failed and
    the run as stopped by a dead worker (``summary.json``), with a checkpoint
    after the interruption. Killed first, it records nothing more, and the run
    resumes from the checkpoint of its last whole round, as after ``kill -9``:
    the resume checks the files and cuts ``metrics.jsonl`` back to that round
    (:mod:`strategies.checkpoint`).
    """
    return _stop_pids(_below(roots) + list(roots), grace, kill_first=SERVERAPP)


def stop_tree(roots: list[int], grace: float) -> list[int]:
    """SIGTERM ``roots`` and everything below them; SIGKILL what is left after ``grace`` s.

    The whole tree is collected before the first signal, so that nothing
    re-parented to init on the way is missed. Returns the PIDs signalled.
    """
    return _stop_pids(_below(roots) + list(roots), grace)


def _stop_pids(pids: list[int], grace: float, kill_first: str | None = None) -> list[int]:
    """SIGKILL those of ``pids`` that run ``kill_first``; SIGTERM all, SIGKILL after ``grace``.

    Then the same for the latecomers of their sessions (:func:`_latecomers`).
    Returns once none of them is alive, or :data:`KILL_WAIT` seconds after the
    SIGKILL: the kernel ends a killed process a moment after the signal, and
    a caller that checks right away would find it still running.
    """
    sessions = _sessions_led(pids)  # before the leaders go
    if kill_first is not None:
        _signal([p for p in pids if runs_program(p, kill_first)], signal.SIGKILL)
    stopped: list[int] = []
    for looks in range(LATE_ROUNDS + 1):
        if looks:
            pids, grace = _latecomers(sessions, exclude=set(stopped)), min(grace, LATE_GRACE)
            if not pids:
                break
        stopped += pids
        _signal(pids, signal.SIGTERM)
        _wait_gone(pids, grace)
        _signal([p for p in pids if alive(p)], signal.SIGKILL)
        _wait_gone(pids, KILL_WAIT)
    return stopped


#: How many times :func:`_stop_pids` looks for latecomers, and their grace in seconds.
LATE_ROUNDS = 3
LATE_GRACE = 1.0


def _sessions_led(pids: list[int]) -> set[int]:
    """The sessions whose leader is one of ``pids``: those fedmerge started with their own.

    Every process fedmerge starts for a runtime or a federation is a session
    leader (``start_new_session``), and what it starts stays in its session
    unless it makes one of its own.
    """
    led = set()
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None and int(fields[3]) == pid:
            led.add(pid)
    return led


def _latecomers(sessions: set[int], exclude: set[int]) -> list[int]:
    """Live processes of ``sessions`` that are not in ``exclude`` (nor this process).

    A process that a member of the tree started after the tree was collected
    (Ray's raylet starting its agents while the head is told to stop, during
    its start-up) is re-parented to init when its parent exits: out of the
    tree, and alive for a minute or more. It stays in its session, whose ID
    Linux does not give to another process while any member lives.
    """
    if not sessions:
        return []
    late = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        fields = stat_fields(pid)
        if (
            fields is not None
            and fields[0] != "Z"
            and int(fields[3]) in sessions
            and pid not in exclude
            and pid != os.getpid()
        ):
            late.append(pid)
    return late


def _wait_gone(pids: list[int], seconds: float) -> None:
    """Wait up to ``seconds`` until none of ``pids`` is alive.

    A zombie counts as gone (:func:`alive`), so nothing is reaped here: a
    ``waitpid`` of any child would take the exit status that the caller's
    ``subprocess.Popen`` of it, or of a process unrelated to this tree, is
    owed. Whoever started a process reaps it (``Popen.wait``).
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def marked(name: str, value: str) -> list[int]:
    """PIDs of live processes (but this one) whose environment sets ``name`` to ``value``.

    From ``/proc/PID/environ``: the environment a process started with, which
    a process forked from it shares. Every process of a runtime, the Ray
    workers of its own head included, starts with the runtime's environment,
    so a value that names the runtime (its ``FLWR_HOME``, in a folder of its
    own) finds them all, those re-parented to init included, and nothing else.
    """
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        try:
            environment = (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if pid != os.getpid() and wanted in environment.split(b"\0") and alive(pid):
            found.append(pid)
    return found


def stop_marked(name: str, value: str, grace: float) -> list[int]:
    """:func:`stop_run_tree` for the processes :func:`marked` finds (and what is below them).

    What a runtime's trees no longer hold: a process whose parent died before
    it was stopped (a run's ServerApp started by a SuperExec that the warm
    process had forked, once the warm process was gone) is re-parented to
    init, in a session of its own. Returns the PIDs signalled.
    """
    pids = marked(name, value)
    return stop_run_tree(pids, grace) if pids else []


def watch(parent: int, guard_file: Path, marker: str | None = None) -> int:
    """Wait for ``parent`` to die, then stop every tree listed in ``guard_file``.

    Each line of ``guard_file`` is a root's PID and :func:`start_time`. Then,
    with ``marker`` (``NAME=VALUE``), every process :func:`marked` with it.

    The folder that holds ``guard_file`` (a runtime's temporary folder: its
    staged app, shims, sockets and Ray's session files) goes with them.
    """
    while os.getppid() == parent and alive(parent):
        time.sleep(POLL)
    try:
        lines = [line.split() for line in guard_file.read_text().splitlines() if line.strip()]
        started = {int(pid): int(start) for pid, start in lines}
    except (OSError, ValueError):
        started = None
    if started is not None:
        stop_run_tree(still_running(started), ORPHAN_GRACE)
    if marker is not None:
        name, _, value = marker.partition("=")
        stop_marked(name, value, ORPHAN_GRACE)
    if started is not None:
        shutil.rmtree(guard_file.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    sys.exit(watch(int(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4]))
