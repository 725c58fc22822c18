"""fedmerge's Flower ServerApp: node discovery, the strategy's rounds, the run directory."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmerge.data import DatasetBundle
from fedmerge.run_end import END_OF_RUN
from strategies import protocol, workers
from strategies.config import RUN_DIR_KEY, RunConfig, from_run_config
from strategies.deployment import (
    PromptGrid,
    RejoiningGrid,
    failed_summary,
    log_through_flower,
    query_message,
    read_status,
    send_and_receive,
)
from strategies.federation import SAMPLING_STREAM, Federation, federation
from strategies.metering import MeteredGrid
from strategies.node_data import data_spec, load_node_data, local_evaluation_set
from strategies.peer_relay import run_peers
from strategies.plugins import ServerContext, ServerPlugin
from strategies.recorder import RoundRecorder, state_hash
from strategies.rounds import RoundStrategy, run_server_rounds
from strategies.run_log import RunLog
from strategies.sampling import SeededSampling

logger = logging.getLogger(__name__)

app = ServerApp()


class NodeDiscoveryError(RuntimeError):
    """Not all expected nodes registered, or two claimed the same partition."""


def _wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node ids, sorted, once ``expected`` nodes have registered."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise NodeDiscoveryError(
                f"num_clients: expected {expected} nodes, {len(node_ids)} registered "
                f"within {timeout:.0f} s"
            )
        time.sleep(0.2)
    return node_ids


def assign_partitions(grid: Grid, num_clients: int, nodes: int, timeout: float) -> dict[int, int]:
    """Map partition id -> node id without asking any node (virtual clients, simulation).

    Partition ``p`` goes to the ``(p mod nodes)``-th node in node-id order,
    always the same one, so that what a client keeps on its node between
    rounds (``context.state``) is there when it is sampled again. Messages
    name their partition; start-up does not grow with ``num_clients``.
    """
    node_ids = _wait_for_nodes(grid, nodes, timeout)[:nodes]
    return {p: node_ids[p % nodes] for p in range(num_clients)}


def discover_nodes(grid: Grid, expected: int, timeout: float) -> dict[int, int]:
    """Wait for ``expected`` nodes and map partition id -> node id.

    Every node answers a ``query`` message with the ``partition-id`` of its
    node config (and loads its data while doing so, so that training rounds
    do not pay for it). Node ids are random per run; partition ids are not.
    """
    node_ids = _wait_for_nodes(grid, expected, timeout)
    messages = [query_message(n) for n in node_ids]
    mapping: dict[int, int] = {}
    for reply in send_and_receive(grid, messages, timeout=timeout):
        if reply.has_error():
            raise NodeDiscoveryError(
                f"node {reply.metadata.src_node_id} failed to answer: {reply.error.reason}"
            )
        pid = int(reply.content[protocol.CONFIG][protocol.PARTITION_ID])  # type: ignore[arg-type]
        if not 0 <= pid < expected:
            raise NodeDiscoveryError(
                f"partition-id: node {reply.metadata.src_node_id} says {pid}; "
                f"allowed: 0 to {expected - 1} (num_clients {expected})"
            )
        if pid in mapping:
            raise NodeDiscoveryError(f"partition-id {pid} claimed by two nodes")
        mapping[pid] = reply.metadata.src_node_id
    missing = sorted(set(range(expected)) - set(mapping))
    if missing:
        raise NodeDiscoveryError(f"partition-id: no node answered for {missing}")
    return dict(sorted(mapping.items()))


def server_federation(config: RunConfig) -> Federation:
    """The server's :class:`Federation`: the scenario's data set, unless the server needs none.

    A deployed server (nodes declare their partitions) that evaluates on
    ``evaluation.test_dir`` or on the clients (``evaluation.server``) never
    loads the scenario's data set: it builds the model from the data set's
    known input shape and number of classes
    (:data:`strategies.node_data.DATA_SPECS`). In simulation the server
    derives every partition, so it loads the data set whatever it evaluates on.
    """
    if config.evaluation.uses_dataset or config.simulation.assign_partitions:
        return federation(config)
    spec = data_spec(config.dataset.name)
    x, y = spec.empty_arrays()
    no_data = DatasetBundle(spec.kind, x, y, x, y, spec.num_classes)
    return Federation(config, data=no_data)


def server_test_set(config: RunConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The server's own test set from ``evaluation.test_dir``: its test split, else its train split.

    ``None``: the server evaluates on the scenario's data set, or not at all
    (``evaluation.server = "clients"``).
    """
    if not config.evaluation.test_dir:
        return None
    return local_evaluation_set(
        load_node_data(config.evaluation.test_dir, data_spec(config.dataset.name))
    )


