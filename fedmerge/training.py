"""Local training and evaluation on in-memory tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedmerge.optim import SGD, Adam, LocalOptimizer

#: Local optimisers of :class:`TrainConfig` (``optimizer``).
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of local training (SGD with momentum, or Adam).

    Attributes
    ----------
    epochs : int (default: 1)
        Passes over the local data; >= 1.
    batch_size : int (default: 32)
        Mini-batch size; >= 1.
    lr : float (default: 0.01)
        Learning rate; > 0.
    momentum : float (default: 0.9)
        SGD momentum in [0, 1).
    weight_decay : float (default: 0.0)
        L2 penalty; >= 0 (added to the gradient, for SGD and Adam alike).
    optimizer : {"sgd", "adam"} (default: "sgd")
        ``"sgd"``: the update of :class:`torch.optim.SGD` with ``momentum``;
        ``"adam"``: that of :class:`torch.optim.Adam` with PyTorch's default
        betas (0.9, 0.999) and eps 1e-8, where ``momentum`` is unused (DIMAT's
        authors train with Adam at ``lr = 0.001``). Both bit for bit, from
        :mod:`fedmerge.optim`.
    pretrain_epochs : int (default: 0)
        Local epochs every client trains, from its starting model, before the
        first merge; >= 0, 0 for none. Server-side strategies: the clients of
        round 1 train ``pretrain_epochs`` epochs instead of ``epochs``. Peer
        strategies: a round 0 of local training only, before round 1's merge.
    independent_init : bool (default: False)
        Server-side strategies: every client of round 1 starts from its own
        seeded initialisation (as peers with ``peer_init = "independent"``)
        instead of the global model; with ``pretrain_epochs`` the server's
        first merge fuses independently trained models (one-shot fusion).
    max_steps : int (default: 0)
        Mini-batches per epoch at most, the first ones of the epoch's shuffled
        order; >= 0, 0 for every mini-batch. A client's weight in averaging is
        still its number of examples.

    Raises
    ------
    ValueError
        If a field is out of range or a float field is not finite; the
        message names the field (``lr: got 0.0; allowed: a finite number > 0``).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    pretrain_epochs: int = 0
    independent_init: bool = False
    max_steps: int = 0

    def __post_init__(self) -> None:
        lr, momentum, decay = self.lr, self.momentum, self.weight_decay
        checks = {
            "epochs": (self.epochs >= 1, "an integer >= 1"),
            "batch_size": (self.batch_size >= 1, "an integer >= 1"),
            "lr": (math.isfinite(lr) and lr > 0, "a finite number > 0"),
            "momentum": (math.isfinite(momentum) and 0 <= momentum < 1, "a number in [0, 1)"),
            "weight_decay": (math.isfinite(decay) and decay >= 0, "a finite number >= 0"),
            "optimizer": (self.optimizer in OPTIMIZERS, ", ".join(OPTIMIZERS)),
            "pretrain_epochs": (self.pretrain_epochs >= 0, "an integer >= 0"),
            "max_steps": (self.max_steps >= 0, "an integer >= 0"),
        }
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{key}: got {getattr(self, key)!r}; allowed: {allowed}")


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train_local` measured."""

    loss: float
    num_examples: int
    num_steps: int


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    generator: torch.Generator,
    prox_mu: float = 0.0,
    global_state: Mapping[str, torch.Tensor] | None = None,
    epochs: int | None = None,
) -> TrainResult:
    r"""Train ``model`` in place with mini-batch SGD (or Adam) on ``(x, y)``.

    Each step minimises the mini-batch cross-entropy, plus FedProx's proximal
    term when ``prox_mu > 0``:

    .. math::

        \ell(w) + \frac{\mu}{2} \lVert w - w_g \rVert_2^2

    Parameters
    ----------
    model : nn.Module
        Model to train; it stays on its device.
    x : Tensor, shape (n, *input_shape)
        Local inputs.
    y : Tensor, shape (n,)
        Local labels.
    config : TrainConfig
        Hyper-parameters.
    generator : torch.Generator
        Shuffles the mini-batches (CPU generator).
    prox_mu : float (default: 0.0)
        FedProx's :math:`\mu` (Li et al., MLSys 2020,
        https://arxiv.org/abs/1812.06127); 0 trains without the proximal term.
    global_state : mapping of str to Tensor, optional
        Weights of the global model :math:`w_g`, required when ``prox_mu > 0``.
    epochs : int, optional
        Passes over the data instead of ``config.epochs`` (local
        pre-training); >= 1.

    Returns
    -------
    TrainResult
        Mean training loss over the samples of the last epoch that were trained
        on (NaN if none were), number of local samples, optimiser steps.

    Raises
    ------
    ValueError
        If ``prox_mu`` is negative or not finite, or positive without
        ``global_state``, or ``epochs`` is below 1.
    """
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs: got {epochs!r}; allowed: an integer >= 1")
    if not (math.isfinite(prox_mu) and prox_mu >= 0):
        raise ValueError(f"prox_mu: got {prox_mu!r}; allowed: a finite number >= 0")
    if prox_mu > 0 and global_state is None:
        raise ValueError(
            f"global_state: got None; required when prox_mu > 0 (prox_mu is {prox_mu!r})"
        )
    device = next(model.parameters()).device
    n = len(y)
    if n == 0:
        return TrainResult(loss=float("nan"), num_examples=0, num_steps=0)
    optimizer = make_optimizer(model, config)
    anchors: list[tuple[nn.Parameter, torch.Tensor]] = []
    if prox_mu > 0 and global_state is not None:
        anchors = [(p, global_state[name].to(device)) for name, p in model.named_parameters()]
    model.train()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    steps = 0
    epoch_loss = float("nan")
    for _ in range(config.epochs if epochs is None else epochs):
        order = torch.randperm(n, generator=generator)
        total = torch.zeros((), device=device)
        seen = 0
        for start in batch_starts(n, config):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2 and has_bn:
                continue  # BatchNorm cannot train on a single sample
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            total += loss.detach() * len(idx)
            seen += len(idx)
            if anchors:
                prox = sum(((p - g) ** 2).sum() for p, g in anchors)
                loss = loss + 0.5 * prox_mu * prox
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            steps += 1
        epoch_loss = float(total) / seen if seen else float("nan")
    return TrainResult(loss=epoch_loss, num_examples=n, num_steps=steps)


