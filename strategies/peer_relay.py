"""The ServerApp side of decentralized training: a relay, never an aggregator."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedmerge.federation import peer_initial_model
from fedmerge.peer import consensus_distance, mean_state
from fedmerge.scenario import Scenario, topology_config
from fedmerge.topology import build_graph, mixing_matrix
from strategies.metering import EVAL_PREFIX, MeteredGrid, arrayrecord_bytes
from strategies.recorder import RoundRecorder
from strategies.replies import screen_replies

logger = logging.getLogger(__name__)

#: Message type of a decentralized step (handled by ``@app.train("peer")``).
PEER_MESSAGE_TYPE = f"{MessageType.TRAIN}.peer"


def run_peers(
    grid: MeteredGrid,
    scenario: Scenario,
    mapping: dict[int, int],
    recorder: RoundRecorder,
    config: ConfigRecord,
) -> dict[str, torch.Tensor]:
    """Relay models between peers for ``scenario.rounds`` rounds.

    Every round, each peer gets one message with its own last state and the
    last states of its neighbours in that round's graph (only those that
    answered the previous round); it aligns, mixes and trains on its side and
    replies with its new state. A peer that fails or times out keeps its last
    state, is left out of its neighbours' next mix, and takes part again in
    the round after. ``local`` sends no neighbours at all.

    Returns
    -------
    dict of str to Tensor
        Final states, keys prefixed ``peer<i>.``.
    """
    n = scenario.num_clients
    st = scenario.strategy
    topo = topology_config(scenario)
    states = {p: peer_initial_model(scenario, p).state_dict() for p in range(n)}
    answered = set(range(n))
    first = 1
    resume = recorder.begin()
    if resume is not None:
        first = resume.round + 1
        answered = set(resume.sampler_state["answered"])
        states = {
            p: {k.split(".", 1)[1]: v for k, v in resume.state.items() if k.startswith(f"peer{p}.")}
            for p in range(n)
        }
    else:
        _record(recorder, 0, states, {})
    node_of = mapping
    partition_of = {node: p for p, node in mapping.items()}
    for server_round in range(first, scenario.rounds + 1):
        graph = build_graph(topo, n, seed=scenario.seed, round=server_round)
        weights = mixing_matrix(graph, topo.mixing)
        merge = st.name != "local" and server_round % st.merge_every == 0
        messages = []
        for p in range(n):
            nbrs = [j for j in graph.neighbors(p) if j in answered] if merge else []
            records: dict[str, Any] = {"self": ArrayRecord(states[p])}
            records.update({f"nbr-{j}": ArrayRecord(states[j]) for j in nbrs})
            cfg = ConfigRecord(dict(config))
            cfg["server-round"] = server_round
            cfg["merge"] = merge
            cfg["mixing"] = json.dumps({str(j): float(weights[p, j]) for j in nbrs})
            cfg["self-weight"] = float(weights[p, p]) if merge else 1.0
            records["config"] = cfg
            messages.append(
                Message(RecordDict(records), dst_node_id=node_of[p], message_type=PEER_MESSAGE_TYPE)
            )
        down = {p: arrayrecord_bytes(m.content) for p, m in enumerate(messages)}
        replies = list(grid.send_and_receive(messages, timeout=scenario.simulation.timeout))
        screening = screen_replies(replies, states[0], partition_of)
        up = {p: 0 for p in range(n)}
        moved = {}
        merged_acc = {}
        for update in screening.updates:
            if f"{EVAL_PREFIX}merged" in update.message.content:
                record = update.message.content.array_records[f"{EVAL_PREFIX}merged"]
                merged = dict(record.to_torch_state_dict())
                merged_acc[update.partition] = recorder.evaluate(merged)[1]
            states[update.partition] = update.state
            up[update.partition] = arrayrecord_bytes(update.message.content)
            metrics = update.message.content["metrics"]
            moved[update.partition] = float(metrics.get("units-moved", 0.0))  # type: ignore[arg-type]
        answered = {u.partition for u in screening.updates}
        extra = {
            "answered": sorted(answered),
            "skipped": len(screening.skipped),
            "skipped_reasons": screening.skipped,
            "bytes_down_per_peer": [down[p] for p in range(n)],
            "bytes_up_per_peer": [up[p] for p in range(n)],
            "units_moved_per_peer": [moved.get(p, 0.0) for p in range(n)],
            # DIMAT's measurement point: each peer right after merging, before training
            "merged_peer_accuracy": [merged_acc.get(p) for p in range(n)],
            "merged_accuracy": float(np.mean(list(merged_acc.values()))) if merged_acc else None,
            "merged_accuracy_min": min(merged_acc.values()) if merged_acc else None,
            "edges": sorted([int(i), int(j)] for i, j in graph.edges()),
        }
        _record(recorder, server_round, states, extra)
        flat = {f"peer{p}.{k}": v for p, s in states.items() for k, v in s.items()}
        recorder.checkpoint(server_round, flat, {"answered": sorted(answered)})
    return {f"peer{p}.{k}": v for p, s in states.items() for k, v in s.items()}


def _record(
    recorder: RoundRecorder,
    server_round: int,
    states: dict[int, dict[str, torch.Tensor]],
    extra: dict[str, Any],
) -> None:
    results = [recorder.evaluate(states[p]) for p in sorted(states)]
    accs = np.array([a for _, a in results])
    losses = np.array([loss for loss, _ in results])
    ordered = [states[p] for p in sorted(states)]
    avg_loss, avg_acc = recorder.evaluate(mean_state(ordered))
    recorder.record_row(
        server_round,
        {
            "accuracy": float(accs.mean()),
            "loss": float(losses.mean()),
            "accuracy_min": float(accs.min()),
            "accuracy_max": float(accs.max()),
            "accuracy_std": float(accs.std()),
            "peer_accuracy": [float(a) for a in accs],
            "avg_model_accuracy": avg_acc,
            "avg_model_loss": avg_loss,
            "consensus_distance": consensus_distance(ordered),
            **extra,
        },
    )
