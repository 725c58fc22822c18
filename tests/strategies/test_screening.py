"""Screening of bad replies, one class at a time, with real Flower messages and no runtime."""

from __future__ import annotations

import numpy as np
import pytest
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


def _instruction(node: int, kind: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=kind)


def _train_reply(node: int, state: dict[str, torch.Tensor], n: object, loss: float = 0.5):
    metrics = MetricRecord({"num-examples": n, "train_loss": loss})  # type: ignore[dict-item]
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
    return Message(content, reply_to=_instruction(node))


def _eval_reply(node: int, n: object, acc: float, loss: float = 1.0) -> Message:
    metrics = MetricRecord(
        {"num-examples": n, "eval_accuracy": acc, "eval_loss": loss}  # type: ignore[dict-item]
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=_instruction(node, "evaluate"))


def _fedavg(nodes, sizes=None, **kwargs):
    strategy = SeededFedAvg(min_available_nodes=1, **kwargs)
    strategy.bind_nodes(
        {p: n for p, n in enumerate(nodes)}, clients_per_round=len(nodes),
        rng=np.random.default_rng(0), partition_sizes=sizes,
    )  # fmt: skip
    return strategy


A, B, G = _state(1), _state(2), _state(100)


def _mean_of_a_and_b(got: dict[str, torch.Tensor]) -> None:
    for key in A:  # naive weighted mean of the two good replies (counts 10 and 30)
        torch.testing.assert_close(got[key], (10 * A[key] + 30 * B[key]) / 40)


@pytest.mark.parametrize(
    ("bad_count", "needle"),
    [
        (float("nan"), "num-examples nan is not a finite number >= 1"),
        (float("inf"), "num-examples inf is not a finite number >= 1"),
        (0, "num-examples 0 is not a finite number >= 1"),
        (-5, "num-examples -5 is not a finite number >= 1"),
        (0.5, "num-examples 0.5 is not a finite number >= 1"),
        (1e9, "num-examples 1000000000.0 exceeds the partition size 50"),
    ],
    ids=["nan", "inf", "zero", "negative", "fraction", "huge"],
)
def test_bad_sample_count_is_refused_and_the_round_goes_on(bad_count, needle) -> None:
    strategy = _fedavg([10, 11, 12], sizes={0: 10, 1: 30, 2: 50})
    replies = [
        _train_reply(10, A, 10),
        _train_reply(11, B, 30),
        _train_reply(12, _state(3), bad_count),
    ]
    outcome = strategy.aggregate_round(1, G, replies)
    _mean_of_a_and_b(outcome.state)
    assert outcome.skipped == [f"partition 2 (node 12): {needle}"]
    assert outcome.refused == 1


def test_count_above_the_partition_size_is_accepted_when_sizes_are_unknown() -> None:
    strategy = _fedavg([10, 11])  # deployment: the server does not know the partitions
    outcome = strategy.aggregate_round(1, G, [_train_reply(10, A, 10), _train_reply(11, B, 10**9)])
    assert outcome.skipped == [] and outcome.refused == 0
    for key in A:
        torch.testing.assert_close(
            got := outcome.state[key], (10 * A[key] + 1e9 * B[key]) / (1e9 + 10)
        )
        assert torch.isfinite(got).all()


def test_all_zero_counts_keep_the_global_model_without_dividing_by_zero() -> None:
    for strategy in (
        _fedavg([10, 11]),
        MergingStrategy(merge=LDAWAMerge(LDAWAOptions(warmup_rounds=1)), min_available_nodes=1),
    ):
        strategy.bind_nodes({0: 10, 1: 11}, clients_per_round=2, rng=np.random.default_rng(0))
        outcome = strategy.aggregate_round(1, G, [_train_reply(10, A, 0), _train_reply(11, B, 0)])
        assert outcome.state is None and outcome.train_metrics is None
        assert outcome.refused == 2
        empty = strategy.aggregate_round(2, G, [])
        assert empty.state is None and empty.skipped == [] and empty.refused == 0


def test_non_finite_arrays_are_refused() -> None:
    inf = _state(4)
    inf["fc.weight"][0, 0] = float("inf")
    strategy = _fedavg([10, 11, 12])
    outcome = strategy.aggregate_round(
        1, G, [_train_reply(10, A, 10), _train_reply(11, B, 30), _train_reply(12, inf, 20)]
    )
    _mean_of_a_and_b(outcome.state)
    assert outcome.skipped == ["partition 2 (node 12): non-finite values in fc.weight"]


