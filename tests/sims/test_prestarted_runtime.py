"""``fedmerge simulate`` starts its runtime's warm process before its own imports.

The first run takes that runtime; a command that never runs (bad input)
stops it, and nothing it started outlives the command. Real processes: the
warm process and the watchdog.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from sims import runtime as runtime_module
from sims.cli import EXIT_BAD_INPUT
from sims.processes import alive
from sims.runtime import new_runtime, prestarted_runtime

REPO = Path(__file__).resolve().parent.parent.parent


def _marked(mark: str) -> dict[int, str]:
    """PID -> command line of every process whose environment holds ``mark``."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark.encode() in environ.read_bytes():
                pid = int(environ.parent.name)
                cmdline = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                found[pid] = cmdline.decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
    found.pop(os.getpid(), None)
    return found


def test_bad_input_stops_the_prestarted_warm_process_and_leaves_nothing(tmp_path: Path) -> None:
    mark = f"FEDMERGE_TEST_MARK={uuid.uuid4().hex}"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, mark.split("=")[0]: mark.split("=")[1], "TMPDIR": str(scratch)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sims.cli", "simulate", "--set", "rounds=-1",
         "--runs-root", str(tmp_path / "runs")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: dict[int, str] = {}
    while proc.poll() is None:
        # a process that is exiting has no command line left: keep what it had
        seen.update({pid: c for pid, c in _marked(mark).items() if c.strip()})
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and "rounds" in err, err
    # The warm process and its watchdog ran while the command checked its input ...
    commands = list(seen.values())
    assert any("sims.warm serve" in c for c in commands), commands
    assert any("sims.processes" in c for c in commands), commands
    # ... and are gone with it, as is their temporary directory.
    assert [pid for pid in seen if pid != proc.pid and alive(pid)] == []
    assert _marked(mark) == {}
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "runs").exists()


def test_the_first_run_takes_the_prestarted_runtime_and_an_unused_one_is_stopped() -> None:
    with prestarted_runtime():
        prestarted = runtime_module._prestarted
        assert prestarted is not None and prestarted.warm is not None
        taken = new_runtime()
        fresh = new_runtime()  # the second run of the block gets a runtime of its own
        try:
            assert taken is prestarted
            assert fresh is not prestarted and fresh.warm is not None
        finally:
            taken.close(grace=0.0)
            fresh.close(grace=0.0)
    with prestarted_runtime():
        unused = runtime_module._prestarted
        assert unused is not None and unused.warm is not None
        warm, tmp = unused.warm.pid, unused.tmp
        assert alive(warm) and tmp.is_dir()
    assert runtime_module._prestarted is None
    assert not alive(warm)
    assert not tmp.exists()
