"""End-to-end: one adversarial client against Krum and against FedAvg's norm screening.

Plain FedAvg under this attack ends at chance level (0.10 after 2 rounds, from
0.10; measured once, not tested here to save a simulation: see the README's
robust sweep).
"""

from __future__ import annotations

import json
from pathlib import Path

from sims.launch import simulate
from sims.scenario_files import load_scenario
from tests.e2e.short_runs import SHORT

# four clients, all trained every round; partition 0 sends its model multiplied by -10
ATTACKED = [
    "rounds=2",
    *SHORT,
    "num_clients=4",
    "clients_per_round=4",
    "partition.scheme='dirichlet'",
    "partition.alpha=0.3",
    "simulation.adversary_partitions=[0]",
    "simulation.adversary_behaviour='scale'",
    "simulation.adversary_factor=-10.0",
]


def _run(ray_address: str, run_dir: Path, *options: str) -> tuple[list[dict], dict]:
    scenario = load_scenario(None, [*ATTACKED, *options, f"simulation.ray_address='{ray_address}'"])
    simulate(scenario, run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((run_dir / "summary.json").read_text())


def test_krum_keeps_learning_under_the_same_attack(ray_address: str, tmp_path: Path) -> None:
    rows, summary = _run(ray_address, tmp_path, "strategy.robust='krum'", "strategy.krum_f=1")
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert all(0 not in r["krum_kept"] for r in rows[1:])
    assert summary["status"] == "completed" and summary["adversaries"] == [0]


def test_norm_screening_refuses_the_update_and_the_run_is_degraded(
    ray_address: str, tmp_path: Path
) -> None:
    rows, summary = _run(ray_address, tmp_path, "strategy.screen_norm_ratio=3.0")
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    for row in rows[1:]:
        assert row["refused"] == 1 and row["skipped"] == 1
        assert row["skipped_reasons"][0].startswith("partition 0 (node")
        assert "update norm" in row["skipped_reasons"][0]
    assert summary["status"] == "degraded" and summary["refused"] == 2
