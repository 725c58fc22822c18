"""The same apps on a real deployment: one SuperLink and real SuperNode processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sims.launch import APP_DIR, FLOWER_ENV, _free_port, _stop, _wait_healthy


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[dict[str, str], list[subprocess.Popen]]]:
    """A SuperLink (no simulation) and a way to add SuperNodes; all stopped by PID."""
    env = {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(tmp_path / "home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    (tmp_path / "home").mkdir()
    port = _free_port()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n[superlink.deployment]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen] = []
    superlink = subprocess.Popen(
        ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    procs.append(superlink)
    env["SUPERLINK_PORT"] = str(port)
    try:
        _wait_healthy(port, superlink, timeout=60)
        yield env, procs
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _supernodes(env: dict[str, str], procs: list[subprocess.Popen], n: int) -> None:
    for pid in range(n):
        procs.append(
            subprocess.Popen(
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{env['SUPERLINK_PORT']}",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f"partition-id={pid} num-partitions={n}",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )


def _flwr_run(env: dict[str, str], run_config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["flwr", "run", ".", "--stream", "--run-config", run_config],
        cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip


def test_server_side_strategy_on_supernodes(deployment, tmp_path: Path) -> None:
    env, procs = deployment
    _supernodes(env, procs, 2)
    run_dir = tmp_path / "run"
    out = _flwr_run(
        env,
        f"rounds=2 num_clients=2 clients_per_round=2 strategy.name='ldawa' "
        f"simulation.assign_partitions=false "
        f"output.run-dir='{run_dir}'",
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["strategy"] == "ldawa"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampled"] for r in rows[1:]] == [[0, 1], [0, 1]]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2


def test_peer_relay_on_supernodes(deployment, tmp_path: Path) -> None:
    env, procs = deployment
    _supernodes(env, procs, 3)
    run_dir = tmp_path / "run"
    out = _flwr_run(
        env,
        f"rounds=1 num_clients=3 clients_per_round=3 strategy.name='dimat' "
        f"simulation.assign_partitions=false "
        f"topology.name='full' output.run-dir='{run_dir}'",
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["answered"] == [0, 1, 2]
    assert all(m > 0 for m in rows[1]["units_moved_per_peer"])
    assert rows[1]["accuracy"] > rows[0]["accuracy"]
