"""A user's own model (not built in) aligns through its traced spec, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sims.launch import simulate
from sims.scenario_files import load_scenario
from tests.e2e.short_runs import SHORT

USER_MODEL = str(Path(__file__).resolve().parents[1] / "user_models.py") + ":residual_mlp"


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("aligned", "units_permuted"),
        ("ot", "transport_cost_mean"),
        ("dimat", "merged_accuracy"),
    ],
)
def test_user_model_runs_through_aligning_strategies(
    strategy: str, extra: str, ray_address: str, tmp_path: Path
) -> None:
    config = load_scenario(
        None,
        [
            "rounds=2", "num_clients=3", "clients_per_round=3",
            *SHORT,
            "partition.scheme='dirichlet'", "partition.alpha=0.5",
            f"model.factory='{USER_MODEL}'", "model.hidden=[64, 32]",
            f"strategy.name='{strategy}'", f"simulation.ray_address='{ray_address}'",
        ],
    )  # fmt: skip
    simulate(config, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert all(r.get(extra) is not None for r in rows[1:])
    assert all(r["skipped"] == 0 for r in rows[1:])
    keys = json.loads((tmp_path / "config.json").read_text())["model"]
    assert keys["factory"] == USER_MODEL
