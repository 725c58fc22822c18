"""Reference runs: one short simulation per built-in strategy (see scripts/record_references.py)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Row fields that measure wall time (they differ between runs of the same scenario).
WALL_TIME_FIELDS = ("round_time", "elapsed")

_DATA = ["dataset.name='digits'", "model.name='mlp'", "model.hidden=[64, 32]",
         "partition.scheme='dirichlet'", "partition.alpha=0.5", "num_clients=4"]  # fmt: skip
_SERVER = [*_DATA, "rounds=3", "clients_per_round=2"]
_PEER = [*_DATA, "rounds=3", "clients_per_round=4", "topology.name='ring'"]

#: Strategy -> ``--set`` overrides of the embedded default scenario.
REFERENCE_RUNS: dict[str, list[str]] = {
    "fedavg": [*_SERVER, "strategy.name='fedavg'", "strategy.fraction_evaluate=0.5"],
    "fedprox": [*_SERVER, "strategy.name='fedprox'", "strategy.prox_mu=0.1"],
    "ldawa": [*_SERVER, "strategy.name='ldawa'"],
    "aligned": [*_SERVER, "strategy.name='aligned'", "strategy.proxy_samples=128"],
    "ot": [*_SERVER, "strategy.name='ot'"],
    "dimat": [*_PEER, "strategy.name='dimat'"],
    "dimat-wm": [*_PEER, "strategy.name='dimat-wm'"],
    "gossip": [*_PEER, "strategy.name='gossip'"],
    "local": [*_PEER, "strategy.name='local'"],
}


def reference_path(name: str) -> Path:
    """Where the reference of strategy ``name`` is stored."""
    return HERE / f"{name}.json"