def server_context(config: RunConfig, fed: Federation) -> ServerContext:
    """What a server-side strategy factory gets: model, example input, proxy data, options."""
    return ServerContext(
        config=config,
        model=fed.initial_model(),
        example_input=fed.example_input,
        proxy_batches=fed.proxy_batches,
        flower_options={
            "fraction_train": config.clients_per_round / config.num_clients,
            "min_train_nodes": config.clients_per_round,
            "min_evaluate_nodes": 0,
            "min_available_nodes": config.num_clients,
        },
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Discover nodes, run the configured strategy, log every round.

    ``summary.json`` is written whatever happens: ``completed``, ``degraded``
    or, when the run stops with an error, ``failed`` with the error (the
    exception is raised again). Its last log line then says so
    (:data:`fedmerge.run_end.END_OF_RUN`). A run directory that holds a
    finished run is refused and left as it is.
    """
    log_through_flower()
    raw = context.run_config
    name = str(raw.get("name", "run"))
    run_dir = str(raw.get(RUN_DIR_KEY, "")) or str(
        Path("runs") / f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    )
    stage = ["configuration"]
    try:
        _run(grid, context, run_dir, stage)
    except FinishedRunDirError:
        raise
    except Exception as exc:
        known = {
            "name": name,
            "seed": raw.get("seed"),
            "strategy": {"name": raw.get("strategy.name")},
        }
        RunLog(Path(run_dir)).write_json("summary.json", failed_summary(known, stage[0], exc))
        logger.error("run failed during %s: %s", stage[0], exc)
        _end_log(run_dir)
        raise
    _end_log(run_dir)


#: Seconds the ServerApp waits at most for its workers' output before its last line.
OUTPUT_FLUSH = 2.0


def _end_log(run_dir: str) -> None:
    """The run's last log line, once what its simulated clients printed is in the log."""
    workers.flush_output(OUTPUT_FLUSH)
    logger.info("%s %s", END_OF_RUN, Path(run_dir) / "summary.json")


class FinishedRunDirError(ValueError):
    """``output.run-dir`` names a directory that already holds a finished run."""


def _run(grid: Grid, context: Context, run_dir: str, stage: list[str]) -> None:
    t_start = time.perf_counter()
    config = from_run_config(context.run_config)
    status = read_status(Path(run_dir))
    if status is not None:
        raise FinishedRunDirError(
            f"{RUN_DIR_KEY}: got {run_dir!r}, which holds a finished run (status {status}); "
            f"allowed: a new directory, or leave {RUN_DIR_KEY} out (runs/NAME-TIMESTAMP)"
        )
    log = RunLog(Path(run_dir))
    log.write_json("config.json", config.to_dict())
    timeout = config.simulation.timeout
    stage[0] = "discovery"
    if config.simulation.assign_partitions:
        mapping = assign_partitions(grid, config.num_clients, config.nodes, timeout)
        grid = PromptGrid(grid)
    else:
        mapping = discover_nodes(grid, config.num_clients, timeout)
        grid = RejoiningGrid(grid, mapping, timeout)
    stage[0] = "rounds"
    nodes = len(set(mapping.values()))
    logger.info("%d nodes ready after %.1f s", nodes, time.perf_counter() - t_start)

    fed = server_federation(config)
    model = fed.initial_model().to(config.device)
    hashes = {
        "initial_hash": state_hash(model.state_dict()),
        # a server without the data set derives no partitions (the nodes hold their data)
        "partition_hash": fed.partition_digest if len(fed.data.train_y) else None,
    }
    metered = MeteredGrid(grid)
    waited = workers.wait(timeout)  # the engine's actors start beside the steps above
    if waited is not None:
        elapsed = time.perf_counter() - t_start
        logger.info("the simulation's actors up after %.1f s (%.2f s waited)", elapsed, waited)
    recorder = RoundRecorder(config, log, model, fed.data, server_test_set(config))
    plugin = config.strategy.plugin
    if isinstance(plugin, ServerPlugin):
        strategy = plugin.strategy(config.strategy.options, server_context(config, fed))
        if not isinstance(strategy, SeededSampling):
            raise TypeError(
                f"strategy.name: {config.strategy.name!r} built a {type(strategy).__name__}; "
                "allowed: a fedmerge strategy (SeededFedAvg, SeededFedProx, MergingStrategy)"
            )
        # in simulation the server derives every partition itself, so it knows their sizes
        sizes = (
            {p: len(part) for p, part in enumerate(fed.partitions)}
            if config.simulation.assign_partitions
            else None
        )
        strategy.bind_nodes(
            mapping,
            clients_per_round=config.clients_per_round,
            rng=np.random.default_rng([config.seed, SAMPLING_STREAM]),
            partition_sizes=sizes,
        )
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        final = run_server_rounds(cast(RoundStrategy, strategy), metered, config, recorder, initial)
    else:
        final = run_peers(metered, config, fed, mapping, recorder)
    log.save_tensors("model.safetensors", final)
    recorder.summary(t_start, hashes)
