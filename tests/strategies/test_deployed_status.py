"""Deployed runs: replies attributed to partitions, rejoining nodes, statuses of summary.json."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict

from strategies import protocol
from strategies.config import RUN_DIR_KEY
from strategies.deployment import (
    RejoiningGrid,
    failed_summary,
    lost_partitions,
    read_status,
    send_and_receive,
)
from strategies.server_app import FinishedRunDirError, NodeDiscoveryError, discover_nodes
from strategies.server_app import main as server_main


class _FakeGrid:
    """Live nodes answer with their partition; the SuperLink answers for the others."""

    def __init__(self, holds: dict[int, int]) -> None:
        self.holds = dict(holds)
        self.live = set(holds)
        self.sent: list[tuple[str, int]] = []
        self.silent: set[int] = set()
        self.pending: list[Message] = []
        self.per_pull = 1_000
        self.pulls = 0
        self._n = 0

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.live)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Queue each message's reply; replies come back ``per_pull`` at a time."""
        ids = []
        for m in messages:
            self._n += 1
            m.metadata.__dict__["_message_id"] = f"m{self._n}"
            dst = m.metadata.dst_node_id
            self.sent.append((m.metadata.message_type, dst))
            if dst in self.silent:
                pass  # never answers
            elif dst not in self.live:
                reply = Message(Error(code=1, reason="node offline"), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = 0  # made by the SuperLink
                self.pending.append(reply)
            else:
                config = ConfigRecord({protocol.PARTITION_ID: self.holds[dst]})
                self.pending.append(Message(RecordDict({protocol.CONFIG: config}), reply_to=m))
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        ready = [r for r in self.pending if r.metadata.reply_to_message_id in wanted]
        out = ready[: self.per_pull]
        self.pending = [r for r in self.pending if r not in out]
        return out


def _train(node: int) -> Message:
    return Message(
        RecordDict({protocol.CONFIG: ConfigRecord({})}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )


def test_error_made_by_the_superlink_is_attributed_to_the_node_it_was_sent_to() -> None:
    fake = _FakeGrid({11: 0, 22: 1})
    grid = RejoiningGrid(fake, {0: 11, 1: 22}, timeout=5)  # type: ignore[arg-type]
    fake.live.discard(22)
    replies = grid.send_and_receive([_train(11), _train(22)])
    assert [r.metadata.src_node_id for r in replies] == [11, 22]
    assert not replies[0].has_error() and replies[1].error.reason == "node offline"


def test_a_restarted_node_takes_its_partition_back() -> None:
    fake = _FakeGrid({11: 0, 22: 1})
    grid = RejoiningGrid(fake, {0: 11, 1: 22}, timeout=5)  # type: ignore[arg-type]
    fake.live.discard(22)
    fake.holds[33] = 1  # node 22 restarted as node 33, same partition-id
    fake.live.add(33)
    replies = grid.send_and_receive([_train(11), _train(22)])
    # the new node is asked once which partition it holds, then gets partition 1's message
    assert fake.sent == [("query", 33), ("train", 11), ("train", 33)]
    assert grid.routes == {0: 11, 1: 33}
    assert [r.has_error() for r in replies] == [False, False]
    # replies keep discovery's node ids, which the strategy maps to partitions
    assert [r.metadata.src_node_id for r in replies] == [11, 22]
    # the message itself is addressed as the strategy made it
    fake.sent.clear()
    grid.send_and_receive([_train(22)])
    assert fake.sent == [("train", 33)]


def test_a_node_claiming_an_unknown_partition_is_ignored() -> None:
    fake = _FakeGrid({11: 0})
    grid = RejoiningGrid(fake, {0: 11}, timeout=5)  # type: ignore[arg-type]
    fake.holds[44] = 7
    fake.live.add(44)
    grid.send_and_receive([_train(11)])
    assert grid.routes == {0: 11}


def test_lost_partitions_from_skip_reasons() -> None:
    rows = [
        {"round": 0},
        {"round": 1, "skipped_reasons": ["partition 2 (node 9): error node offline"]},
        {"round": 2, "skipped_reasons": [], "eval_skipped_reasons": [
            "partition 0 (node 5): evaluation error x", "partition 2 (node 9): error y"]},
    ]  # fmt: skip
    lost = lost_partitions(rows)
    assert lost["lost_partitions"] == [0, 2]
    assert [entry["round"] for entry in lost["lost"]] == [1, 2, 2]
    assert lost["lost"][0]["reason"] == "partition 2 (node 9): error node offline"
    assert lost_partitions([{"round": 1}]) == {"lost_partitions": [], "lost": []}


def test_failed_summary_and_finished_status(tmp_path: Path) -> None:
    config = {"name": "s", "seed": 3, "strategy": {"name": "fedavg"}}
    summary = failed_summary(config, "discovery", ValueError("partition-id: got 7"))
    assert summary == {
        "status": "failed",
        "stage": "discovery",
        "error": "ValueError: partition-id: got 7",
        "scenario": "s",
        "strategy": "fedavg",
        "seed": 3,
    }
    assert read_status(tmp_path) is None
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert read_status(tmp_path) is None  # a failed run may be run again
    for status in ("completed", "degraded"):
        (tmp_path / "summary.json").write_text(json.dumps({"status": status}))
        assert read_status(tmp_path) == status
    (tmp_path / "summary.json").write_text("[1]")
    assert read_status(tmp_path) is None


def test_a_message_without_reply_becomes_an_error_of_its_partition() -> None:
    fake = _FakeGrid({11: 0, 22: 1})
    fake.silent.add(22)
    grid = RejoiningGrid(fake, {0: 11, 1: 22}, timeout=5)  # type: ignore[arg-type]
    replies = grid.send_and_receive([_train(11), _train(22)], timeout=0.3)
    assert [r.metadata.src_node_id for r in replies] == [11, 22]
    assert replies[1].has_error() and replies[1].error.reason == "no reply within 0.3 s"


def test_replies_that_come_one_by_one_are_all_collected() -> None:
    fake = _FakeGrid({11: 0, 22: 1, 33: 2})
    fake.per_pull = 1
    replies = send_and_receive(fake, [_train(11), _train(22), _train(33)], timeout=None)  # type: ignore[arg-type]
    assert sorted(int(r.content[protocol.CONFIG][protocol.PARTITION_ID]) for r in replies) == [
        0, 1, 2,
    ]  # fmt: skip
    assert fake.pulls == 3  # it stops pulling once every message is answered


def test_discovery_refuses_bad_and_duplicate_partition_ids() -> None:
    with pytest.raises(NodeDiscoveryError, match=r"partition-id: node 12 says 5; allowed: 0 to 1"):
        discover_nodes(_FakeGrid({11: 0, 12: 5}), 2, timeout=5)  # type: ignore[arg-type]
    with pytest.raises(NodeDiscoveryError, match=r"partition-id 1 claimed by two nodes"):
        discover_nodes(_FakeGrid({11: 1, 12: 1}), 2, timeout=5)  # type: ignore[arg-type]
    assert discover_nodes(_FakeGrid({11: 1, 12: 0}), 2, timeout=5) == {0: 12, 1: 11}  # type: ignore[arg-type]


def _context(run_dir: Path, **config: object) -> Context:
    run_config = {RUN_DIR_KEY: str(run_dir), "name": "t", **config}
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)  # type: ignore[arg-type]


def test_a_run_that_fails_leaves_a_failed_summary(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rounds"):
        server_main(None, _context(tmp_path, rounds=-1))  # type: ignore[arg-type]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stage"] == "configuration"
    assert "rounds" in summary["error"] and summary["scenario"] == "t"


def test_a_finished_run_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    old = json.dumps({"status": "completed", "final_accuracy": 0.5})
    (tmp_path / "summary.json").write_text(old)
    with pytest.raises(
        FinishedRunDirError, match=r"^output.run-dir: got '.*', which holds a finished"
    ):
        server_main(None, _context(tmp_path))  # type: ignore[arg-type]
    assert (tmp_path / "summary.json").read_text() == old
