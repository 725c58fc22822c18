"""A process of a run that dies of a fatal signal leaves its Python stack in its log.

The runtime's processes are forked from the warm process, which starts with
:data:`sims.processes.FLOWER_ENV`: a child that crashes in native code (here a
read of address 0 through ctypes, as a Ray worker's script) writes Python's
fatal-error report, with the line it was on, to the stream it was given.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
def warm(tmp_path: Path) -> Iterator[dict[str, str]]:
    env, proc = start_warm(tmp_path / "warm", tmp_path / "warm.log", extra=FLOWER_ENV)
    yield env
    stop_tree([proc.pid], 1.0)
    proc.wait()


def test_a_child_that_crashes_writes_its_stack_to_its_stream(
    tmp_path: Path, warm: dict[str, str]
) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    out = tmp_path / "child.log"
    with out.open("wb") as sink, open(os.devnull, "wb") as null:
        conn, _pid = ask(
            warm, RAY_WORKER, [str(script)], [null.fileno(), sink.fileno(), sink.fileno()]
        )
    with conn:
        while conn.recv(1 << 16):  # the connection closes when the child has gone
            pass
    said = out.read_text()
    assert "Fatal Python error: Segmentation fault" in said, said
    assert f'File "{script}", line 3 in read_address_zero' in said, said
    # without it, the same crash says nothing
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    quiet = subprocess.run([sys.executable, "-c", CRASH], env=env, capture_output=True, text=True)
    assert quiet.returncode < 0 and "Fatal Python error" not in quiet.stderr
