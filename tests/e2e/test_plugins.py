"""A server strategy and a peer operator added through the plugin interface alone.

Both plugins are defined and registered in this module; the simulations name
the module in ``plugins``, so the ServerApp and every ClientApp import it too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fedmerge.merge import PeerMergeInfo
from fedmerge.topology import build_graph
from sims.launch import simulate
from sims.scenario_files import load_scenario
from strategies.federation import Federation
from strategies.plugins import ClientContext, PeerPlugin, ServerContext, ServerPlugin, register
from tests.e2e.short_runs import SHORT

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FreezeOptions:
    """Options of the toy ``toy-freeze`` strategy: none."""


@dataclass(frozen=True)
class FreezeMerge:
    """Keep the global model; report how many updates arrived."""

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[Any]
    ) -> tuple[StateDict, dict[str, Any]]:
        return dict(global_state), {"toy_updates": len(updates)}


class FreezePlugin(ServerPlugin):
    """Server side: clients train, the server keeps the global model as it was."""

    name = "toy-freeze"
    Options = FreezeOptions

    def strategy(self, options: Any, ctx: ServerContext) -> Any:
        from strategies.merging import MergingStrategy

        return MergingStrategy(merge=FreezeMerge(), **ctx.flower_options)


@dataclass(frozen=True)
class CopyMinOptions:
    """Options of the toy ``toy-copy-min`` peer operator: none."""


class CopyMinPlugin(PeerPlugin):
    """Peer side: every peer replaces its model by its lowest-numbered neighbour's."""

    name = "toy-copy-min"
    Options = CopyMinOptions

    def independent_init(self, options: Any) -> bool:
        return True

    def merges(self, options: Any, server_round: int) -> bool:
        return True

    def align_samples(self, options: Any) -> int:
        return 1

    def merge(
        self,
        options: Any,
        ctx: ClientContext,
        own: StateDict,
        neighbours: Mapping[int, StateDict],
        mixing: Mapping[int, float],
        self_weight: float,
        *,
        batches: Sequence[torch.Tensor],
        rng: np.random.Generator,
    ) -> tuple[StateDict, PeerMergeInfo]:
        first = min(neighbours)
        return {k: v.clone() for k, v in neighbours[first].items()}, PeerMergeInfo()


register(FreezePlugin())
register(CopyMinPlugin())

SMALL = [
    "rounds=2",
    *SHORT,
    "num_clients=4",
    "partition.scheme='dirichlet'",
    f"plugins=['{__file__}']",
]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_toy_server_strategy_runs_end_to_end(ray_address: str, tmp_path: Path) -> None:
    config = load_scenario(
        None,
        [*SMALL, "clients_per_round=3", "strategy.name='toy-freeze'",
         f"simulation.ray_address='{ray_address}'"],
    )  # fmt: skip
    simulate(config, tmp_path)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [(r["toy_updates"], len(r["sampled"])) for r in rows[1:]] == [(3, 3), (3, 3)]
    assert all(r["train_loss"]["n"] == 3 for r in rows[1:])  # the clients did train
    assert {r["accuracy"] for r in rows} == {rows[0]["accuracy"]}
    final = load_file(str(tmp_path / "model.safetensors"))
    initial = Federation(config).initial_model().state_dict()
    assert set(final) == set(initial)
    assert all(torch.equal(final[k], initial[k]) for k in initial)


def test_toy_peer_operator_runs_end_to_end(ray_address: str, tmp_path: Path) -> None:
    config = load_scenario(
        None,
        [*SMALL, "clients_per_round=4", "strategy.name='toy-copy-min'",
         "topology.name='ring'", f"simulation.ray_address='{ray_address}'"],
    )  # fmt: skip
    simulate(config, tmp_path)
    rows = _rows(tmp_path)
    graph = build_graph(config.topology, 4, seed=config.seed, round=1)
    # Right after the first merge, peer p holds its lowest neighbour's initial model, whose
    # test accuracy the relay recorded in round 0.
    expected = [rows[0]["peer_accuracy"][min(graph.neighbors(p))] for p in range(4)]
    assert rows[1]["merged_peer_accuracy"] == expected
    assert rows[1]["answered"] == [0, 1, 2, 3]
