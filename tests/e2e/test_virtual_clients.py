"""Virtual clients: the server names the partition in every message (simulation).

Start-up no longer asks every node for its partition, and a run of many
clients uses at most ``simulation.max_nodes`` SuperNodes; the numbers must be
those of a run in which every node owns its partition.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sims.launch import simulate
from sims.scenario_files import load_scenario
from tests.references import WALL_TIME_FIELDS

DIGITS = ["dataset.name='digits'", "model.name='mlp'", "model.hidden=[32]",
          "partition.scheme='dirichlet'", "partition.alpha=0.5"]  # fmt: skip


def _run(tmp_path: Path, name: str, ray_address: str, *extra: str) -> tuple[list[dict], str]:
    config = load_scenario(None, [*DIGITS, *extra, f"simulation.ray_address='{ray_address}'"])
    run_dir = tmp_path / name
    simulate(config, run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in WALL_TIME_FIELDS:
            row.pop(key)
    return rows, hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "strategy",
    [["strategy.name='fedavg'", "clients_per_round=3", "strategy.fraction_evaluate=0.5"],
     ["strategy.name='gossip'", "clients_per_round=6"]],
    ids=["fedavg", "gossip"],
)  # fmt: skip
def test_virtual_clients_give_the_numbers_of_nodes_that_own_their_partition(
    strategy: list[str], ray_address: str, tmp_path: Path
) -> None:
    common = ["rounds=2", "num_clients=6", *strategy]
    # 2 SuperNodes serve 6 partitions (messages to one node go in waves) ...
    virtual = _run(tmp_path, "virtual", ray_address, *common, "simulation.max_nodes=2")
    # ... against 6 SuperNodes that each declare their own partition when the run starts
    owned = _run(tmp_path, "owned", ray_address, *common, "simulation.assign_partitions=false")
    assert virtual == owned


def test_a_hundred_thousand_clients_on_a_few_nodes(ray_address: str, tmp_path: Path) -> None:
    """100,000 clients (MNIST-1D, 125,000 samples: 100,000 to train, one each) on 8 nodes."""
    rows, _ = _run(
        tmp_path, "many", ray_address,
        "rounds=2", "num_clients=100000", "clients_per_round=10", "partition.scheme='iid'",
        "dataset.name='mnist1d'", "dataset.mnist1d_samples=125000", "model.name='mlp'",
        "simulation.max_nodes=8",
    )  # fmt: skip
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert len(set(row["sampled"])) == 10
        assert all(0 <= p < 100_000 for p in row["sampled"])
        assert row["clients"] == 10 and row["train_loss"]["n"] == 10
    assert rows[1]["sampled"] != rows[2]["sampled"]
