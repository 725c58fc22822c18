"""fedmerge's Flower ServerApp: node discovery, strategy, centralized evaluation, run log."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
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

from fedmerge.federation import dataset_for, initial_model
from fedmerge.scenario import Scenario, scenario_from_dict, unflatten
from fedmerge.training import evaluate
from strategies.metering import MeteredGrid
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


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(a),
    }


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
    torch.set_num_threads(max(1, torch.get_num_threads()))

    config = ConfigRecord({"scenario": json.dumps(scenario.to_dict(), sort_keys=True)})
    mapping = discover_nodes(
        grid, scenario.num_clients, scenario.simulation.timeout, ConfigRecord(dict(config))
    )
    t_ready = time.perf_counter()
    logger.info("%d nodes ready after %.1f s", len(mapping), t_ready - t_start)

    strategy = build_strategy(scenario)
    strategy.bind_nodes(  # type: ignore[attr-defined]
        mapping,
        clients_per_round=scenario.clients_per_round,
        rng=np.random.default_rng([scenario.seed, 1]),
    )
    metered = MeteredGrid(grid)
    model = initial_model(scenario).to(scenario.device)
    data = dataset_for(scenario)
    rows: list[dict[str, Any]] = []
    last = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, data.test_x, data.test_y)
        now = time.perf_counter()
        traffic = metered.take()
        row = {
            "round": server_round,
            "accuracy": acc,
            "loss": loss,
            "train_loss": _stats(traffic.train_losses),
            "clients": traffic.replies,
            "failures": traffic.errors,
            "bytes_down": traffic.bytes_down,
            "bytes_up": traffic.bytes_up,
            "round_time": now - last[0],
            "elapsed": now - t_ready,
        }
        last[0] = now
        rows.append(row)
        log.append_metrics(row)
        logger.info(
            "round %d: accuracy %.4f loss %.4f (%.2f s)", server_round, acc, loss, row["round_time"]
        )
        return MetricRecord({"accuracy": acc, "loss": loss})

    result = strategy.start(
        grid=metered,  # type: ignore[arg-type]
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=scenario.rounds,
        timeout=scenario.simulation.timeout,
        train_config=config,
        evaluate_config=ConfigRecord(dict(config)),
        evaluate_fn=evaluate_fn,
    )
    t_end = time.perf_counter()
    final = rows[-1]
    log.save_model(result.arrays.to_torch_state_dict())
    log.write_json(
        "summary.json",
        {
            "status": "completed",
            "scenario": scenario.name,
            "digest": scenario.digest(),
            "strategy": scenario.strategy.name,
            "rounds": scenario.rounds,
            "initial_accuracy": rows[0]["accuracy"],
            "final_accuracy": final["accuracy"],
            "final_loss": final["loss"],
            "best_accuracy": max(r["accuracy"] for r in rows),
            "bytes_down": sum(r["bytes_down"] for r in rows),
            "bytes_up": sum(r["bytes_up"] for r in rows),
            "bytes_total": sum(r["bytes_down"] + r["bytes_up"] for r in rows),
            "failures": sum(r["failures"] for r in rows),
            "startup_time": t_ready - t_start,
            "train_time": t_end - t_ready,
            "serverapp_time": t_end - t_start,
        },
    )
