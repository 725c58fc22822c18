"""The task registry: the one place where a task's name becomes behaviour.

A task is one module with one class (a subclass of :class:`Task`) and one
entry here. It says which network the clients train and send (the model
itself, or the model's encoder plus a projection head), how a client trains
it for one round, and what local state a client keeps between rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from fedmerge.tasks.config import TaskConfig
    from fedmerge.training import TrainConfig, TrainResult

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalRound:
    """What a client's round of a task gives back.

    Attributes
    ----------
    result : TrainResult
        Loss, examples and steps of the local training.
    kept : dict of str to Tensor or None
        State the client keeps until its next round (BYOL's target network
        and predictor); never sent to the server. ``None``: nothing.
    """

    result: TrainResult
    kept: StateDict | None = None


class Task:
    """Base of every training task."""

    #: The registered name (``task.name``).
    name: ClassVar[str]
    #: The options of :class:`~fedmerge.tasks.TaskConfig` the task reads.
    options: ClassVar[frozenset[str]] = frozenset()
    #: One line for listings and the README.
    summary: ClassVar[str] = ""

    def network(self, model: nn.Module, config: TaskConfig, *, seed: int) -> nn.Module:
        """The network clients train and send, built from a freshly built ``model``.

        ``seed`` initialises whatever the task adds to ``model``.
        """
        raise NotImplementedError

    def train(
        self,
        net: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        train: TrainConfig,
        config: TaskConfig,
        *,
        generator: torch.Generator,
        prox_mu: float = 0.0,
        global_state: Mapping[str, torch.Tensor] | None = None,
        epochs: int | None = None,
        kept: StateDict | None = None,
    ) -> LocalRound:
        """Train ``net`` in place for one round on ``(x, y)`` (``kept``: the previous round's)."""
        raise NotImplementedError


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Register ``task`` under ``task.name`` (the same class again is a no-op)."""
    current = _TASKS.get(task.name)
    if current is not None and type(current) is not type(task):
        raise ValueError(f"task.name: got {task.name!r}; allowed: a name not yet registered")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name``.

    Raises
    ------
    ValueError
        ``name: got X; allowed: ...`` for an unknown name.
    """
    _load_builtin()
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"name: got {name!r}; allowed: {', '.join(task_names())}") from None


def task_names() -> list[str]:
    """Registered task names, sorted."""
    _load_builtin()
    return sorted(_TASKS)


_BUILTIN_LOADED: list[bool] = [False]


def _load_builtin() -> None:
    if _BUILTIN_LOADED[0]:
        return
    _BUILTIN_LOADED[0] = True
    from fedmerge.tasks.byol import BYOLTask
    from fedmerge.tasks.simclr import SimCLRTask
    from fedmerge.tasks.supervised import SupervisedTask

    for task in (BYOLTask(), SimCLRTask(), SupervisedTask()):
        register_task(task)
