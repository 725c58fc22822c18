"""OneShotMerge, the one-shot fusion round of the ``oneshot`` strategy, on hand-built clients."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedmerge.align import permutation_spec_for
from fedmerge.models import build_model
from fedmerge.training import TrainConfig, train_local
from strategies.plugins.aligned import ServerModel
from strategies.plugins.oneshot import OneShotMerge


def _data(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))
    y = (x[:, 0] * x[:, 1] > 0).long() + 2 * (x[:, 2] * x[:, 3] > 0).long()
    return x, y


def _client(seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    model = build_model("mlp", input_shape=(10,), num_classes=4, hidden=(32,), seed=seed)
    cfg = TrainConfig(epochs=15, batch_size=32, lr=0.01, optimizer="adam")
    train_local(model, x, y, cfg, generator=torch.Generator().manual_seed(seed))
    return model


def _loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy, written out here rather than taken from fedmerge."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    logp = logits - logits.logsumexp(1, keepdim=True)
    loss = float(-logp[torch.arange(len(y)), y].mean())
    return loss, float((logits.argmax(1) == y).double().mean())


def test_an_aligned_fusion_also_records_the_vanilla_midpoint_of_the_same_clients() -> None:
    x, y = _data()
    xt, yt = _data(400, seed=1)
    a, b = _client(1, x[:300], y[:300]), _client(2, x[300:], y[300:])
    server_model = build_model("mlp", input_shape=(10,), num_classes=4, hidden=(32,), seed=0)
    server = ServerModel(server_model, permutation_spec_for(server_model, x[:2]), [], False)
    merge = OneShotMerge(server, "weight", 0, (xt, yt))
    updates = [SimpleNamespace(partition=p, state=m.state_dict(), num_examples=300)
               for p, m in enumerate((a, b))]  # fmt: skip
    _, extras = merge(1, server_model.state_dict(), updates)  # type: ignore[arg-type]
    fusion = extras["fusion"]
    midpoint = copy.deepcopy(server_model)
    midpoint.load_state_dict({k: (a.state_dict()[k] + b.state_dict()[k]) / 2
                              for k in a.state_dict()})  # fmt: skip
    loss, acc = _loss_acc(midpoint, xt, yt)
    client_losses = [_loss_acc(m, xt, yt)[0] for m in (a, b)]
    assert fusion["vanilla_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert fusion["vanilla_loss"] == pytest.approx(loss, rel=1e-5)
    assert fusion["vanilla_loss_barrier"] == pytest.approx(
        loss - float(np.mean(client_losses)), rel=1e-4, abs=1e-6
    )
    assert fusion["client_loss"] == pytest.approx(client_losses, rel=1e-5)
    assert fusion["loss_barrier"] == pytest.approx(
        fusion["fused_loss"] - float(np.mean(client_losses)), rel=1e-5
    )


def test_vanilla_fusion_records_no_second_vanilla_point() -> None:
    x, y = _data()
    a, b = _client(1, x[:300], y[:300]), _client(2, x[300:], y[300:])
    server_model = build_model("mlp", input_shape=(10,), num_classes=4, hidden=(32,), seed=0)
    server = ServerModel(server_model, permutation_spec_for(server_model, x[:2]), [], False)
    merge = OneShotMerge(server, "average", 0, (x, y))
    updates = [SimpleNamespace(partition=p, state=m.state_dict(), num_examples=300)
               for p, m in enumerate((a, b))]  # fmt: skip
    _, extras = merge(1, server_model.state_dict(), updates)  # type: ignore[arg-type]
    assert "vanilla_accuracy" not in extras["fusion"]
