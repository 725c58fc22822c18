"""End-to-end runs of task arithmetic, TIES, Fisher averaging, ZipIt! and the peer operators."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sims.launch import simulate
from sims.scenario_files import load_scenario
from tests.e2e.short_runs import SHORT

NON_IID = [
    "rounds=2",
    *SHORT,
    "num_clients=4",
    "clients_per_round=4",
    "partition.scheme='dirichlet'",
    "partition.alpha=0.3",
]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("options", "metric", "low", "high"),
    [
        (["strategy.name='task-arithmetic'", "strategy.sample_weighted=true"],
         "update_norm", 1e-3, float("inf")),
        # 4 task vectors, 20 % of each kept: at most 80 % of the entries change (plus ties)
        (["strategy.name='ties'", "strategy.density=0.2"], "ties_changed", 0.2, 0.8),
        (["strategy.name='fisher'", "strategy.fisher_samples=64"], "fisher_mean", 1e-12, 1.0),
        (["strategy.name='zipit'", "strategy.zip_samples=256"], "zipit_within", 0, 10_000),
    ],
    ids=["task-arithmetic", "ties", "fisher", "zipit"],
)  # fmt: skip
def test_merge_operator_improves_on_initial_model(
    options: list[str], metric: str, low: float, high: float, ray_address: str, tmp_path: Path
) -> None:
    scenario = load_scenario(None, [*NON_IID, *options, f"simulation.ray_address='{ray_address}'"])
    simulate(scenario, tmp_path)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["skipped"] == 0 and r["clients"] == 4 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert all(low <= r[metric] <= high for r in rows[1:]), [r[metric] for r in rows[1:]]


@pytest.mark.parametrize("name", ["peer-task-arithmetic", "peer-ties"])
def test_peer_operator_improves_on_initial_model(
    name: str, ray_address: str, tmp_path: Path
) -> None:
    scenario = load_scenario(
        None,
        [*NON_IID, f"strategy.name='{name}'", "strategy.peer_init='shared'",
         "topology.name='ring'", f"simulation.ray_address='{ray_address}'"],
    )  # fmt: skip
    simulate(scenario, tmp_path)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["answered"] == [0, 1, 2, 3] for r in rows[1:])
    assert all(m == 0 for r in rows[1:] for m in r["units_moved_per_peer"])  # no alignment
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
