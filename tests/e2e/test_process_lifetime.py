"""Nothing ``fedmerge simulate`` starts outlives it, even when it is killed with SIGKILL.

The run starts its own SuperLink and Ray head (no ``simulation.ray_address``),
so the tree below the CLI holds every kind of process a run has: the
watchdog, the SuperLink and its SuperExec, ``flwr run``, the simulation
process, Ray's daemons and the ClientApp actors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sims.processes import alive, descendants, stop_tree

REPO = Path(__file__).resolve().parent.parent.parent


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_sigkill_of_simulate_leaves_no_process_behind(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tree: list[int] = []
    argv = [
        sys.executable, "-m", "sims.cli", "simulate", "default", "--run-dir", str(run_dir),
        "--set", "rounds=20", "--set", "num_clients=4", "--set", "clients_per_round=2",
        "--set", "simulation.ray_num_cpus=2",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline and not any(r["round"] == 1 for r in rows):
            assert proc.poll() is None, f"simulate exited early with {proc.returncode}"
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists():
                rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            time.sleep(0.1)
        assert any(r["round"] == 1 for r in rows), "round 1 never finished"
        tree = descendants(proc.pid)
        commands = " ".join(_cmdline(p) for p in tree)
        for part in ("sims.processes", "flower-superlink", "flwr run", "raylet", "gcs_server"):
            assert part in commands, f"{part} is not below the CLI: the test sees too little"
        assert any("ClientAppActor" in _cmdline(p) for p in tree)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rows_at_kill = len((run_dir / "metrics.jsonl").read_text().splitlines())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.1)
        survivors = {p: _cmdline(p)[:120] for p in tree if alive(p)}
        assert not survivors, survivors
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_tree([p for p in tree if alive(p)], 1.0)  # whatever a failed test left
    # Nothing finished the run into the directory behind the user's back.
    time.sleep(2)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == rows_at_kill
    assert not (run_dir / "summary.json").exists()
