"""A runtime's tree is stopped ServerApp first: the ServerApp never sees SIGTERM.

Real processes: a parent with two children, one of them a program named
``flwr-simulation``. Each child writes a file when it gets SIGTERM, as a
program that handles the signal would act on it. (The end-to-end proof, a
real run interrupted after round 1 that records nothing more, is the compare
sweep's killed run in ``tests/sims/test_compare.py``.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sims.processes import SERVERAPP, alive, descendants, runs_program, stop_run_tree

CHILD = """\
import signal, sys, time
from pathlib import Path
def term(signum, frame):
    Path(sys.argv[1]).write_text("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
Path(sys.argv[1] + ".ready").write_text("")
while True:
    time.sleep(0.05)
"""

PARENT = """\
import subprocess, sys, time
for program, out in zip(sys.argv[1::2], sys.argv[2::2]):
    subprocess.Popen([sys.executable, program, out])
while True:
    time.sleep(0.05)
"""


def test_the_serverapp_is_killed_before_the_rest_get_sigterm(tmp_path: Path) -> None:
    server, other = tmp_path / SERVERAPP, tmp_path / "flower-superlink"
    for program in (server, other):
        program.write_text(CHILD)
    (tmp_path / "parent.py").write_text(PARENT)
    marks = {server: tmp_path / "server.term", other: tmp_path / "other.term"}
    argv = [str(tmp_path / "parent.py"), str(server), str(marks[server]), str(other)]
    parent = subprocess.Popen([sys.executable, *argv, str(marks[other])])
    try:
        deadline = time.monotonic() + 30
        while not all(Path(f"{m}.ready").exists() for m in marks.values()):
            assert time.monotonic() < deadline, "the children did not start"
            time.sleep(0.05)
        children = descendants(parent.pid)
        assert sorted(runs_program(p, SERVERAPP) for p in children) == [False, True]
        stopped = stop_run_tree([parent.pid], grace=10.0)
        assert set(children) | {parent.pid} <= set(stopped)
        assert not any(alive(p) for p in children)
    finally:
        parent.kill()
        parent.wait()
    assert not marks[server].exists()  # killed at once, before any SIGTERM
    assert marks[other].read_text() == "SIGTERM"  # the rest stop with SIGTERM as before
