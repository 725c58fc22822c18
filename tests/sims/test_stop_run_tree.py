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


def test_stopping_a_tree_leaves_other_children_exit_status_to_their_popen(tmp_path: Path) -> None:
    """A child outside the stopped tree that has exited keeps its status for its ``Popen``.

    Its status, 3, is what it passed to ``sys.exit``. Reaped by a ``waitpid``
    of any child while the tree was stopped, its ``Popen`` would report 0.
    """
    done = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    deadline = time.monotonic() + 30
    while alive(done.pid):  # exited, not yet reaped: a zombie
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.05)
    (tmp_path / "child.py").write_text(CHILD)
    other = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "m")])
    try:
        while not (tmp_path / "m.ready").exists():
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        stop_run_tree([other.pid], grace=10.0)
    finally:
        other.kill()
        other.wait()
    assert (tmp_path / "m").read_text() == "SIGTERM"
    assert done.wait(timeout=10) == 3


#: A session leader that, told to stop, starts one more process and exits at once, as
#: Ray's raylet did when a run was interrupted while the head was starting its agents.
LAST_WORD = """\
import signal, subprocess, sys, time
from pathlib import Path
def term(signum, frame):
    late = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    Path(sys.argv[1]).write_text(str(late.pid))
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
Path(sys.argv[1] + ".ready").write_text("")
while True:
    time.sleep(0.05)
"""


def test_a_process_started_while_the_tree_stops_is_stopped_too(tmp_path: Path) -> None:
    """Started after the tree was collected, the latecomer is re-parented to init when its
    parent exits, out of the tree; it is found by its session and stopped by PID."""
    from sims.processes import stop_tree

    script, out = tmp_path / "last_word.py", tmp_path / "late.pid"
    script.write_text(LAST_WORD)
    leader = subprocess.Popen([sys.executable, str(script), str(out)], start_new_session=True)
    late = 0
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{out}.ready").exists():
            assert time.monotonic() < deadline and leader.poll() is None
            time.sleep(0.05)
        stopped = stop_tree([leader.pid], grace=10.0)
        assert leader.wait(timeout=10) == 0  # it handled SIGTERM: its latecomer is out there
        late = int(out.read_text())
        assert late in stopped and not alive(late)
    finally:
        if late and alive(late):  # the old code left it running: do not leave it behind
            import os
            import signal

            os.kill(late, signal.SIGKILL)
