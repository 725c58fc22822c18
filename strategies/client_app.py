"""fedmerge's Flower ClientApp: local training and evaluation on one partition."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedmerge.align import PermutationSpec, ot_fuse, permutation_spec_for
from fedmerge.federation import (
    client_data,
    client_model,
    client_seed,
    client_width,
    initial_model,
)
from fedmerge.peer import peer_merge
from fedmerge.scenario import Scenario, scenario_from_dict
from fedmerge.training import TrainConfig, evaluate, train_local
from strategies.metering import EVAL_PREFIX

app = ClientApp()


@lru_cache(maxsize=4)
def _scenario(blob: str) -> Scenario:
    return scenario_from_dict(json.loads(blob))


@lru_cache(maxsize=4)
def _model(scenario: Scenario) -> nn.Module:
    """One model object per process and scenario; weights are loaded per message."""
    return initial_model(scenario).to(scenario.device)


def _partition(context: Context) -> tuple[int, str | None]:
    cfg = context.node_config
    root = cfg.get("dataset-root")
    return int(cfg["partition-id"]), (str(root) if root else None)  # type: ignore[arg-type]


def _setup(msg: Message, context: Context) -> tuple[Scenario, int, torch.Tensor, torch.Tensor]:
    scenario = _scenario(str(msg.content["config"]["scenario"]))
    pid, root = _partition(context)
    num = context.node_config.get("num-partitions")
    if num is not None and int(num) != scenario.num_clients:  # type: ignore[arg-type]
        raise ValueError(
            f"num-partitions: node config says {num}, scenario num_clients is "
            f"{scenario.num_clients}; allowed: equal values"
        )
    torch.set_num_threads(scenario.simulation.num_cpus_per_client)
    server_round = int(msg.content["config"].get("server-round", 0))  # type: ignore[arg-type]
    if (pid, server_round) in scenario.simulation.failures():
        raise RuntimeError(f"injected failure of partition {pid} in round {server_round}")
    x, y = client_data(scenario, pid, root)
    return scenario, pid, x, y


def _train_config(scenario: Scenario, *, prox_mu: float = 0.0) -> TrainConfig:
    t = scenario.train
    return TrainConfig(
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        prox_mu=prox_mu,
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer with this node's partition id; load the local data if a scenario came."""
    if "scenario" in msg.content["config"]:
        _setup(msg, context)
    pid, _ = _partition(context)
    return Message(RecordDict({"config": ConfigRecord({"partition-id": pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on the local partition and send it back."""
    scenario, pid, x, y = _setup(msg, context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    model = _model(scenario)
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    width = client_width(scenario, pid)
    if width == scenario.model.width:
        model.load_state_dict(global_state)
    else:  # a client of another width: move the global model onto its own units
        model = _width_model(scenario, width)
        model.load_state_dict(_fuse_into_own_width(scenario, model, context, global_state))
    result = train_local(
        model,
        x,
        y,
        _train_config(scenario, prox_mu=float(config.get("proximal-mu", 0.0))),  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(client_seed(scenario, server_round, pid)),
        global_state=global_state,
    )
    if width != scenario.model.width:
        context.state[OWN_MODEL_KEY] = ArrayRecord(model.state_dict())
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"train_loss": result.loss, "num-examples": result.num_examples}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


#: Where a client of another width keeps its own model between rounds.
OWN_MODEL_KEY = "fedmerge-own-model"


@lru_cache(maxsize=4)
def _width_model(scenario: Scenario, width: int) -> nn.Module:
    return client_model(scenario, width).to(scenario.device)


def _fuse_into_own_width(
    scenario: Scenario, model: nn.Module, context: Context, global_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """OTFusion onto this client's width: the global model moved onto its own units.

    The client's previous model (kept in ``context.state``; its seeded
    initialisation in the first round) gives the target units; the transport
    plan from the global model's units is found with the weight cost, then
    the client starts the round from the transported global model alone
    (``weight_a = 0``), as the server does in the other direction.
    """
    record = context.state.array_records.get(OWN_MODEL_KEY)
    own = dict(record.to_torch_state_dict()) if record is not None else model.state_dict()
    spec = permutation_spec_for(model)
    st = scenario.strategy
    return ot_fuse(
        spec, own, global_state, weight_a=0.0, solver=st.ot_solver, reg=st.ot_reg, cost="weight"
    )


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local partition."""
    scenario, _, x, y = _setup(msg, context)
    model = _model(scenario)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    loss, acc = evaluate(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_accuracy": acc, "num-examples": len(y)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train("peer")
def train_peer(msg: Message, context: Context) -> Message:
    """Decentralized step: align neighbours to the own model, mix, reset BN, train.

    The message carries this peer's own state (``self``), every neighbour's
    state (``nbr-<id>``), and in its ConfigRecord the mixing weights
    (``mixing``: JSON id -> weight, ``self-weight``) and whether this round
    merges (``merge``). Alignment uses only this peer's local data.
    """
    scenario, pid, x, y = _setup(msg, context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    model = _model(scenario)
    own = dict(msg.content.array_records["self"].to_torch_state_dict())
    info: dict[str, float] = {"moved": 0.0, "neighbours": 0.0}
    if bool(config.get("merge", False)):
        neighbours = {
            int(key.removeprefix("nbr-")): record.to_torch_state_dict()
            for key, record in msg.content.array_records.items()
            if key.startswith("nbr-")
        }
        mixing = {int(k): float(v) for k, v in json.loads(str(config["mixing"])).items()}
        gen = torch.Generator().manual_seed(client_seed(scenario, server_round, pid))
        sample = torch.randperm(len(y), generator=gen)[: scenario.strategy.align_samples]
        batches = list(torch.split(x[sample], 128))
        align = {"dimat": "activation", "dimat-wm": "weight"}.get(scenario.strategy.name, "none")
        own, merge_info = peer_merge(
            model,
            own,
            neighbours,
            mixing,
            float(config["self-weight"]),  # type: ignore[arg-type]
            align=align,
            spec=_spec(scenario) if align != "none" else None,
            batches=batches,
            reset_bn=scenario.strategy.reset_bn,
            method=scenario.strategy.align_similarity,
            rng=np.random.default_rng(client_seed(scenario, server_round, pid)),
        )
        info = {"moved": float(sum(merge_info.moved.values())), "neighbours": len(neighbours)}
    merged = {k: v.clone() for k, v in own.items()} if bool(config.get("merge", False)) else None
    model.load_state_dict(own)
    result = train_local(
        model,
        x,
        y,
        _train_config(scenario),
        generator=torch.Generator().manual_seed(client_seed(scenario, server_round, pid) + 1),
    )
    metrics = MetricRecord(
        {
            "train_loss": result.loss,
            "num-examples": result.num_examples,
            "units-moved": info["moved"],
            "neighbours": info["neighbours"],
        }
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    if merged is not None:  # DIMAT reports accuracy right after merging: send it to evaluate
        content[f"{EVAL_PREFIX}merged"] = ArrayRecord(merged)
    return Message(content, reply_to=msg)


@lru_cache(maxsize=4)
def _spec(scenario: Scenario) -> PermutationSpec:
    return permutation_spec_for(_model(scenario))
