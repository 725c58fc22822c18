"""Screening of replies inside the strategies, with real Flower messages."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from strategies.merging import MergingStrategy
from strategies.plugins.ldawa import LDAWAMerge, LDAWAOptions
from strategies.sampling import SeededFedAvg


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(3, 4, generator=g), "fc.bias": torch.randn(3, generator=g)}


def _reply(node: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    instruction = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    if error is not None:
        return Message(Error(code=1, reason=error), reply_to=instruction)
    return Message(content, reply_to=instruction)


def _good(node: int, state: dict[str, torch.Tensor], n: int) -> Message:
    return _reply(
        node,
        RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}),
    )


def _bound(strategy, nodes):
    strategy.bind_nodes(
        {p: n for p, n in enumerate(nodes)}, clients_per_round=len(nodes),
        rng=np.random.default_rng(0),
    )  # fmt: skip
    return strategy


def _bad_replies() -> list[Message]:
    nan = _state(5)
    nan["fc.bias"][1] = float("nan")
    wide = {"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3)}
    renamed = {"head.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}
    return [
        _good(12, nan, 10),
        _good(13, wide, 10),
        _good(14, renamed, 10),
        _reply(15, RecordDict({"arrays": ArrayRecord(_state(6))})),  # no num-examples
        _reply(16, RecordDict({"metrics": MetricRecord({"num-examples": 3})})),  # no arrays
        _reply(17, error="client crashed"),
    ]


def test_fedavg_skips_bad_replies_and_averages_the_rest():
    strategy = _bound(SeededFedAvg(min_available_nodes=1), [10, 11, 12, 13, 14, 15, 16, 17])
    a, b = _state(1), _state(2)
    replies = [_good(11, b, 30), *_bad_replies(), _good(10, a, 10)]
    outcome = strategy.aggregate_round(1, _state(100), replies)
    got = outcome.state
    for key in a:  # naive weighted mean of the two good replies
        torch.testing.assert_close(got[key], (10 * a[key] + 30 * b[key]) / 40)
    assert len(outcome.skipped) == 6
    reasons = " | ".join(outcome.skipped)
    for needle in ("non-finite", "shape (3, 5)", "parameter names differ", "num-examples",
                   "no ArrayRecord", "client crashed"):  # fmt: skip
        assert needle in reasons
    # the outcome belongs to its round: the next round reports only its own replies
    again = strategy.aggregate_round(2, _state(100), [_good(10, a, 10), _good(11, b, 30)])
    assert again.skipped == []


def test_all_replies_bad_keeps_the_global_model():
    strategy = _bound(SeededFedAvg(min_available_nodes=1), [12, 13, 14, 15, 16, 17])
    outcome = strategy.aggregate_round(1, _state(100), _bad_replies())
    assert outcome.state is None and outcome.train_metrics is None
    assert len(outcome.skipped) == 6


def test_merging_strategy_with_all_replies_bad_keeps_the_global_model():
    strategy = _bound(
        MergingStrategy(merge=LDAWAMerge(LDAWAOptions()), min_available_nodes=1),
        [12, 13, 14, 15, 16, 17],
    )
    outcome = strategy.aggregate_round(1, _state(100), _bad_replies())
    assert outcome.state is None and outcome.train_metrics is None
    assert len(outcome.skipped) == 6


def test_ldawa_strategy_warmup_is_fedavg_then_cosine_weighted():
    strategy = _bound(
        MergingStrategy(merge=LDAWAMerge(LDAWAOptions(warmup_rounds=1)), min_available_nodes=1),
        [10, 11, 12],
    )
    g = _state(100)
    a, b = _state(1), _state(2)
    outcome = strategy.aggregate_round(
        1, g, [_good(10, a, 10), _good(11, b, 30), *_bad_replies()[:1]]
    )
    warm = outcome.state
    for key in a:
        torch.testing.assert_close(warm[key], (10 * a[key] + 30 * b[key]) / 40)
    assert len(outcome.skipped) == 1 and "non-finite" in outcome.skipped[0]
    # round 2: L-DAWA against the new global model (the warm-up result)
    got = strategy.aggregate_round(2, warm, [_good(10, a, 10), _good(11, b, 30)]).state
    for key in a:
        ref = warm[key].double().ravel()

        def cos(t, ref=ref):
            t = t.double().ravel()
            return min(1.0, float(t @ ref / t.norm() / ref.norm()))

        want = (cos(a[key]) * a[key] + cos(b[key]) * b[key]) / 2
        torch.testing.assert_close(got[key], want.float(), rtol=1e-5, atol=1e-6)


def test_flowers_aggregate_train_uses_the_arrays_configure_train_sent():
    strategy = _bound(SeededFedAvg(min_available_nodes=1), [10, 11])
    a, b = _state(1), _state(2)
    strategy.configure_train(1, ArrayRecord(_state(100)), ConfigRecord({}), grid=None)
    wide = {"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3)}
    arrays, _ = strategy.aggregate_train(
        1, [_good(10, a, 10), _good(11, b, 30), _good(12, wide, 5)]
    )
    got = arrays.to_torch_state_dict()
    for key in a:  # the wide reply is screened against the sent model's shapes
        torch.testing.assert_close(got[key], (10 * a[key] + 30 * b[key]) / 40)
