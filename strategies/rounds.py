"""The round loop of server-side strategies, with explicit per-round results."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from strategies.config import RunConfig
from strategies.metering import MeteredGrid
from strategies.recorder import RoundRecorder
from strategies.replies import EvaluationScreening, stop_on_dead_worker
from strategies.sampling import RoundOutcome

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class RoundStrategy(Protocol):
    """What the round loop needs of a strategy (fedmerge's Flower strategies have it)."""

    sampler_state: dict[str, Any]

    def summary(self) -> None:
        """Log the configuration once."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Training messages of ``server_round``."""
        ...

    def aggregate_round(
        self, server_round: int, global_state: StateDict, replies: Iterable[Message]
    ) -> RoundOutcome:
        """The round's new global model and metrics."""
        ...

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages of ``server_round``."""
        ...

    def screen_evaluation(self, replies: Iterable[Message]) -> EvaluationScreening:
        """Valid client-side evaluation replies, and why the others are skipped."""
        ...

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregated client-side evaluation metrics."""
        ...


def run_server_rounds(
    strategy: RoundStrategy,
    grid: MeteredGrid,
    config: RunConfig,
    recorder: RoundRecorder,
    initial: StateDict,
) -> StateDict:
    """Train ``config.rounds`` rounds with ``strategy``; every round is recorded and checkpointed.

    Each round mirrors Flower's ``Strategy.start``: ``configure_train``, send,
    aggregate; ``configure_evaluate``, send, ``aggregate_evaluate``; then the
    server evaluates the new global model. The strategy's
    :meth:`~strategies.sampling.SeededSampling.aggregate_round` gets the
    current global model as an argument and returns a
    :class:`~strategies.sampling.RoundOutcome`, which the recorder writes:
    no state is handed over through the strategy between calls.

    A run with a checkpoint of the same configuration resumes after its last
    round, with the sampler where it was, so that it ends bit-identical to an
    uninterrupted run.

    Returns
    -------
    dict of str to Tensor
        The final global model.
    """
    timeout = config.simulation.timeout
    state, first = initial, 1
    resume = recorder.begin()
    if resume is not None:
        strategy.sampler_state = resume.sampler_state
        state, first = resume.state, resume.round + 1
        logger.info("resuming after round %d", resume.round)
    elif recorder.by_clients:  # the initial model's accuracy is the clients' too
        screening, eval_metrics = _evaluate_on_clients(strategy, grid, 0, state, timeout)
        extras = {"refused": screening.refused, "eval_skipped_reasons": screening.skipped}
        _record(recorder, grid, 0, state, extras, eval_metrics=eval_metrics)
    else:
        _record(recorder, grid, 0, state)
    strategy.summary()
    for server_round in range(first, config.rounds + 1):
        messages = strategy.configure_train(server_round, ArrayRecord(state), ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        outcome = strategy.aggregate_round(server_round, state, replies)
        if outcome.state is not None:
            state = outcome.state
        evaluation, eval_metrics = _evaluate_on_clients(
            strategy, grid, server_round, state, timeout
        )
        extras = {
            "skipped": len(outcome.skipped),
            "skipped_reasons": outcome.skipped,
            # replies that arrived without an error but failed the screening (train + evaluate)
            "refused": outcome.refused + evaluation.refused,
            "eval_skipped_reasons": evaluation.skipped,
        }
        _record(
            recorder, grid, server_round, state, {**extras, **outcome.extras},
            train_metrics=outcome.train_metrics, eval_metrics=eval_metrics,
        )  # fmt: skip
        recorder.checkpoint(server_round, state, strategy.sampler_state)
        stop_on_dead_worker(server_round, [*outcome.skipped, *evaluation.skipped])
    return state


def _evaluate_on_clients(
    strategy: RoundStrategy, grid: MeteredGrid, server_round: int, state: StateDict, timeout: float
) -> tuple[EvaluationScreening, MetricRecord | None]:
    """Client-side evaluation of ``state``: the screened replies and their aggregate."""
    messages = strategy.configure_evaluate(server_round, ArrayRecord(state), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages, timeout=timeout)
    evaluation = strategy.screen_evaluation(replies)
    eval_metrics = (
        strategy.aggregate_evaluate(server_round, evaluation.replies)
        if evaluation.replies
        else None
    )
    return evaluation, eval_metrics


def _record(
    recorder: RoundRecorder,
    grid: MeteredGrid,
    server_round: int,
    state: StateDict,
    extras: dict[str, Any] | None = None,
    **metrics: Any,
) -> None:
    evaluated = recorder.evaluate_round(server_round, state, metrics.get("eval_metrics"))
    fields = {**evaluated, **(extras or {})}
    recorder.record(server_round, fields, traffic=grid.take(), **metrics)
