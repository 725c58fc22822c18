"""The workload: fedmerge's default scenario at the sizes of the run config."""

from __future__ import annotations

from functools import cache

from flwr.app import Context

from sims.scenario_files import load_scenario
from strategies.config import RunConfig
from strategies.federation import Federation


@cache
def _federation(clients: int, per_round: int, rounds: int, seed: int) -> Federation:
    scenario: RunConfig = load_scenario(
        None,
        [f"num_clients={clients}", f"clients_per_round={per_round}", f"rounds={rounds}",
         f"seed={seed}"],
    )  # fmt: skip
    return Federation(scenario)


def federation(context: Context) -> Federation:
    """The run's data, partitions and model builder (once per process)."""
    c = context.run_config
    return _federation(int(c["num-clients"]), int(c["per-round"]), int(c["rounds"]), int(c["seed"]))