def test_non_finite_train_loss_is_refused() -> None:
    strategy = _fedavg([10, 11, 12])
    replies = [_train_reply(10, A, 10), _train_reply(11, B, 30),
               _train_reply(12, _state(3), 20, loss=float("nan"))]  # fmt: skip
    outcome = strategy.aggregate_round(1, G, replies)
    _mean_of_a_and_b(outcome.state)
    assert outcome.skipped == ["partition 2 (node 12): metric 'train_loss' is not finite (nan)"]
    assert outcome.train_metrics["train_loss.n"] == 2  # the refused loss is not in the statistics


def test_huge_update_is_refused_by_norm_screening_only_when_asked() -> None:
    near = {k: G[k] + 0.1 * (A[k] - G[k]) for k in G}
    near2 = {k: G[k] + 0.1 * (B[k] - G[k]) for k in G}
    huge = {k: G[k] + 50.0 * (A[k] - G[k]) for k in G}  # model replacement g + 50 (w - g)
    replies = [_train_reply(10, near, 10), _train_reply(11, near2, 30), _train_reply(12, huge, 20)]
    norms = [
        float(torch.cat([(s[k] - G[k]).ravel() for k in G]).norm()) for s in (near, near2, huge)
    ]
    median = sorted(norms)[1]
    assert norms[2] > 3 * median  # the setting of the test: the big update is an outlier
    screened = _fedavg([10, 11, 12], screen_norm_ratio=3.0).aggregate_round(1, G, replies)
    assert len(screened.skipped) == 1 and screened.refused == 1
    assert screened.skipped[0].startswith("partition 2 (node 12): update norm")
    assert "exceeds 3 x the median norm" in screened.skipped[0]
    for key in G:
        torch.testing.assert_close(screened.state[key], (10 * near[key] + 30 * near2[key]) / 40)
    plain = _fedavg([10, 11, 12]).aggregate_round(1, G, replies)
    assert plain.skipped == []  # without screening it is merged


def test_error_replies_are_skipped_but_not_counted_as_refused() -> None:
    strategy = _fedavg([10, 11, 12])
    crashed = Message(Error(code=1, reason="boom"), reply_to=_instruction(12))
    outcome = strategy.aggregate_round(
        1, G, [_train_reply(10, A, 10), _train_reply(11, B, 30), crashed]
    )
    _mean_of_a_and_b(outcome.state)
    assert outcome.skipped == ["partition 2 (node 12): error boom"] and outcome.refused == 0


def test_evaluation_replies_are_screened_like_training_replies() -> None:
    strategy = _fedavg([10, 11, 12, 13, 14, 15], sizes={p: 100 for p in range(6)})
    replies = [
        _eval_reply(10, 20, 0.5),
        _eval_reply(11, 60, 0.9),
        _eval_reply(12, float("nan"), 0.1),
        _eval_reply(13, 0, 0.1),
        _eval_reply(14, 40, float("inf")),
        _eval_reply(15, 10**6, 0.1),
    ]
    screening = strategy.screen_evaluation(replies)
    assert screening.refused == 4
    assert [r.metadata.src_node_id for r in screening.replies] == [10, 11]
    reasons = " | ".join(screening.skipped)
    for needle in ("partition 2 (node 12): evaluation num-examples nan",
                   "partition 3 (node 13): evaluation num-examples 0",
                   "partition 4 (node 14): evaluation metric 'eval_accuracy' is not finite",
                   "partition 5 (node 15): evaluation num-examples 1000000 exceeds"):  # fmt: skip
        assert needle in reasons
    metrics = strategy.aggregate_evaluate(1, replies)
    values = [0.5, 0.9]
    assert metrics["eval_accuracy.mean"] == pytest.approx(sum(values) / 2)
    assert metrics["eval_accuracy.n"] == 2


def test_evaluation_with_only_bad_replies_aggregates_nothing() -> None:
    strategy = _fedavg([10, 11])
    replies = [_eval_reply(10, 0, 0.5), _eval_reply(11, 0, 0.7)]
    assert strategy.screen_evaluation(replies).replies == []
    assert strategy.aggregate_evaluate(1, replies) is None
