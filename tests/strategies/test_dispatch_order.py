"""The order in which a round's messages go out; the ServerApp's waits for the engine's actors."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType

from strategies import protocol, workers
from strategies.sampling import SeededFedAvg


def _strategy(sizes: dict[int, int] | None, k: int) -> SeededFedAvg:
    strategy = SeededFedAvg(min_available_nodes=1, fraction_evaluate=1.0)
    strategy.bind_nodes(
        {p: 100 + p for p in range(6)}, clients_per_round=k,
        rng=np.random.default_rng(3), partition_sizes=sizes,
    )  # fmt: skip
    return strategy


def _partitions(messages: list) -> list[int]:
    return [int(m.content["config"][protocol.PARTITION_ID]) for m in messages]


ARRAYS = ArrayRecord({"w": torch.zeros(2)})
#: Hand-worked: by size, largest first; 5 and 1 tie at 40 and go by partition id.
SIZES = {0: 10, 1: 40, 2: 25, 3: 90, 4: 5, 5: 40}
LARGEST_FIRST = [3, 1, 5, 2, 0, 4]


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_simulation_sends_the_largest_partitions_first(kind: str) -> None:
    strategy = _strategy(SIZES, k=6)
    train = kind == MessageType.TRAIN
    configure = strategy.configure_train if train else strategy.configure_evaluate
    messages = list(configure(1, ARRAYS, ConfigRecord(), None))  # type: ignore[arg-type]
    assert _partitions(messages) == LARGEST_FIRST
    assert [m.metadata.dst_node_id for m in messages] == [100 + p for p in LARGEST_FIRST]
    assert {m.metadata.message_type for m in messages} == {kind}


def test_the_sample_does_not_depend_on_the_order() -> None:
    # the same seed samples the same partitions with sizes known or not; only the order differs
    with_sizes = _strategy(SIZES, k=3)
    without = _strategy(None, k=3)
    a = _partitions(list(with_sizes.configure_train(1, ARRAYS, ConfigRecord(), None)))  # type: ignore[arg-type]
    b = _partitions(list(without.configure_train(1, ARRAYS, ConfigRecord(), None)))  # type: ignore[arg-type]
    assert sorted(a) == b  # a deployment sends them in partition order
    assert a == sorted(b, key=lambda p: -SIZES[p])
    assert with_sizes.sampler_state == without.sampler_state


def test_wait_returns_at_once_where_no_engine_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "_ready", None)
    assert workers.wait(60.0) is None


def test_wait_waits_for_the_engines_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "_ready", None)
    ready = workers.expect()
    timer = threading.Timer(0.3, ready.set)
    timer.start()
    try:
        waited = workers.wait(60.0)
    finally:
        timer.cancel()
    assert waited is not None and 0.25 <= waited < 60.0
    assert ready.is_set()


def test_wait_gives_up_after_its_timeout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(workers, "_ready", None)
    workers.expect()  # never set: the actors did not come up
    with caplog.at_level(logging.WARNING, logger="strategies.workers"):
        waited = workers.wait(0.2)
    assert waited is not None and waited >= 0.2
    assert "actors were not up after 0.2 s; the first round starts" in caplog.text


def test_flush_output_returns_at_once_where_no_engine_offers_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers, "_flush", None)
    assert workers.flush_output(60.0) is None


def test_flush_output_asks_the_engine_with_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "_flush", None)
    asked: list[float] = []
    workers.offer_flush(lambda timeout: asked.append(timeout) or len(asked) > 1)
    assert workers.flush_output(1.5) is False  # the first: not in time
    assert workers.flush_output(2.5) is True
    assert asked == [1.5, 2.5]


def test_flush_output_of_an_engine_that_is_gone_is_not_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers, "_flush", None)

    def gone(timeout: float) -> bool:
        raise ConnectionError("Ray is not connected")

    workers.offer_flush(gone)
    assert workers.flush_output(1.0) is False
