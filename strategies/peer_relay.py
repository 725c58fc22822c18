"""The ServerApp side of decentralized training: a relay, never an aggregator."""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedmerge.align import PermutationSpec, permutation_spec_for
from fedmerge.errors import UntraceableModelError
from fedmerge.merge import align_to_anchor, consensus_distance, mean_state
from fedmerge.topology import build_graph, mixing_matrix
from strategies import protocol
from strategies.config import RunConfig
from strategies.federation import Federation
from strategies.metering import MeteredGrid, arrayrecord_bytes
from strategies.plugins import PeerPlugin
from strategies.recorder import RoundRecorder
from strategies.replies import screen_replies, stop_on_dead_worker
from strategies.sampling import metric_statistics, unique_partitions

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def run_peers(
    grid: MeteredGrid,
    config: RunConfig,
    fed: Federation,
    mapping: dict[int, int],
    recorder: RoundRecorder,
) -> dict[str, torch.Tensor]:
    """Relay models between peers for ``config.rounds`` rounds.

    Every round, each peer gets one message with its own last state and the
    last states of its neighbours in that round's graph (only those that
    answered the previous round, and none in a round without merging); it
    aligns, mixes and trains on its side (the strategy plugin's operator) and
    replies with its new state. A peer that fails or times out keeps its last
    state, is left out of its neighbours' next mix, and takes part again in
    the round after.

    Returns
    -------
    dict of str to Tensor
        Final states, keys prefixed ``peer<i>.``.
    """
    n = config.num_clients
    plugin = config.strategy.plugin
    if not isinstance(plugin, PeerPlugin):
        raise TypeError(f"strategy.name: {config.strategy.name!r} is not a peer strategy")
    options, topo = config.strategy.options, config.topology
    states = {p: fed.peer_initial_model(p).state_dict() for p in range(n)}
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
    else:  # round 0: the initial models, after local pre-training when asked
        pretrained = config.train.pretrain_epochs > 0
        if pretrained:
            _pretrain(grid, config, states, mapping)
        extra0 = {"pretrained": True} if pretrained else {}
        _record(recorder, grid, 0, states, {**extra0, **_aligned(recorder, fed, states, 0)})
    partition_of = unique_partitions(mapping)
    for server_round in range(first, config.rounds + 1):
        graph = build_graph(topo, n, seed=config.seed, round=server_round)
        weights = mixing_matrix(graph, topo.mixing)
        merge = plugin.merges(options, server_round)
        messages = []
        for p in range(n):
            nbrs = [j for j in graph.neighbors(p) if j in answered] if merge else []
            records: dict[str, Any] = {protocol.SELF: ArrayRecord(states[p])}
            records.update({protocol.neighbour_key(j): ArrayRecord(states[j]) for j in nbrs})
            records[protocol.CONFIG] = ConfigRecord(
                {
                    protocol.SERVER_ROUND: server_round,
                    protocol.PARTITION_ID: p,
                    protocol.MERGE: merge,
                    protocol.MIXING: json.dumps({str(j): float(weights[p, j]) for j in nbrs}),
                    protocol.SELF_WEIGHT: float(weights[p, p]) if merge else 1.0,
                }
            )
            messages.append(
                Message(
                    RecordDict(records),
                    dst_node_id=mapping[p],
                    message_type=protocol.PEER_MESSAGE_TYPE,
                )
            )
        down = [arrayrecord_bytes(m.content) for m in messages]
        replies = grid.send_and_receive(messages, timeout=config.simulation.timeout)
        screening = screen_replies(replies, states[0], partition_of)
        up, moved, merged_acc = [0] * n, [0.0] * n, {}
        for update in screening.updates:
            content = update.message.content
            if protocol.MERGED in content:
                merged = dict(content.array_records[protocol.MERGED].to_torch_state_dict())
                merged_acc[update.partition] = recorder.evaluate(merged)[1]
            states[update.partition] = update.state
            up[update.partition] = arrayrecord_bytes(content)
            units = content[protocol.METRICS].get(protocol.UNITS_MOVED, 0.0)
            moved[update.partition] = float(units)  # type: ignore[arg-type]
        answered = {u.partition for u in screening.updates}
        train_metrics = metric_statistics(
            [u.message.content for u in screening.updates], protocol.TRAIN_LOSS
        )
        accs = list(merged_acc.values())
        extra = {
            "answered": sorted(answered),
            "skipped": len(screening.skipped),
            "skipped_reasons": screening.skipped,
            "refused": screening.refused,
            "bytes_down_per_peer": down,
            "bytes_up_per_peer": up,
            "units_moved_per_peer": moved,
            # DIMAT's measurement point: each peer right after merging, before training
            "merged_peer_accuracy": [merged_acc.get(p) for p in range(n)],
            "merged_accuracy": float(np.mean(accs)) if accs else None,
            "merged_accuracy_min": min(accs) if accs else None,
            "edges": sorted([int(i), int(j)] for i, j in graph.edges()),
        }
        extra.update(_aligned(recorder, fed, states, server_round))
        _record(recorder, grid, server_round, states, extra, train_metrics)
        recorder.checkpoint(server_round, _flat(states), {"answered": sorted(answered)})
        stop_on_dead_worker(server_round, screening.skipped)
    return _flat(states)


