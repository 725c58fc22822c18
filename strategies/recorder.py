"""Per-round bookkeeping of a run: evaluation, metrics rows, checkpoints, resume."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from fedmerge.cache import cache_key
from fedmerge.data import DatasetBundle
from fedmerge.scenario import Scenario
from fedmerge.training import evaluate
from strategies.metering import MeteredGrid, Traffic
from strategies.run_log import RunLog

logger = logging.getLogger(__name__)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(a),
    }


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's names and values (for pairing checks)."""
    return cache_key(
        sorted(state), *(state[k].detach().cpu().contiguous().numpy() for k in sorted(state))
    )


@dataclass
class Resume:
    """Where a run picks up: the last checkpointed round and its state."""

    round: int
    state: dict[str, torch.Tensor]
    sampler_state: dict[str, Any]
    rows: list[dict[str, Any]]


class RoundRecorder:
    """Evaluates the global model after every round and writes the run directory.

    Parameters
    ----------
    scenario : Scenario
        The run's scenario (its digest guards resumption).
    log : RunLog
        Where rows, checkpoints and the summary go.
    grid : MeteredGrid
        Source of per-round traffic counters.
    model : nn.Module
        Scratch model used for evaluation.
    data : DatasetBundle
        Test set.
    node_to_partition : dict of int to int
        Maps training destinations to partition ids in the rows.
    """

    def __init__(
        self,
        scenario: Scenario,
        log: RunLog,
        grid: MeteredGrid,
        model: nn.Module,
        data: DatasetBundle,
        node_to_partition: dict[int, int],
    ) -> None:
        self.scenario = scenario
        self.log = log
        self.grid = grid
        self.model = model
        self.data = data
        self.node_to_partition = node_to_partition
        self.rows: list[dict[str, Any]] = []
        self.t_ready = time.perf_counter()
        self._last = self.t_ready

    # -- resumption ---------------------------------------------------------
    def begin(self) -> Resume | None:
        """Start the run, or pick up an interrupted run of this same scenario.

        With a checkpoint of the same scenario digest, ``metrics.jsonl`` is cut
        back to the checkpointed rounds (atomically) and the checkpoint is
        returned. Otherwise the run starts over with an empty ``metrics.jsonl``.
        Nothing is truncated before that decision, so a run killed while it
        starts loses no rows.
        """
        resume = self._checkpoint()
        if resume is None:
            self.log.write_metrics([])
            return None
        self.rows = list(resume.rows)
        self.log.write_metrics(self.rows)
        return resume

    def _checkpoint(self) -> Resume | None:
        meta_path = self.log.run_dir / "checkpoint.json"
        weights = self.log.run_dir / "checkpoint.safetensors"
        if not (meta_path.exists() and weights.exists()):
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("digest") != self.scenario.digest():
            logger.warning(
                "checkpoint in %s is of another scenario; starting over", self.log.run_dir
            )
            return None
        rows = [r for r in self.log.read_metrics() if r["round"] <= meta["round"]]
        return Resume(meta["round"], load_file(str(weights)), meta["sampler_state"], rows)

    def checkpoint(
        self, server_round: int, state: dict[str, torch.Tensor], sampler_state: dict
    ) -> None:
        """Save the global state after ``server_round`` (weights, then metadata)."""
        self.log.save_tensors("checkpoint.safetensors", state)
        self.log.write_json(
            "checkpoint.json",
            {
                "round": server_round,
                "digest": self.scenario.digest(),
                "sampler_state": sampler_state,
            },
        )

    # -- per round ----------------------------------------------------------
    def record(
        self, server_round: int, state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Evaluate ``state`` on the test set and append the round's row."""
        loss, acc = self.evaluate(state)
        return self.record_row(server_round, {"accuracy": acc, "loss": loss, **(extra or {})})

    def evaluate(self, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Test loss and accuracy of ``state``."""
        self.model.load_state_dict(state)
        return evaluate(self.model, self.data.test_x, self.data.test_y)

    def record_row(self, server_round: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Append a row made of ``fields`` plus this round's traffic and timing."""
        now = time.perf_counter()
        traffic: Traffic = self.grid.take()
        row: dict[str, Any] = {
            "round": server_round,
            "train_loss": _stats(traffic.train_losses),
            # client-side evaluation of the global model on local data (fraction_evaluate > 0)
            "client_eval_accuracy": _stats(traffic.eval_accuracies),
            "clients": traffic.replies,
            "failures": traffic.errors,
            "sampled": sorted(self.node_to_partition.get(n, -1) for n in traffic.train_nodes),
            "bytes_down": traffic.bytes_down,
            "bytes_up": traffic.bytes_up,
            "round_time": now - self._last,
            "elapsed": now - self.t_ready,
            **fields,
        }
        self._last = now
        self.rows.append(row)
        self.log.append_metrics(row)
        logger.info("round %d: accuracy %.4f", server_round, row["accuracy"])
        return row

    def summary(self, t_start: float, hashes: dict[str, str]) -> dict[str, Any]:
        """Write and return ``summary.json``."""
        rows, s = self.rows, self.scenario
        t_end = time.perf_counter()
        summary = {
            "status": "completed",
            "scenario": s.name,
            "digest": s.digest(),
            "strategy": s.strategy.name,
            "seed": s.seed,
            "rounds": s.rounds,
            "initial_accuracy": rows[0]["accuracy"],
            "final_accuracy": rows[-1]["accuracy"],
            "final_loss": rows[-1]["loss"],
            "best_accuracy": max(r["accuracy"] for r in rows),
            "bytes_down": sum(r["bytes_down"] for r in rows),
            "bytes_up": sum(r["bytes_up"] for r in rows),
            "bytes_total": sum(r["bytes_down"] + r["bytes_up"] for r in rows),
            "failures": sum(r["failures"] for r in rows),
            "startup_time": self.t_ready - t_start,
            "train_time": t_end - self.t_ready,
            "serverapp_time": t_end - t_start,
            **hashes,
        }
        self.log.write_json("summary.json", summary)
        return summary
