"""The same apps on a real deployment: one SuperLink and real SuperNode processes on loopback.

Flower's own SuperNodes, peer strategies on SuperNodes, nodes with their own
data (one lost and back) and a bad partition id; see also
``test_deployment_nodes.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from sims.runtime import stop_process
from tests.e2e.deployment_support import (
    OWN_DATA,
    flwr_run,
    node_dirs,
    rows_of,
    supernode,
    supernodes,
)
from tests.e2e.short_runs import SHORT, TEST_SAMPLES


def test_server_side_strategy_on_supernodes(deployment, app: Path, tmp_path: Path) -> None:
    """The apps unchanged on Flower's own SuperNodes, a ClientApp process per message."""
    env, procs = deployment
    supernodes(env, procs, 2, flower=True)
    run_dir = tmp_path / "run"
    out = flwr_run(
        env,
        app,
        f"{' '.join(SHORT)} rounds=2 num_clients=2 clients_per_round=2 strategy.name='ldawa' "
        f"simulation.assign_partitions=false "
        f"output.run-dir='{run_dir}'",
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["strategy"] == "ldawa"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampled"] for r in rows[1:]] == [[0, 1], [0, 1]]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2


def test_peer_relay_on_supernodes(deployment, app: Path, tmp_path: Path) -> None:
    env, procs = deployment
    supernodes(env, procs, 3)
    run_dir = tmp_path / "run"
    out = flwr_run(
        env,
        app,
        # whole local epochs: after 40 steps, merging 3 such models scored below the start
        f"{TEST_SAMPLES} rounds=1 num_clients=3 clients_per_round=3 "
        f"strategy.name='dimat' "
        f"simulation.assign_partitions=false "
        f"topology.name='full' output.run-dir='{run_dir}'",
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert f"round 1: accuracy {rows[1]['accuracy']:.4f}" in out.stdout + out.stderr
    assert rows[1]["answered"] == [0, 1, 2]
    assert all(m > 0 for m in rows[1]["units_moved_per_peer"])
    assert rows[1]["accuracy"] > rows[0]["accuracy"]


def test_nodes_with_their_own_data_and_a_lost_node(deployment, app: Path, tmp_path: Path) -> None:
    """3 nodes bring their own arrays; node 2 dies after round 1 and comes back later.

    ``fedmerge supernode``s: their ClientApp processes live as long as the node, so a
    round of the nodes alive takes far less than the 30 s the server waits for the
    dead one (Flower marks a node offline only after 60 s without a heartbeat).
    """
    env, procs = deployment
    dirs = node_dirs(tmp_path, 3)
    nodes = [supernode(env, procs, f"partition-id={p} data-dir='{d}'") for p, d in enumerate(dirs)]
    run_dir, log = tmp_path / "run", tmp_path / "flwr-run.log"
    sink = log.open("w")
    client = subprocess.Popen(
        ["flwr", "run", str(app), "--stream", "--run-config",
         f"{OWN_DATA} simulation.timeout=30 rounds=4 output.run-dir='{run_dir}'"],
        env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    sink.close()  # the child has its own copy
    procs.append(client)

    def wait_rows(n: int) -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and client.poll() is None:
            path = run_dir / "metrics.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= n:
                return
            time.sleep(0.5)
        raise AssertionError(f"no row {n - 1} in {run_dir}")

    wait_rows(2)  # round 1 done: stop node 2
    stop_process(nodes[2], grace=0.0)
    wait_rows(3)  # round 2 done without it: start it again, with a new node id
    supernode(env, procs, f"partition-id=2 data-dir='{dirs[2]}'")
    client.wait(timeout=400)
    out = log.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = rows_of(run_dir)
    assert summary["status"] == "degraded", out[-3000:]
    assert summary["lost_partitions"] == [2]
    assert all(e["reason"].startswith("partition 2 ") for e in summary["lost"])
    assert rows[1]["clients"] == 3 and rows[1]["skipped"] == 0
    assert rows[2]["skipped"] >= 1
    assert rows[4]["skipped"] == 0 and rows[4]["clients"] == 3  # it rejoined
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.3


def test_bad_partition_id_fails_with_a_summary(deployment, app: Path, tmp_path: Path) -> None:
    env, procs = deployment
    dirs = node_dirs(tmp_path, 3)
    for p, d in zip((0, 1, 7), dirs, strict=True):
        supernode(env, procs, f"partition-id={p} data-dir='{d}'", flower=True)
    run_dir = tmp_path / "run"
    out = flwr_run(
        env, app, f"{OWN_DATA} simulation.timeout=60 rounds=1 output.run-dir='{run_dir}'"
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stage"] == "discovery", summary
    assert (
        "partition-id: node" in summary["error"] and "says 7; allowed: 0 to 2" in summary["error"]
    )
    # flwr run --stream exits 0 whatever the ServerApp did; fedmerge status does not
    status = subprocess.run(
        [sys.executable, "-m", "sims.cli", "status", str(run_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 1, status.stdout + status.stderr
    assert status.stdout.startswith("failed (discovery): NodeDiscoveryError: partition-id"), out
