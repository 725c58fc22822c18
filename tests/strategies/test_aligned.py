"""Aligned FedAvg and OT fusion on planted permutations, with real Flower messages."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmerge.align import apply_permutation, permutation_spec_for, random_permutation
from fedmerge.models import build_model
from strategies.config import RunConfig, StrategyConfig
from strategies.merging import MergingStrategy
from strategies.plugins import get_plugin
from strategies.plugins.aligned import AlignedMerge, AlignedOptions, ServerModel
from strategies.plugins.base import ServerContext
from strategies.plugins.ot import OTMerge, OTOptions


def _reply(node: int, state: dict[str, torch.Tensor], n: int) -> Message:
    instruction = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content, reply_to=instruction)


def _mlp(hidden=(32, 16), seed=0):
    return build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=hidden, seed=seed)


def _server(model) -> ServerModel:
    return ServerModel(model, permutation_spec_for(model), proxy=[], reset_bn=True)


def _bind(strategy, nodes=(10, 11)):
    strategy.bind_nodes({p: n for p, n in enumerate(nodes)}, clients_per_round=len(nodes),
                        rng=np.random.default_rng(0))  # fmt: skip
    return strategy


def _planted(model):
    """Client 0 = global + noise; client 1 = a random permutation of (global + noise')."""
    g = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    noisy = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in g.items()}
             for _ in range(2)]  # fmt: skip
    spec = permutation_spec_for(model)
    perm = random_permutation(spec, g, generator=torch.Generator().manual_seed(2))
    return g, noisy, apply_permutation(spec, perm, noisy[1])


def _check_planted_permutation_undone(strategy, g, noisy, permuted):
    outcome = strategy.aggregate_round(1, g, [_reply(10, noisy[0], 10), _reply(11, permuted, 30)])
    got = outcome.state
    assert outcome.skipped == []
    for key in g:  # naive: the weighted mean of the unpermuted clients
        torch.testing.assert_close(got[key], (10 * noisy[0][key] + 30 * noisy[1][key]) / 40)
    moved = outcome.extras["units_permuted"]
    assert sum(moved.values()) > 40  # 48 hidden units, almost all moved by the random draw


def test_aligned_fedavg_undoes_a_planted_permutation():
    model = _mlp()
    g, noisy, permuted = _planted(model)
    merge = AlignedMerge(_server(model), method="weight", seed=0)
    strategy = _bind(MergingStrategy(merge=merge, min_available_nodes=1))
    _check_planted_permutation_undone(strategy, g, noisy, permuted)


def test_aligned_plugin_builds_a_strategy_that_undoes_a_planted_permutation():
    model = _mlp()
    g, noisy, permuted = _planted(model)
    config = RunConfig(strategy=StrategyConfig("aligned", AlignedOptions(method="weight")))
    ctx = ServerContext(
        config=config,
        model=model,
        example_input=torch.zeros(2, 1, 8, 8),
        proxy_batches=lambda k: [],
        flower_options={"min_available_nodes": 1},
    )
    strategy = get_plugin("aligned").strategy(config.strategy.options, ctx)
    assert isinstance(strategy, MergingStrategy)
    _check_planted_permutation_undone(_bind(strategy), g, noisy, permuted)


def test_ot_fusion_with_exact_emd_equals_aligned_average_for_equal_widths():
    model = _mlp()
    g, noisy, permuted = _planted(model)
    merge = OTMerge(_server(model), OTOptions(solver="emd"))
    strategy = _bind(MergingStrategy(merge=merge, min_available_nodes=1))
    outcome = strategy.aggregate_round(1, g, [_reply(10, noisy[0], 1), _reply(11, permuted, 1)])
    got = outcome.state
    for key in g:
        torch.testing.assert_close(got[key], (noisy[0][key] + noisy[1][key]) / 2,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert np.isfinite(outcome.extras["transport_cost_mean"])


def test_ot_fusion_accepts_a_narrower_client_and_keeps_the_server_width():
    server = _mlp((32, 16), seed=0)
    narrow = _mlp((16, 8), seed=1).state_dict()
    g = {k: v.clone() for k, v in server.state_dict().items()}
    merge = OTMerge(_server(server), OTOptions(solver="sinkhorn", reg=0.05, client_widths=(1, 2)))
    strategy = _bind(MergingStrategy(merge=merge, accepts_other_widths=True, min_available_nodes=1))
    outcome = strategy.aggregate_round(1, g, [_reply(10, g, 1), _reply(11, narrow, 1)])
    got = outcome.state
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in g.items()}
    assert all(torch.isfinite(v).all() for v in got.values())
    assert outcome.skipped == []
    # not simply the server's own model: the narrow client moved it
    assert any(not torch.allclose(got[k], g[k]) for k in g)


def test_a_narrower_client_is_skipped_unless_other_widths_are_accepted():
    server = _mlp((32, 16), seed=0)
    narrow = _mlp((16, 8), seed=1).state_dict()
    g = {k: v.clone() for k, v in server.state_dict().items()}
    merge = OTMerge(_server(server), OTOptions(solver="emd"))
    strategy = _bind(MergingStrategy(merge=merge, min_available_nodes=1))
    outcome = strategy.aggregate_round(1, g, [_reply(10, g, 1), _reply(11, narrow, 1)])
    assert len(outcome.skipped) == 1 and "shape" in outcome.skipped[0]
    for key in g:  # only the server's own model is left to merge with itself
        torch.testing.assert_close(outcome.state[key], g[key], rtol=1e-5, atol=1e-5)
