"""Per-round bookkeeping of a run: evaluation, metrics rows, checkpoints, resume, summary."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from flwr.app import MetricRecord
from safetensors.torch import load_file
from torch import nn

from fedmerge.cache import cache_key
from fedmerge.data import DatasetBundle
from fedmerge.training import evaluate
from strategies.adversary import adversarial_partitions
from strategies.checkpoint import (
    CHECKPOINT_JSON,
    CHECKPOINT_WEIGHTS,
    checkpoint_metadata,
    read_checkpoint,
    resume_rows,
)
from strategies.config import RunConfig
from strategies.deployment import lost_partitions
from strategies.encoder_eval import EncoderEvaluation, encoder_summary, seeded_test_subset
from strategies.metering import Traffic
from strategies.run_log import RunLog

logger = logging.getLogger(__name__)

_STATS = ("mean", "std", "min", "max", "n")
#: Per-round counts of lost or refused replies; any of them makes a run "degraded".
_DEGRADING = ("failures", "missing", "refused")
#: Measures recorded once in a run's rows and copied into ``summary.json``.
_ONCE = ("fusion",)


def statistics_of(metrics: MetricRecord | None, metric: str) -> dict[str, float] | None:
    """``{"mean", "std", "min", "max", "n"}`` of ``metric`` from an aggregated MetricRecord."""
    if metrics is None or f"{metric}.n" not in metrics:
        return None
    return {s: metrics[f"{metric}.{s}"] for s in _STATS}  # type: ignore[misc]


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
    """Evaluates models on the test set and writes the run directory.

    Parameters
    ----------
    config : RunConfig
        The run (its digest guards resumption).
    log : RunLog
        Where rows, checkpoints and the summary go.
    model : nn.Module
        Scratch model used for evaluation.
    data : DatasetBundle
        The scenario's data set: its test split is the server's test set,
        unless ``test_set`` says otherwise.
    test_set : tuple of Tensor, optional
        The server's own test inputs and labels (``evaluation.test_dir``).
        With ``evaluation.server = "clients"`` the server has none and a
        row's ``accuracy`` and ``loss`` are the clients' (sample-weighted).
    """

    def __init__(
        self,
        config: RunConfig,
        log: RunLog,
        model: nn.Module,
        data: DatasetBundle,
        test_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.model = model
        self.data = data
        self.by_clients = config.evaluation.server == "clients"
        self.test_set = test_set
        self.rows: list[dict[str, Any]] = []
        self.encoder_evaluation = (
            EncoderEvaluation(config, data, model) if config.task.self_supervised else None
        )
        self.t_ready = time.perf_counter()
        self._last = self.t_ready

    # -- resumption ---------------------------------------------------------
    def begin(self) -> Resume | None:
        """Start the run, or pick up an interrupted run of this same configuration.

        With a checkpoint of the same digest, ``metrics.jsonl`` is cut back to
        the checkpointed rounds (atomically) and the checkpoint is returned.
        Otherwise the run starts over with an empty ``metrics.jsonl``.
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
        """The checkpoint to resume from, checked (:mod:`strategies.checkpoint`)."""
        run_dir = self.log.run_dir
        info = read_checkpoint(run_dir)  # CheckpointError: damaged or mismatched
        if info is None:
            return None
        if info.digest != self.config.digest():
            logger.warning("checkpoint in %s is of another run; starting over", run_dir)
            return None
        rows = resume_rows(run_dir, info.round)
        state = load_file(str(run_dir / CHECKPOINT_WEIGHTS))
        return Resume(info.round, state, info.sampler_state, rows)

    def checkpoint(
        self, server_round: int, state: dict[str, torch.Tensor], sampler_state: dict[str, Any]
    ) -> None:
        """Save the state after ``server_round``: one weights file that holds its metadata.

        ``checkpoint.json`` follows with the same metadata and the weights
        file's SHA-256 (see :mod:`strategies.checkpoint`).
        """
        digest = self.config.digest()
        sha = self.log.save_tensors(
            CHECKPOINT_WEIGHTS, state, checkpoint_metadata(server_round, digest, sampler_state)
        )
        self.log.write_json(
            CHECKPOINT_JSON,
            {
                "round": server_round,
                "digest": digest,
                "sampler_state": sampler_state,
                "weights_sha256": sha,
            },
        )

    # -- per round ----------------------------------------------------------
    def evaluate(self, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Test loss and accuracy of ``state`` on the server's test set."""
        if self.by_clients:
            raise RuntimeError("evaluation.server: 'clients'; the server holds no test set")
        x, y = self._test
        self.model.load_state_dict(state)
        return evaluate(self.model, x, y)

    @cached_property
    def _test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The server's test set: ``evaluation.test_dir``'s or the data set's, maybe a subset."""
        x, y = self.test_set or (self.data.test_x, self.data.test_y)
        return seeded_test_subset(x, y, self.config.evaluation.test_samples, self.config.seed)

    def evaluate_round(
        self,
        server_round: int,
        state: dict[str, torch.Tensor],
        eval_metrics: MetricRecord | None = None,
    ) -> dict[str, Any]:
        """The evaluation fields of a row: ``accuracy`` and ``loss``, and a task's own.

        Supervised runs: test accuracy and loss. Self-supervised runs: see
        :mod:`strategies.encoder_eval` (k-NN accuracy as ``accuracy``, linear
        probe every ``task.eval_every`` rounds). ``evaluation.server =
        "clients"``: the sample-weighted means of the clients' evaluation
        (``eval_metrics``; ``None`` when no client replied).
        """
        if self.by_clients:
            return clients_evaluation(eval_metrics)
        if self.encoder_evaluation is not None:
            return self.encoder_evaluation(server_round, state)
        loss, acc = self.evaluate(state)
        return {"accuracy": acc, "loss": loss}

    def record(
        self,
        server_round: int,
        fields: dict[str, Any],
        *,
        traffic: Traffic,
        train_metrics: MetricRecord | None = None,
        eval_metrics: MetricRecord | None = None,
    ) -> dict[str, Any]:
        """Append the row of ``server_round``: ``fields`` plus traffic, aggregated metrics, timing.

        ``fields`` holds at least ``accuracy`` and ``loss``; ``train_metrics``
        and ``eval_metrics`` are the strategy's aggregated MetricRecords
        (statistics of ``train_loss`` and of client-side ``eval_accuracy``).
        """
        now = time.perf_counter()
        row: dict[str, Any] = {
            "round": server_round,
            "train_loss": statistics_of(train_metrics, "train_loss"),
            # client-side evaluation of the global model on local data (fraction_evaluate > 0)
            "client_eval_accuracy": statistics_of(eval_metrics, "eval_accuracy"),
            "clients": traffic.replies,
            "failures": traffic.errors,
            "missing": traffic.missing,
            "sampled": sorted(traffic.train_partitions),
            "bytes_down": traffic.bytes_down,
            "bytes_up": traffic.bytes_up,
            "round_time": now - self._last,
            "elapsed": now - self.t_ready,
            **fields,
        }
        self._last = now
        self.rows.append(row)
        self.log.append_metrics(row)
        if row["accuracy"] is not None:
            logger.info("round %d: accuracy %.4f", server_round, row["accuracy"])
        else:
            logger.info("round %d: no client evaluated the model", server_round)
        return row

    def summary(self, t_start: float, hashes: dict[str, str | None]) -> dict[str, Any]:
        """Write and return ``summary.json``.

        ``status`` is ``"completed"``, or ``"degraded"`` when the run lost
        clients (error replies or messages without a reply) or refused
        replies in its screening; ``failures``, ``missing`` and ``refused``
        count them over all rounds. ``adversaries`` lists the partitions the
        scenario made adversarial (``simulation.adversary_*``).
        """
        rows, c = self.rows, self.config
        t_end = time.perf_counter()
        lost = {key: sum(int(r.get(key, 0)) for r in rows) for key in _DEGRADING}
        scored = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        summary = {
            "status": "degraded" if any(lost.values()) else "completed",
            "scenario": c.name,
            "digest": c.digest(),
            "strategy": c.strategy.name,
            "seed": c.seed,
            "rounds": c.rounds,
            **({"evaluation": "clients"} if self.by_clients else {}),
            "initial_accuracy": rows[0]["accuracy"],
            "final_accuracy": rows[-1]["accuracy"],
            "final_loss": rows[-1]["loss"],
            "best_accuracy": max(scored) if scored else None,
            "bytes_down": sum(r["bytes_down"] for r in rows),
            "bytes_up": sum(r["bytes_up"] for r in rows),
            "bytes_total": sum(r["bytes_down"] + r["bytes_up"] for r in rows),
            **lost,
            **lost_partitions(rows),
            **{k: r[k] for r in rows for k in _ONCE if k in r},  # one-shot fusion's measures
            **(encoder_summary(rows) if self.encoder_evaluation is not None else {}),
            "adversaries": sorted(adversarial_partitions(c)),
            "startup_time": self.t_ready - t_start,
            "train_time": t_end - self.t_ready,
            "serverapp_time": t_end - t_start,
            **hashes,
        }
        self.log.write_json("summary.json", summary)
        return summary


def clients_evaluation(eval_metrics: MetricRecord | None) -> dict[str, Any]:
    """``accuracy`` and ``loss`` of a row from the clients' aggregated evaluation.

    The sample-weighted means (Flower's convention for federated evaluation)
    that :func:`strategies.sampling.metric_statistics` adds as
    ``eval_accuracy.weighted`` and ``eval_loss.weighted``; ``None`` for both
    when no client's evaluation was valid.
    """
    if eval_metrics is None or "eval_accuracy.weighted" not in eval_metrics:
        return {"accuracy": None, "loss": None}
    return {
        "accuracy": float(eval_metrics["eval_accuracy.weighted"]),  # type: ignore[arg-type]
        "loss": float(eval_metrics["eval_loss.weighted"]),  # type: ignore[arg-type]
    }
