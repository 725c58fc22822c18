"""``fedmerge superlink`` and ``supernode``: the environment of the Flower processes they start.

Real processes: the SuperLink and two SuperNodes under ``--isolation
subprocess`` (each starts a SuperExec of its own), from a virtual environment
whose scripts are not on ``PATH``, as when it was not activated.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sims.processes import command_line, descendants, free_port, stop_tree
from sims.runtime import wait_healthy

REPO = Path(__file__).resolve().parents[2]
POLL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _superexec(root: int, timeout: float = 90.0) -> int:
    """The PID of the ``flower-superexec`` below ``root``, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in descendants(root) if "flower-superexec" in command_line(p)]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no flower-superexec below {root}: {command_line(root)}")


def test_superexecs_start_without_an_activated_venv_and_poll_as_their_role_needs(
    tmp_path: Path,
) -> None:
    scripts = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != scripts)
    env = {k: v for k, v in os.environ.items() if k != POLL}
    env.update(PATH=path, FLWR_HOME=str(tmp_path / "home"))
    fedmerge = [sys.executable, "-m", "sims.cli"]
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*fedmerge, *argv], cwd=REPO, env={**env, **(extra or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    def node(i: int, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return start(
            ["supernode", "--insecure", "--isolation", "subprocess",
             "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
             "--node-config", f"partition-id={i} num-partitions=2"],
            extra,
        )  # fmt: skip

    try:
        link = start(["superlink", "--insecure", "--no-auth", "--host", "127.0.0.1",
                      "--port", str(port)])  # fmt: skip
        # Before, its SuperExec was looked up on PATH alone: the SuperLink exited with 3.
        wait_healthy(port, link, timeout=90)
        fast, chosen = node(0), node(1, {POLL: "0.3"})
        link_exec = _environ(_superexec(link.pid))
        fast_exec, chosen_exec = _environ(_superexec(fast.pid)), _environ(_superexec(chosen.pid))
        assert link.poll() is None and fast.poll() is None and chosen.poll() is None
        for proc_env in (link_exec, fast_exec, chosen_exec):
            assert proc_env["PATH"].split(os.pathsep)[0] == scripts
            assert proc_env["FLWR_TELEMETRY_ENABLED"] == "0"
        # The SuperLink's SuperExec starts a ServerApp once per run: Flower's own interval.
        assert POLL not in link_exec
        # A SuperNode's starts a ClientApp process per message: 0.1 s unless the user says.
        assert fast_exec[POLL] == "0.1"
        assert chosen_exec[POLL] == "0.3"
    finally:
        stop_tree([p.pid for p in procs], grace=5.0)
        for proc in procs:
            proc.wait()
