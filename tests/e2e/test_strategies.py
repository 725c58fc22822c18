"""End-to-end runs of the merging strategies through Flower + Ray on non-IID splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sims.launch import simulate
from sims.scenario_files import load_scenario
from strategies.federation import Federation
from tests.e2e.short_runs import SHORT

NON_IID = [
    "rounds=2",
    *SHORT,
    "num_clients=4",
    "clients_per_round=4",
    "partition.scheme='dirichlet'",
    "partition.alpha=0.3",
]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "options",
    [
        ["strategy.name='ldawa'"],
        ["strategy.name='aligned'", "strategy.method='activation'",
         "strategy.proxy_samples=256"],
        ["strategy.name='ot'", "strategy.solver='sinkhorn'"],
    ],
    ids=["ldawa", "aligned-activation", "ot-sinkhorn"],
)  # fmt: skip
def test_server_side_strategy_improves_on_initial_model(
    options: list[str], ray_address: str, tmp_path: Path
) -> None:
    scenario = load_scenario(None, [*NON_IID, *options, f"simulation.ray_address='{ray_address}'"])
    simulate(scenario, tmp_path)
    rows = _rows(tmp_path)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert all(r["skipped"] == 0 and r["clients"] == 4 for r in rows[1:])
    if scenario.strategy.name == "aligned":
        assert all(isinstance(r["units_permuted"], dict) for r in rows[1:])


@pytest.fixture(scope="module")
def ring_run(ray_address: str, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("dimat")
    scenario = load_scenario(
        None,
        [
            *NON_IID,
            "strategy.name='dimat'",
            "partition.scheme='pathological'",
            "partition.classes_per_client=2",
            "topology.name='ring'",
            f"simulation.ray_address='{ray_address}'",
        ],
    )
    simulate(scenario, run_dir)
    return scenario, run_dir


def test_peer_models_change_and_stay_distinct(ring_run) -> None:
    scenario, run_dir = ring_run
    final = load_file(str(run_dir / "model.safetensors"))
    peers = [{k.split(".", 1)[1]: v for k, v in final.items() if k.startswith(f"peer{p}.")}
             for p in range(4)]  # fmt: skip
    fed = Federation(scenario)
    for p, state in enumerate(peers):
        initial = fed.peer_initial_model(p).state_dict()
        assert set(state) == set(initial)
        assert any(not torch.equal(state[k], initial[k]) for k in state), f"peer {p} unchanged"
    for a in range(4):
        for b in range(a + 1, 4):
            assert any(not torch.equal(peers[a][k], peers[b][k]) for k in peers[a])


def test_relay_sends_each_peer_its_two_ring_neighbours(ring_run) -> None:
    _, run_dir = ring_run
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    final = load_file(str(run_dir / "model.safetensors"))
    model_floats = sum(
        v.numel() * v.element_size() for k, v in final.items() if k.startswith("peer0.")
    )
    for row in rows[1:]:
        assert row["answered"] == [0, 1, 2, 3]
        assert sorted(map(tuple, row["edges"])) == [(0, 1), (0, 3), (1, 2), (2, 3)]
        # self + 2 neighbours down, 1 model up (plus small .npy headers)
        for down, up in zip(row["bytes_down_per_peer"], row["bytes_up_per_peer"], strict=True):
            assert 3 * model_floats <= down < 3 * model_floats + 4096
            assert model_floats <= up < model_floats + 2048
        assert all(m > 0 for m in row["units_moved_per_peer"])  # independent inits get aligned
        assert len(row["peer_accuracy"]) == 4
        assert row["accuracy"] == pytest.approx(sum(row["peer_accuracy"]) / 4)
        assert row["accuracy_min"] == min(row["peer_accuracy"])
    assert rows[-1]["consensus_distance"] < rows[0]["consensus_distance"]


def test_failed_peer_is_left_out_then_rejoins(ray_address: str, tmp_path: Path) -> None:
    """Peer 1 fails in round 2: nobody mixes with it in round 3; it answers again in 3."""
    scenario = load_scenario(
        None,
        [
            "rounds=3", *SHORT, "num_clients=4", "clients_per_round=4",
            "partition.scheme='pathological'", "strategy.name='gossip'",
            "topology.name='ring'", "simulation.inject_failures='1@2'",
            f"simulation.ray_address='{ray_address}'",
        ],
    )  # fmt: skip
    simulate(scenario, tmp_path)
    rows = _rows(tmp_path)
    assert [r["answered"] for r in rows[1:]] == [[0, 1, 2, 3], [0, 2, 3], [0, 1, 2, 3]]
    assert rows[2]["skipped"] == 1 and "injected failure" in rows[2]["skipped_reasons"][0]
    down1, down3 = rows[1]["bytes_down_per_peer"], rows[3]["bytes_down_per_peer"]
    one_model = down1[0] / 3  # round 1: self + 2 ring neighbours, everyone answered
    # round 3: peers 0 and 2 (neighbours of 1) get self + 1 neighbour; 1 and 3 get self + 2
    assert down3[0] == pytest.approx(2 * one_model, rel=0.01)
    assert down3[2] == pytest.approx(2 * one_model, rel=0.01)
    assert down3[1] == pytest.approx(3 * one_model, rel=0.01)
    assert down3[3] == pytest.approx(3 * one_model, rel=0.01)
    assert rows[2]["bytes_up_per_peer"][1] == 0


def test_ot_fuses_clients_of_other_widths(ray_address: str, tmp_path: Path) -> None:
    """Clients 1 and 3 train a twice-as-wide CNN; the server fuses them into its width."""
    scenario = load_scenario(
        None,
        [*NON_IID, "strategy.name='ot'", "strategy.client_widths=[1, 2]",
         f"simulation.ray_address='{ray_address}'"],
    )  # fmt: skip
    simulate(scenario, tmp_path)
    rows = _rows(tmp_path)
    assert all(r["skipped"] == 0 and r["clients"] == 4 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    for row in rows[1:]:  # the wide clients send back more than they receive
        assert row["bytes_up"] > 1.5 * row["bytes_down"]
    final = load_file(str(tmp_path / "model.safetensors"))
    assert final["conv1.weight"].shape[0] == 6  # the server keeps its own width
