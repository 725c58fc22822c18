"""When its parent dies, the watchdog stops the processes on its list and its runtime's strays.

Nothing else: a stray is a process that started with the runtime's variable
(``marked``), and a process of another runtime or none is left alone.

Real processes: a parent that starts the watchdog (``python -m sims.processes``)
as a runtime does, and two processes on the watchdog's list. One of them is
listed with another start time, as a PID is listed once its process has ended
and the kernel has given the PID to a new one: the watchdog must leave it alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sims.processes import alive, marked, start_time
from sims.runtime import Runtime
from tests.sims.warm_requests import ROOT

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]

#: The watchdog's parent: starts it, says so, and waits to be killed.
PARENT = """\
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-m", "sims.processes", str(os.getpid()), *sys.argv[1:]],
                 start_new_session=True)
print("started", flush=True)
time.sleep(120)
"""


def _kill_and_wait_for_the_watchdog(parent: subprocess.Popen[bytes], guard: Path) -> None:
    """SIGKILL ``parent`` once its watchdog runs; return once the watchdog has done its work.

    That is, once it has removed the runtime's folder, which it does last.
    """
    assert parent.stdout is not None and parent.stdout.readline() == b"started\n"
    time.sleep(0.5)  # the watchdog has looked at its parent at least once
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while guard.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not guard.parent.exists()


def test_the_watchdog_stops_listed_processes_whose_start_time_matches(tmp_path: Path) -> None:
    listed = subprocess.Popen(SLEEPER)
    reused = subprocess.Popen(SLEEPER)  # stands for a PID taken by another process since
    parent = None
    try:
        guard = tmp_path / "runtime" / "guard"
        guard.parent.mkdir()
        listed_start, reused_start = start_time(listed.pid), start_time(reused.pid)
        assert listed_start is not None and reused_start is not None
        guard.write_text(f"{listed.pid} {listed_start}\n{reused.pid} {reused_start - 1}\n")
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT, str(guard)], cwd=ROOT, stdout=subprocess.PIPE
        )
        _kill_and_wait_for_the_watchdog(parent, guard)
        assert not alive(listed.pid)
        assert alive(reused.pid) and reused.poll() is None
    finally:
        for proc in (listed, reused, parent):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_process_stopped_after_its_runtime_closed_writes_no_guard_file(tmp_path: Path) -> None:
    """A shared runtime's run can end after another run's failure closed the runtime.

    Stopping its ``flwr run`` then takes it off the watchdog's list, which
    lived in the runtime's folder: that folder, removed by ``close``, must stay gone.
    """
    runtime = Runtime()
    with (tmp_path / "out.log").open("wb") as out:
        proc = runtime.spawn(SLEEPER, out)
    guard = runtime.tmp / "guard"
    assert runtime.warm is not None
    listed = [runtime.warm.pid, proc.pid]
    assert guard.read_text() == "".join(f"{p} {start_time(p)}\n" for p in listed)
    runtime.close(grace=0.0)
    assert not runtime.tmp.exists()
    runtime._stop_spawned(proc, grace=1.0)
    assert proc.returncode is not None
    assert not runtime.tmp.exists()


def test_marked_finds_the_processes_that_started_with_the_variable() -> None:
    mine = subprocess.Popen(SLEEPER, env={**os.environ, "FM_TEST_MARK": "runtime-a"})
    other = subprocess.Popen(SLEEPER, env={**os.environ, "FM_TEST_MARK": "runtime-ab"})
    plain = subprocess.Popen(SLEEPER)
    try:
        found = marked("FM_TEST_MARK", "runtime-a")
        assert mine.pid in found
        assert other.pid not in found and plain.pid not in found and os.getpid() not in found
    finally:
        for proc in (mine, other, plain):
            proc.kill()
            proc.wait()
    assert marked("FM_TEST_MARK", "runtime-a") == []  # a zombie, then gone: not alive


def test_the_watchdog_also_stops_what_left_the_trees(tmp_path: Path) -> None:
    """A process of the runtime that no listed tree holds (re-parented to init) is stopped."""
    stray = subprocess.Popen(
        SLEEPER, env={**os.environ, "FM_TEST_MARK": str(tmp_path)}, start_new_session=True
    )
    bystander = subprocess.Popen(SLEEPER, env={**os.environ, "FM_TEST_MARK": "elsewhere"})
    parent = None
    try:
        guard = tmp_path / "runtime" / "guard"
        guard.parent.mkdir()
        guard.write_text("")  # nothing listed
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT, str(guard), f"FM_TEST_MARK={tmp_path}"],
            cwd=ROOT, stdout=subprocess.PIPE,
        )  # fmt: skip
        _kill_and_wait_for_the_watchdog(parent, guard)
        assert stray.wait(timeout=10) == -15  # SIGTERM
        assert bystander.poll() is None
    finally:
        for proc in (stray, bystander, parent):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
