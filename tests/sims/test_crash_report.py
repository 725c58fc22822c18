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
from collections.abc import Iterator
from pathlib import Path

import pytest

from sims.processes import FLOWER_ENV, stop_tree
from sims.warm import RAY_WORKER
from tests.sims.warm_requests import ask, start_warm

CRASH = """\
import ctypes
def read_address_zero():
    return ctypes.string_at(0)
read_address_zero()
"""


@pytest.fixture
def warm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A warm process's environment, without the fault handler (requests bring their own)."""
    monkeypatch.delenv("PYTHONFAULTHANDLER", raising=False)
    env, proc = start_warm(tmp_path / "warm", tmp_path / "warm.log", bare=True)
    yield env
    stop_tree([proc.pid], 1.0)
    proc.wait()


def _crash(env: dict[str, str], tmp_path: Path, name: str) -> str:
    """What a child that reads address 0 writes to its stream."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    out = tmp_path / f"{name}.log"
    with out.open("wb") as sink, open(os.devnull, "wb") as null:
        conn, _pid = ask(
            env, RAY_WORKER, [str(script)], [null.fileno(), sink.fileno(), sink.fileno()]
        )
    with conn:
        while data := conn.recv(1 << 16):  # the connection closes when the child has gone
            assert b'"exit"' not in data  # killed by the signal: no exit code is sent
    return out.read_text()


def test_a_child_that_crashes_writes_its_stack_when_its_environment_asks(
    tmp_path: Path, warm: dict[str, str]
) -> None:
    assert FLOWER_ENV["PYTHONFAULTHANDLER"] == "1"
    said = _crash({**warm, **FLOWER_ENV}, tmp_path, "flower-env")
    assert "Fatal Python error: Segmentation fault" in said, said
    assert f'File "{tmp_path / "crash.py"}", line 3 in read_address_zero' in said, said
    # the same request without the variable: nothing, as from a fresh interpreter
    assert _crash(warm, tmp_path, "plain") == ""
