"""fedmerge's Flower ServerApp: node discovery, strategy, centralized evaluation, run log."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from fedmerge.cache import cache_key
from fedmerge.federation import client_indices, dataset_for, initial_model
from fedmerge.scenario import PEER_STRATEGIES, Scenario, scenario_from_dict, unflatten
from strategies.metering import MeteredGrid
from strategies.peer_relay import run_peers
from strategies.recorder import RoundRecorder, state_hash
from strategies.registry import build_strategy
from strategies.run_log import RunLog

logger = logging.getLogger(__name__)

app = ServerApp()

#: Run-config keys that are not part of the scenario.
RUN_DIR_KEY = "output.run-dir"


class NodeDiscoveryError(RuntimeError):
    """Not all expected nodes registered, or two claimed the same partition."""


def scenario_from_run_config(run_config: dict[str, Any]) -> Scenario:
    """Rebuild the scenario from Flower's flat run config (dotted keys)."""
    flat = {k: v for k, v in run_config.items() if not k.startswith("output.")}
    return scenario_from_dict(unflatten(flat))


def discover_nodes(
    grid: Grid, expected: int, timeout: float, config: ConfigRecord | None = None
) -> dict[int, int]:
    """Wait for ``expected`` nodes and map partition id -> node id.

    Every node answers a ``query`` message with the ``partition-id`` of its
    node config (and loads its data while doing so, so that training rounds
    do not pay for it). Node ids are random per run; partition ids are not.
    """
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise NodeDiscoveryError(
                f"num_clients: expected {expected} nodes, {len(node_ids)} registered "
                f"within {timeout:.0f} s"
            )
        time.sleep(0.2)
    messages = [
        Message(
            RecordDict({"config": config or ConfigRecord({})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise NodeDiscoveryError(
                f"node {reply.metadata.src_node_id} failed to answer: {reply.error.reason}"
            )
        pid = int(reply.content["config"]["partition-id"])  # type: ignore[arg-type]
        if pid in mapping:
            raise NodeDiscoveryError(f"partition-id {pid} claimed by two nodes")
        mapping[pid] = reply.metadata.src_node_id
    missing = sorted(set(range(expected)) - set(mapping))
    if missing:
        raise NodeDiscoveryError(f"partition-id: no node answered for {missing}")
    return dict(sorted(mapping.items()))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Discover nodes, run the scenario's strategy, log every round."""
    t_start = time.perf_counter()
    scenario = scenario_from_run_config(dict(context.run_config))
    run_dir = str(context.run_config.get(RUN_DIR_KEY, "")) or str(
        Path("runs") / f"{scenario.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    )
    log = RunLog(Path(run_dir))
    log.write_json("config.json", scenario.to_dict())

    config = ConfigRecord({"scenario": json.dumps(scenario.to_dict(), sort_keys=True)})
    mapping = discover_nodes(
        grid, scenario.num_clients, scenario.simulation.timeout, ConfigRecord(dict(config))
    )
    logger.info("%d nodes ready after %.1f s", len(mapping), time.perf_counter() - t_start)

    model = initial_model(scenario).to(scenario.device)
    hashes = {
        "initial_hash": state_hash(model.state_dict()),
        "partition_hash": cache_key(*client_indices(scenario)),
    }
    metered = MeteredGrid(grid)
    recorder = RoundRecorder(
        scenario, log, metered, model, dataset_for(scenario), {n: p for p, n in mapping.items()}
    )
    if scenario.strategy.name in PEER_STRATEGIES:
        final = run_peers(metered, scenario, mapping, recorder, config)
        log.save_tensors("model.safetensors", final)
        recorder.summary(t_start, hashes)
        return

    strategy = build_strategy(scenario)
    strategy.bind_nodes(  # type: ignore[attr-defined]
        mapping,
        clients_per_round=scenario.clients_per_round,
        rng=np.random.default_rng([scenario.seed, 1]),
    )
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    done = 0
    resume = recorder.begin()
    if resume is not None:
        strategy.resume_from(resume.round, resume.sampler_state)  # type: ignore[attr-defined]
        initial, done = resume.state, resume.round
        logger.info("resuming after round %d", done)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resume is not None and server_round == 0:
            return None  # round `done` is already recorded
        actual = server_round + done
        state = arrays.to_torch_state_dict()
        row = recorder.record(actual, state, strategy.take_round_report())  # type: ignore[attr-defined]
        recorder.checkpoint(actual, state, strategy.sampler_state())  # type: ignore[attr-defined]
        return MetricRecord({"accuracy": row["accuracy"], "loss": row["loss"]})

    if done < scenario.rounds or resume is None:
        result = strategy.start(
            grid=metered,  # type: ignore[arg-type]
            initial_arrays=ArrayRecord(initial),
            num_rounds=scenario.rounds - done,
            timeout=scenario.simulation.timeout,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=evaluate_fn,
        )
        final = result.arrays.to_torch_state_dict() if len(result.arrays) else initial
    else:
        final = initial
    log.save_tensors("model.safetensors", final)
    recorder.summary(t_start, hashes)
