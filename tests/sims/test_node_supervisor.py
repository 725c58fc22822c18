"""``fedmerge supernode``'s supervisor: both processes started, and stopped together by PID."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sims.node import supernode_with_worker, supervise
from sims.processes import alive


def test_when_one_child_exits_the_other_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    sleeper = [
        sys.executable, "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    ]  # fmt: skip
    quitter = [
        sys.executable, "-c",
        f"import os, sys, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.05)\n"
        "sys.exit(3)",
    ]  # fmt: skip
    assert supervise([sleeper, quitter], os.environ) == 3
    assert not alive(int(pid_file.read_text()))


def test_supernode_runs_in_process_isolation_beside_its_worker() -> None:
    node, worker = supernode_with_worker(["flower-supernode", "--insecure"], 9200)
    assert node == ["flower-supernode", "--insecure", "--isolation", "process"]
    assert worker[1:] == [
        "-m", "sims.clientapp_worker", "--runtime-api-address", "127.0.0.1:9200",
        "--insecure", "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    assert supernode_with_worker(["x"], None)[1][4] == "127.0.0.1:9094"


def test_worker_refuses_to_start_without_an_address() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sims.clientapp_worker"],
        capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert out.returncode == 2 and "--runtime-api-address" in out.stderr