def _pretrain(
    grid: MeteredGrid, config: RunConfig, states: dict[int, StateDict], mapping: dict[int, int]
) -> None:
    """Round 0: every peer trains ``train.pretrain_epochs`` epochs alone (updates ``states``).

    A peer that fails keeps its initial model.
    """
    messages = [
        Message(
            RecordDict(
                {
                    protocol.SELF: ArrayRecord(states[p]),
                    protocol.CONFIG: ConfigRecord(
                        {
                            protocol.SERVER_ROUND: 0,
                            protocol.PARTITION_ID: p,
                            protocol.MERGE: False,
                            protocol.MIXING: "{}",
                            protocol.SELF_WEIGHT: 1.0,
                        }
                    ),
                }
            ),
            dst_node_id=mapping[p],
            message_type=protocol.PEER_MESSAGE_TYPE,
        )
        for p in range(config.num_clients)
    ]
    replies = grid.send_and_receive(messages, timeout=config.simulation.timeout)
    screening = screen_replies(replies, states[0], unique_partitions(mapping))
    for update in screening.updates:
        states[update.partition] = update.state
    if screening.skipped:
        logger.warning("pre-training: %d peers kept their initial models", len(screening.skipped))


@lru_cache(maxsize=4)
def _spec(fed: Federation) -> PermutationSpec | None:
    """The model's permutation spec, or None for a model that cannot be permuted."""
    try:
        return permutation_spec_for(fed.initial_model(), fed.example_input)
    except (UntraceableModelError, ValueError):
        return None


def _aligned(
    recorder: RoundRecorder, fed: Federation, states: dict[int, StateDict], server_round: int
) -> dict[str, Any]:
    """Order-invariant peer measures: every peer weight-matched onto peer 0's units first.

    ``consensus_distance`` and the average model depend on the order of each
    peer's hidden units; peers that compute the same function in another
    order look far apart. These align them to a common reference (peer 0)
    by weight matching before measuring; empty for a model without a spec.
    """
    spec = _spec(fed)
    if spec is None:
        return {}
    ordered = [states[p] for p in sorted(states)]
    rng = np.random.default_rng([fed.config.seed, server_round])
    aligned = align_to_anchor(spec, ordered, rng=rng)
    loss, acc = recorder.evaluate(mean_state(aligned))
    return {
        "aligned_consensus_distance": consensus_distance(aligned),
        "aligned_avg_model_accuracy": acc,
        "aligned_avg_model_loss": loss,
    }


def _flat(states: dict[int, StateDict]) -> StateDict:
    return {f"peer{p}.{k}": v for p, s in states.items() for k, v in s.items()}


def _record(
    recorder: RoundRecorder,
    grid: MeteredGrid,
    server_round: int,
    states: dict[int, StateDict],
    extra: dict[str, Any],
    train_metrics: Any = None,
) -> None:
    results = [recorder.evaluate(states[p]) for p in sorted(states)]
    accs = np.array([a for _, a in results])
    losses = np.array([loss for loss, _ in results])
    ordered = [states[p] for p in sorted(states)]
    avg_loss, avg_acc = recorder.evaluate(mean_state(ordered))
    recorder.record(
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
        traffic=grid.take(),
        train_metrics=train_metrics,
    )
