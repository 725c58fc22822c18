"""A process of a run that dies of a fatal signal leaves its Python stack in its log.

Every Flower process of a run gets :data:`sims.processes.FLOWER_ENV`, which
sets ``PYTHONFAULTHANDLER``. A child of the warm process takes it from its
request's environment, as a fresh interpreter would: a child that crashes in
native code (here a read of address 0 through ctypes, as a Ray worker's
script) writes Python's fatal-error report, with the line it was on, to the
stream it was given; without the variable it says nothing. The warm process
imports nothing here (``PRELOAD`` emptied): what is tested is its fork.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sims.processes import FLOWER_ENV, stop_tree
from sims.warm import RAY_WORKER
from tests.sims.warm_requests import start_warm

CRASH = """\
import ctypes, os
print(os.getppid(), flush=True)  # the warm process, for a forked child
def read_address_zero():
    return ctypes.string_at(0)
read_address_zero()
"""


@contextmanager
def _warm_process(tmp_path: Path) -> Iterator[tuple[dict[str, str], int]]:
    """A warm process without imports, with this environment: its environment and PID."""
    env, proc = start_warm(tmp_path / "warm", tmp_path / "warm.log", bare=True)
    try:
        yield env, proc.pid
    finally:
        stop_tree([proc.pid], 1.0)
        proc.wait()


@pytest.fixture
def warm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, str], int]]:
    """A warm process's environment and PID, without the fault handler (requests bring theirs)."""
    monkeypatch.delenv("PYTHONFAULTHANDLER", raising=False)
    with _warm_process(tmp_path) as warm:
        yield warm


def _crash(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a script that reads address 0 through the warm process, as Ray runs a worker.

    The shim (the program Ray starts) hands it to the warm process, whose
    child runs it.
    """
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    shim = Path(env["PATH"].split(os.pathsep)[0]) / RAY_WORKER
    return subprocess.run(
        [str(shim), str(script)], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_child_that_crashes_writes_its_stack_and_its_shim_dies_of_the_same_signal(
    tmp_path: Path, warm: tuple[dict[str, str], int]
) -> None:
    env, warm_pid = warm
    assert FLOWER_ENV["PYTHONFAULTHANDLER"] == "1"
    crashed = _crash({**env, **FLOWER_ENV}, tmp_path)
    assert crashed.stdout.split() == [str(warm_pid)]  # forked, not run by the shim itself
    assert crashed.returncode == -signal.SIGSEGV, crashed
    said = crashed.stderr
    assert "Fatal Python error: Segmentation fault" in said, said
    assert f'File "{tmp_path / "crash.py"}", line 4 in read_address_zero' in said, said
    # the same request without the variable: nothing, as from a fresh interpreter
    quiet = _crash(env, tmp_path)
    assert quiet.stdout.split() == [str(warm_pid)]
    assert quiet.returncode == -signal.SIGSEGV and quiet.stderr == "", quiet


def test_a_child_forked_from_a_warm_process_with_the_handler_follows_its_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm process itself has the handler on; a request without the variable does not."""
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    with _warm_process(tmp_path) as (env, warm_pid):
        plain = {k: v for k, v in env.items() if k != "PYTHONFAULTHANDLER"}
        quiet = _crash(plain, tmp_path)
    assert quiet.stdout.split() == [str(warm_pid)]
    assert quiet.returncode == -signal.SIGSEGV and quiet.stderr == "", quiet
