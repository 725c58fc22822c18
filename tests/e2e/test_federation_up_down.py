"""``fedmerge federation up|down`` with real processes on 127.0.0.1: a run, then nothing left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sims.local_federation import STATE_FILE, read_state, running
from sims.processes import alive, descendants, flower_environment, stop_tree

REPO = Path(__file__).resolve().parents[2]


def test_up_runs_a_tls_federation_and_down_stops_exactly_it(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    fedmerge = [sys.executable, "-m", "sims.cli", "federation"]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    here = {**os.environ, "PYTHONPATH": path}
    try:
        # DIR relative to where up runs, as a user types it: the nodes, which run in DIR,
        # must still find their data
        up = subprocess.run([*fedmerge, "up", "fed", "--nodes", "2"], cwd=tmp_path, env=here,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        state = read_state(fed)
        roles = [p["role"] for p in state["processes"]]
        assert roles == ["superlink", "supernode-0", "supernode-1"]
        pids = [int(p["pid"]) for p in state["processes"]]
        assert [p["data_dir"] for p in state["processes"][1:]] == [
            str(fed / "node-0"), str(fed / "node-1")
        ]  # fmt: skip
        assert running(state) == pids
        # each node: its supervisor, the SuperNode and the long-lived ClientApp process
        assert all(len(descendants(pid)) >= 2 for pid in pids[1:])
        assert "flwr run . federation" in up.stdout
        config = (fed / "flwr" / "config.toml").read_text()
        assert "root-certificates" in config and "insecure" not in config

        run_dir = tmp_path / "run"
        env = {**flower_environment(), "FLWR_HOME": state["flwr_home"]}
        run = subprocess.run(
            ["flwr", "run", ".", "federation", "--stream", "--run-config",
             "rounds=2 num_clients=2 clients_per_round=2 strategy.name='fedavg' "
             "dataset.name='digits' model.name='mlp' simulation.assign_partitions=false "
             f"simulation.timeout=120 output.run-dir='{run_dir}'"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", run.stdout[-3000:] + run.stderr[-2000:]
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["clients"] for r in rows[1:]] == [2, 2]
        assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2

        tree = pids + [d for pid in pids for d in descendants(pid)]
        down = subprocess.run([*fedmerge, "down", str(fed)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert down.returncode == 0, down.stdout + down.stderr
        assert f"stopped 3 processes {pids}" in down.stdout
        assert [p for p in tree if alive(p)] == []
        assert not (fed / STATE_FILE).exists()
        again = subprocess.run([*fedmerge, "down", str(fed)], cwd=REPO,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert again.returncode == 2 and "has no readable federation.json" in again.stderr
    finally:
        if (fed / STATE_FILE).exists():  # a failed assertion: stop what up started, by PID
            left = running(read_state(fed))
            if left:
                stop_tree(left[::-1], 5.0)
