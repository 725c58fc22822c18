"""The server's evaluation of a self-supervised run's global encoder: k-NN and linear probe.

Every round the global network's encoder features of a seeded, labelled
training subset (``task.eval_samples``) form a memory bank, and the test set
(or a seeded ``task.test_samples`` of it) is classified by cosine k-NN
(``task.knn_k``). The linear probe (logistic regression on the frozen
features of the same subset, scored on the same test samples) runs in round
0, every ``task.eval_every`` rounds and after the last round. The row's
``accuracy`` is the k-NN accuracy (the per-round monitor); its ``loss`` is
NT-Xent (at ``task.temperature``) of the global encoder and projector on two
seeded augmented views of the first 512 test samples.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmerge.data import DatasetBundle
from fedmerge.tasks import augment, augment_config, encode, knn_accuracy, linear_probe, nt_xent
from strategies.config import RunConfig

#: Stream of the seeded subsets (``SeedSequence([seed, EVAL_STREAM, ...])``).
EVAL_STREAM = 5
#: Test samples of the contrastive test loss.
LOSS_SAMPLES = 512


def seeded_test_subset(
    x: torch.Tensor, y: torch.Tensor, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` samples of a test set, drawn without replacement by ``seed`` (in their order).

    The draw depends on the run's seed and the test set's size alone, so
    every strategy and round of a seed is scored on the same samples. ``k``
    0 or at least the test set's size: the whole set.
    """
    n = len(y)
    if k == 0 or k >= n:
        return x, y
    rng = np.random.default_rng([seed, EVAL_STREAM, 1])
    idx = torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False)))
    return x[idx], y[idx]


class EncoderEvaluation:
    """k-NN every round, linear probe every ``eval_every`` rounds, for one run.

    Parameters
    ----------
    config : RunConfig
        The run (its ``task`` section and seed).
    data : DatasetBundle
        Labelled training and test sets.
    model : nn.Module
        Scratch network of the run's task (loaded with each state).
    """

    def __init__(self, config: RunConfig, data: DatasetBundle, model: nn.Module) -> None:
        self.config = config
        self.data = data
        self.model = model

    @cached_property
    def _bank_index(self) -> np.ndarray:
        """Training-set indices of the labelled bank (k-NN) and probe samples, seeded."""
        n, k = len(self.data.train_y), self.config.task.eval_samples
        rng = np.random.default_rng([self.config.seed, EVAL_STREAM, 0])
        return np.sort(rng.choice(n, size=min(k, n), replace=False))

    @cached_property
    def _bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self._bank_index)
        return self.data.train_x[idx], self.data.train_y[idx]

    @cached_property
    def _test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return seeded_test_subset(
            self.data.test_x, self.data.test_y, self.config.task.test_samples, self.config.seed
        )

    def probes(self, server_round: int) -> bool:
        """Whether the linear probe runs after ``server_round``."""
        every = self.config.task.eval_every
        return server_round % every == 0 or server_round == self.config.rounds

    @torch.no_grad()
    def contrastive_loss(self) -> float:
        """NT-Xent of the loaded network on two seeded views of the first test samples."""
        x = self._test[0][:LOSS_SAMPLES]
        if len(x) < 2:
            return float("nan")
        device = next(self.model.parameters()).device
        g = torch.Generator().manual_seed(self.config.seed)
        aug = augment_config(self.config.task)
        x = x.to(device)
        self.model.eval()
        z1 = self.model(augment(x, aug, generator=g))
        z2 = self.model(augment(x, aug, generator=g))
        return float(nt_xent(z1, z2, self.config.task.temperature))

    def knn_on(
        self,
        state: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        exclude: np.ndarray | None = None,
    ) -> float:
        """k-NN accuracy of ``state``'s encoder on ``(x, y)`` (e.g. a client's local data).

        ``exclude``: training-set indices left out of the bank, those of the
        queries themselves (else every query finds itself at similarity 1).
        """
        self.model.load_state_dict(state)
        bank_x, bank_y = self._bank
        if exclude is not None:
            keep = torch.from_numpy(~np.isin(self._bank_index, exclude))
            bank_x, bank_y = bank_x[keep], bank_y[keep]
        return knn_accuracy(
            encode(self.model, bank_x), bank_y, encode(self.model, x), y,
            k=self.config.task.knn_k, num_classes=self.data.num_classes,
        )  # fmt: skip

    def __call__(self, server_round: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The row's fields: ``accuracy`` (k-NN), ``loss``, ``knn_accuracy``, ``linear_probe_*``."""
        self.model.load_state_dict(state)
        task, classes = self.config.task, self.data.num_classes
        bank_x, bank_y = self._bank
        test_x, test_y = self._test
        bank_f, test_f = encode(self.model, bank_x), encode(self.model, test_x)
        knn = knn_accuracy(bank_f, bank_y, test_f, test_y, k=task.knn_k, num_classes=classes)
        probe_loss: float | None = None
        probe_acc: float | None = None
        if self.probes(server_round):
            probe_loss, probe_acc = linear_probe(
                bank_f, bank_y, test_f, test_y, num_classes=classes, steps=task.probe_steps
            )
        return {
            "accuracy": knn,
            "loss": self.contrastive_loss(),
            "knn_accuracy": knn,
            "linear_probe_accuracy": probe_acc,
            "linear_probe_loss": probe_loss,
        }


def encoder_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s fields of a self-supervised run (linear probe and k-NN)."""
    probed = [r for r in rows if r.get("linear_probe_accuracy") is not None]
    out: dict[str, Any] = {
        "initial_knn_accuracy": rows[0].get("knn_accuracy"),
        "final_knn_accuracy": rows[-1].get("knn_accuracy"),
    }
    if probed:
        out.update(
            initial_linear_probe_accuracy=probed[0]["linear_probe_accuracy"],
            final_linear_probe_accuracy=probed[-1]["linear_probe_accuracy"],
            best_linear_probe_accuracy=max(r["linear_probe_accuracy"] for r in probed),
        )
    return out
