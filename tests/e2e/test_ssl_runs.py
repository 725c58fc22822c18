"""Federated self-supervised runs through Flower and Ray (the session's shared runtime)."""

from __future__ import annotations

import json
from pathlib import Path

from sims.launch import simulate
from sims.scenario_files import load_scenario
from tests.e2e.short_runs import MAX_STEPS

SMALL_SSL = [
    "rounds=2",
    MAX_STEPS,  # SSL runs score with task.test_samples
    "num_clients=3",
    "clients_per_round=3",
    "partition.scheme='iid'",
    "train.epochs=3",
    "train.lr=0.05",
    "task.client_samples=1000",
    "task.eval_samples=1000",
    "task.test_samples=1000",
]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_simclr_run_raises_knn_accuracy_above_the_random_encoder(
    ray_address: str, tmp_path: Path
) -> None:
    scenario = load_scenario(
        None, [*SMALL_SSL, "task.name='simclr'", f"simulation.ray_address='{ray_address}'"]
    )
    simulate(scenario, tmp_path)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 3 and r["skipped"] == 0 for r in rows[1:])
    assert rows[-1]["knn_accuracy"] > rows[0]["knn_accuracy"]
    assert all(r["accuracy"] == r["knn_accuracy"] for r in rows)
    # the linear probe runs in round 0 and after the last round (eval_every 5 > rounds)
    probed = [r["round"] for r in rows if r["linear_probe_accuracy"] is not None]
    assert probed == [0, 2]
    assert all(0.1 < r["linear_probe_accuracy"] <= 1 for r in rows if r["round"] in probed)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_knn_accuracy"] == rows[-1]["knn_accuracy"]
    assert summary["final_linear_probe_accuracy"] == rows[-1]["linear_probe_accuracy"]
    assert summary["initial_linear_probe_accuracy"] == rows[0]["linear_probe_accuracy"]


def test_byol_with_ldawa_sends_only_the_online_network(ray_address: str, tmp_path: Path) -> None:
    scenario = load_scenario(
        None,
        [
            *SMALL_SSL,
            "train.epochs=1",
            "task.client_samples=300",
            "task.name='byol'",
            "strategy.name='ldawa'",
            f"simulation.ray_address='{ray_address}'",
        ],
    )
    simulate(scenario, tmp_path)
    rows = _rows(tmp_path)
    assert all(r["clients"] == 3 and r["skipped"] == 0 and r["failures"] == 0 for r in rows[1:])
    # each reply carries arrays of exactly the shapes it received (the online encoder and
    # projector): a target network or predictor in a reply would make bytes_up larger
    for r in rows[1:]:
        assert r["bytes_up"] == r["bytes_down"] > 0
        assert r["train_loss"]["n"] == 3
    assert all(0 < r["knn_accuracy"] <= 1 for r in rows)
