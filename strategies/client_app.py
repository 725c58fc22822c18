"""fedmerge's Flower ClientApp: local training, evaluation and peer steps on one partition.

Every handler reads the run configuration from ``context.run_config`` (parsed
once per process and configuration) and its partition from
``context.node_config``; what a strategy does differently on the client is
the strategy plugin's hook.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedmerge.tasks import get_task
from fedmerge.training import evaluate, local_epochs, train_local
from strategies import protocol
from strategies.adversary import adversary_for
from strategies.config import RunConfig, from_run_config
from strategies.federation import PEER_TRAIN_SEED_OFFSET, Federation, federation
from strategies.node_data import local_evaluation_set, node_federation
from strategies.plugins import ClientContext, PeerPlugin, ServerPlugin
from strategies.plugins.peer import alignment_batches

app = ClientApp()

#: Where a client keeps its own model between rounds (``ClientStart.keep``), + partition id.
KEPT_MODEL_KEY = "fedmerge-kept-model"
#: Where a client keeps its task's local state (BYOL's target and predictor), + partition id.
KEPT_TASK_KEY = "fedmerge-kept-task-state"


@lru_cache(maxsize=4)
def _run_config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return from_run_config(dict(items))


@lru_cache(maxsize=4)
def _scratch_model(fed: Federation) -> nn.Module:
    """One model object per process and run; weights are loaded per message."""
    return fed.initial_model().to(fed.config.device)


@dataclass(frozen=True)
class _Client:
    config: RunConfig
    fed: Federation
    partition_id: int
    x: torch.Tensor
    y: torch.Tensor
    ctx: ClientContext


def _client(context: Context, msg: Message | None = None) -> _Client:
    """The run, the partition (named by the message, else the node's own) and its data.

    Raises for an injected failure of this partition in this round.
    """
    config = _run_config(tuple(sorted(context.run_config.items())))
    node = context.node_config
    named = msg.content[protocol.CONFIG].get(protocol.PARTITION_ID) if msg is not None else None
    if named is not None:  # virtual clients: the server assigns partitions to nodes
        pid = int(named)  # type: ignore[arg-type]
    else:  # the node owns its data (deployment)
        pid = int(node[protocol.PARTITION_ID])
        num = node.get(protocol.NUM_PARTITIONS)
        if num is not None and int(num) != config.num_clients:
            raise ValueError(
                f"num-partitions: node config says {num}, run config num_clients is "
                f"{config.num_clients}; allowed: equal values"
            )
    server_round = _round(msg) if msg is not None else 0
    root = str(node[protocol.DATASET_ROOT]) if node.get(protocol.DATASET_ROOT) else None
    torch.set_num_threads(config.simulation.num_cpus_per_client)
    if (pid, server_round) in config.simulation.failures():
        raise RuntimeError(f"injected failure of partition {pid} in round {server_round}")
    data_dir = node.get(protocol.DATA_DIR)
    if data_dir:  # the node's own arrays (strategies.node_data)
        fed = node_federation(config, str(data_dir))
        x, y = fed.data.train_x, fed.data.train_y
    else:
        fed = federation(config, root)
        x, y = fed.client_data(pid)
    ctx = ClientContext(
        config=config,
        partition_id=pid,
        model=_scratch_model(fed),
        model_at_width=fed.model_at_width,
        example_input=fed.example_input,
    )
    return _Client(config, fed, pid, x, y, ctx)


def _round(msg: Message) -> int:
    return int(msg.content[protocol.CONFIG].get(protocol.SERVER_ROUND, 0))  # type: ignore[arg-type]


def _reply(msg: Message, partition_id: int, records: Mapping[str, Any]) -> Message:
    """A reply that names the partition it is about (nodes may serve several)."""
    config = ConfigRecord({protocol.PARTITION_ID: partition_id})
    return Message(RecordDict({**records, protocol.CONFIG: config}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer with this node's partition id, after loading its data (so rounds do not pay)."""
    client = _client(context)
    return _reply(msg, client.partition_id, {})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on the local partition and send it back."""
    server_round = _round(msg)
    c = _client(context, msg)
    plugin = c.config.strategy.plugin
    if not isinstance(plugin, ServerPlugin):
        raise TypeError(f"strategy.name: {c.config.strategy.name!r} is a peer strategy")
    global_state = dict(msg.content.array_records[protocol.ARRAYS].to_torch_state_dict())
    if server_round == 1 and c.config.train.independent_init:  # one-shot fusion's clients
        width = plugin.client_width(c.config.strategy.options, c.partition_id, c.config.model.width)
        own = c.fed.client_initial_model(
            c.partition_id, None if width == c.config.model.width else width
        )
        global_state = dict(own.state_dict())
    kept_key = f"{KEPT_MODEL_KEY}-{c.partition_id}"
    record = context.state.array_records.get(kept_key)
    kept = dict(record.to_torch_state_dict()) if record is not None else None
    start = plugin.client_start(c.config.strategy.options, c.ctx, global_state, kept)
    model = start.model
    model.load_state_dict(start.state)
    mu = float(msg.content[protocol.CONFIG].get(protocol.PROXIMAL_MU, 0.0))  # type: ignore[arg-type]
    adversary = adversary_for(c.config, c.partition_id)  # simulation.adversary_*
    y = c.y if adversary is None else adversary.labels(c.y, c.fed.data.num_classes)
    task_key = f"{KEPT_TASK_KEY}-{c.partition_id}"
    task_record = context.state.array_records.get(task_key)
    local = get_task(c.config.task.name).train(
        model,
        c.x,
        y,
        c.config.train,
        c.config.task,
        generator=torch.Generator().manual_seed(c.fed.client_seed(server_round, c.partition_id)),
        global_state=global_state,
        prox_mu=mu,
        epochs=local_epochs(c.config.train, server_round, peer=False),
        kept=dict(task_record.to_torch_state_dict()) if task_record is not None else None,
    )
    result = local.result
    if local.kept is not None:  # stays on this node; never part of the reply
        context.state[task_key] = ArrayRecord(local.kept)
    if start.keep:
        context.state[kept_key] = ArrayRecord(model.state_dict())
    sent, count = model.state_dict(), result.num_examples
    if adversary is not None:
        sent, count = adversary.reply(start.state, sent, count)
    metrics = MetricRecord({protocol.TRAIN_LOSS: result.loss, protocol.NUM_EXAMPLES: count})
    records = {protocol.ARRAYS: ArrayRecord(sent), protocol.METRICS: metrics}
    seed = c.fed.client_seed(server_round, c.partition_id)
    extra = plugin.reply_arrays(c.config.strategy.options, c.ctx, model, c.x, c.y, seed)
    records.update({key: ArrayRecord(arrays) for key, arrays in extra.items()})
    return _reply(msg, c.partition_id, records)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local partition."""
    c = _client(context, msg)
    model = c.ctx.model
    model.load_state_dict(msg.content.array_records[protocol.ARRAYS].to_torch_state_dict())
    own_data = bool(context.node_config.get(protocol.DATA_DIR))
    x, y = local_evaluation_set(c.fed.data) if own_data else (c.x, c.y)
    loss, acc = evaluate(model, x, y)
    metrics = MetricRecord(
        {
            protocol.EVAL_LOSS: loss,
            protocol.EVAL_ACCURACY: acc,
            protocol.NUM_EXAMPLES: len(y),
        }
    )
    return _reply(msg, c.partition_id, {protocol.METRICS: metrics})


@app.train(protocol.PEER_HANDLER)
def train_peer(msg: Message, context: Context) -> Message:
    """Decentralized step: the strategy's merge of the neighbours' models, then local training.

    The message carries this peer's own state and its neighbours' (see
    :mod:`strategies.protocol`); alignment and BatchNorm re-estimation use
    this peer's local data, or the run's shared proxy set (``align_data``).
    """
    server_round = _round(msg)
    c = _client(context, msg)
    plugin = c.config.strategy.plugin
    if not isinstance(plugin, PeerPlugin):
        raise TypeError(f"strategy.name: {c.config.strategy.name!r} is not a peer strategy")
    options = c.config.strategy.options
    config = msg.content[protocol.CONFIG]
    own = dict(msg.content.array_records[protocol.SELF].to_torch_state_dict())
    seed = c.fed.client_seed(server_round, c.partition_id)
    merged = None
    units_moved = 0.0
    if bool(config.get(protocol.MERGE, False)):
        neighbours = {
            int(key.removeprefix(protocol.NEIGHBOUR_PREFIX)): record.to_torch_state_dict()
            for key, record in msg.content.array_records.items()
            if key.startswith(protocol.NEIGHBOUR_PREFIX)
        }
        mixing = {int(k): float(v) for k, v in json.loads(str(config[protocol.MIXING])).items()}
        samples = plugin.align_samples(options)
        batches = alignment_batches(options, samples, c.x, seed, c.fed.proxy_batches)
        own, info = plugin.merge(
            options,
            c.ctx,
            own,
            neighbours,
            mixing,
            float(config[protocol.SELF_WEIGHT]),  # type: ignore[arg-type]
            batches=batches,
            rng=np.random.default_rng(seed),
        )
        units_moved = float(sum(info.moved.values()))
        merged = {k: v.clone() for k, v in own.items()}
    model = c.ctx.model
    model.load_state_dict(own)
    result = train_local(
        model,
        c.x,
        c.y,
        c.config.train,
        generator=torch.Generator().manual_seed(seed + PEER_TRAIN_SEED_OFFSET),
        epochs=local_epochs(c.config.train, server_round, peer=True),
    )
    metrics = MetricRecord(
        {
            protocol.TRAIN_LOSS: result.loss,
            protocol.NUM_EXAMPLES: result.num_examples,
            protocol.UNITS_MOVED: units_moved,
        }
    )
    records: dict[str, Any] = {
        protocol.ARRAYS: ArrayRecord(model.state_dict()),
        protocol.METRICS: metrics,
    }
    if merged is not None:  # DIMAT reports accuracy right after merging: send it to evaluate
        records[protocol.MERGED] = ArrayRecord(merged)
    return _reply(msg, c.partition_id, records)
