"""Tests of fedmerge.training's regime options: Adam, and epochs overridden to pre-train."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

from fedmerge.models import build_model
from fedmerge.training import TrainConfig, train_local


def blobs(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centres = torch.tensor([[-2.0, -2.0], [2.0, 2.0]])
    return centres[y] + 0.5 * torch.randn(n, 2, generator=g), y


def small_mlp(seed: int = 0) -> nn.Module:
    return build_model("mlp", input_shape=(2,), num_classes=2, hidden=(8,), seed=seed)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_defaults_are_unchanged_sgd_without_pretraining() -> None:
    cfg = TrainConfig()
    assert (cfg.optimizer, cfg.pretrain_epochs) == ("sgd", 0)


def test_adam_matches_the_explicit_formula_over_three_full_batch_steps() -> None:
    """Adam (Kingma & Ba): m, v moments, bias correction, L2 decay added to the gradient."""
    x, y = blobs()
    lr, wd, b1, b2, eps = 0.001, 0.01, 0.9, 0.999, 1e-8
    model = small_mlp()
    ref = copy.deepcopy(model)
    cfg = TrainConfig(epochs=3, batch_size=40, lr=lr, weight_decay=wd, optimizer="adam")
    result = train_local(model, x, y, cfg, generator=gen(0))
    assert result.num_steps == 3
    names = [n for n, _ in ref.named_parameters()]
    params = [p.detach().clone().double() for p in ref.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 4):
        leaves = [p.float().requires_grad_(True) for p in params]
        logits = torch.func.functional_call(ref, dict(zip(names, leaves, strict=True)), (x,))
        grads = torch.autograd.grad(F.cross_entropy(logits, y), leaves)
        for i, g in enumerate(grads):
            d = g.double() + wd * params[i]
            m[i] = b1 * m[i] + (1 - b1) * d
            v[i] = b2 * v[i] + (1 - b2) * d * d
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            params[i] = params[i] - lr * m_hat / (v_hat.sqrt() + eps)
    for got, want in zip(model.parameters(), params, strict=True):
        assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_adam_first_step_moves_every_weight_by_about_lr() -> None:
    """At t = 1 Adam's step is lr * g / (|g| + eps): about lr wherever the gradient is not 0."""
    x, y = blobs()
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=40, lr=0.05, optimizer="adam")
    train_local(model, x, y, cfg, generator=gen(0))
    pairs = zip(model.parameters(), before, strict=True)
    steps = torch.cat([(p.detach() - b).abs().flatten() for p, b in pairs])
    moved = steps[steps > 0]
    assert len(moved) > 0.5 * len(steps)
    assert_close(moved, torch.full_like(moved, 0.05), rtol=1e-3, atol=1e-4)


def test_sgd_and_adam_differ() -> None:
    x, y = blobs()
    a, b = small_mlp(), small_mlp()
    train_local(a, x, y, TrainConfig(epochs=1, batch_size=40, lr=0.05), generator=gen(0))
    cfg = TrainConfig(epochs=1, batch_size=40, lr=0.05, optimizer="adam")
    train_local(b, x, y, cfg, generator=gen(0))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_epochs_argument_overrides_config_epochs() -> None:
    x, y = blobs(40)
    cfg = TrainConfig(epochs=1, batch_size=8)
    result = train_local(small_mlp(), x, y, cfg, generator=gen(0), epochs=4)
    assert result.num_steps == 4 * math.ceil(40 / 8)
    with pytest.raises(ValueError, match=r"^epochs: got 0; allowed: an integer >= 1$"):
        train_local(small_mlp(), x, y, cfg, generator=gen(0), epochs=0)


@pytest.mark.parametrize(("key", "value"), [("optimizer", "rmsprop"), ("pretrain_epochs", -1)])
def test_regime_fields_are_validated(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{key}: got {value!r}; allowed: "):
        TrainConfig(**{key: value})  # type: ignore[arg-type]
