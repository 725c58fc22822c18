"""Aligned FedAvg and OT fusion on planted permutations, with real Flower messages."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmerge.align import apply_permutation, permutation_spec_for, random_permutation
from fedmerge.models import build_model
from strategies.aligned import AlignedFedAvg, OTFusion


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


def _bind(strategy, global_state, nodes=(10, 11)):
    strategy.bind_nodes({p: n for p, n in enumerate(nodes)}, clients_per_round=len(nodes),
                        rng=np.random.default_rng(0))  # fmt: skip
    strategy.global_state = global_state
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


def test_aligned_fedavg_undoes_a_planted_permutation():
    model = _mlp()
    g, noisy, permuted = _planted(model)
    strategy = _bind(AlignedFedAvg(model=model, method="weight", min_available_nodes=1), g)
    arrays, _ = strategy.aggregate_train(1, [_reply(10, noisy[0], 10), _reply(11, permuted, 30)])
    got = arrays.to_torch_state_dict()
    for key in g:  # naive: the weighted mean of the unpermuted clients
        torch.testing.assert_close(got[key], (10 * noisy[0][key] + 30 * noisy[1][key]) / 40)
    moved = strategy.take_round_report()["units_permuted"]
    assert sum(moved.values()) > 40  # 48 hidden units, almost all moved by the random draw


def test_ot_fusion_with_exact_emd_equals_aligned_average_for_equal_widths():
    model = _mlp()
    g, noisy, permuted = _planted(model)
    strategy = _bind(OTFusion(model=model, solver="emd", min_available_nodes=1), g)
    arrays, _ = strategy.aggregate_train(1, [_reply(10, noisy[0], 1), _reply(11, permuted, 1)])
    got = arrays.to_torch_state_dict()
    for key in g:
        torch.testing.assert_close(got[key], (noisy[0][key] + noisy[1][key]) / 2,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_ot_fusion_accepts_a_narrower_client_and_keeps_the_server_width():
    server = _mlp((32, 16), seed=0)
    narrow = _mlp((16, 8), seed=1).state_dict()
    g = {k: v.clone() for k, v in server.state_dict().items()}
    strategy = _bind(OTFusion(model=server, solver="sinkhorn", reg=0.05, min_available_nodes=1), g)
    arrays, _ = strategy.aggregate_train(1, [_reply(10, g, 1), _reply(11, narrow, 1)])
    got = arrays.to_torch_state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in g.items()}
    assert all(torch.isfinite(v).all() for v in got.values())
    assert strategy.take_round_report()["skipped"] == 0
    # not simply the server's own model: the narrow client moved it
    assert any(not torch.allclose(got[k], g[k]) for k in g)