def batch_starts(n: int, config: TrainConfig) -> range:
    """Where an epoch's mini-batches start in its shuffled order: at most ``max_steps`` of them."""
    starts = range(0, n, config.batch_size)
    return starts[: config.max_steps] if config.max_steps else starts


def local_epochs(config: TrainConfig, server_round: int, *, peer: bool) -> int:
    """Epochs of local training in ``server_round``: pre-training before the first merge.

    Server-side clients pre-train in round 1 (the server merges after it);
    peers in round 0 (they merge at the start of round 1). Otherwise ``epochs``.
    """
    first = 0 if peer else 1
    if config.pretrain_epochs > 0 and server_round == first:
        return config.pretrain_epochs
    return config.epochs


def make_optimizer(model: nn.Module, config: TrainConfig) -> LocalOptimizer:
    """The local optimiser ``config.optimizer`` over ``model``'s parameters.

    The updates of ``torch.optim.SGD`` and ``torch.optim.Adam``, bit for bit,
    without importing ``torch._dynamo`` (:mod:`fedmerge.optim`).
    """
    if config.optimizer == "adam":
        return Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


#: Evaluation batch on the CPU. A convolutional network's activations of a large
#: batch leave the caches: on a 2-core AMD EPYC, with one or two threads, ResNet-20
#: scored 2,048 samples in 0.47x the time of one 2,048-sample batch, VGG-11 in 0.9x,
#: the simple CNN and the MLP in 1.0-1.3x (`benchmarks/eval_batch.py`).
CPU_EVAL_BATCH = 256

#: Evaluation batch on an accelerator, where a large batch keeps it busy.
DEVICE_EVAL_BATCH = 2048


def eval_batch_size(device: torch.device) -> int:
    """The evaluation batch for ``device``: :data:`CPU_EVAL_BATCH` or :data:`DEVICE_EVAL_BATCH`."""
    return CPU_EVAL_BATCH if device.type == "cpu" else DEVICE_EVAL_BATCH


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None
) -> tuple[float, float]:
    """Return ``(mean cross-entropy loss, accuracy)`` of ``model`` on ``(x, y)``.

    Parameters
    ----------
    model : nn.Module
        Model to evaluate (put in eval mode, left in eval mode).
    x : Tensor, shape (n, *input_shape)
    y : Tensor, shape (n,)
    batch_size : int, optional
        Evaluation batch size; ``None``: :func:`eval_batch_size` of the model's device.
    """
    device = next(model.parameters()).device
    batch_size = eval_batch_size(device) if batch_size is None else batch_size
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, len(y), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    n = max(len(y), 1)
    return float(loss_sum) / n, float(correct) / n
