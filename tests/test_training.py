"""Tests of fedmerge.training: local SGD, FedProx's proximal term and evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

from fedmerge.models import build_model
from fedmerge.training import TrainConfig, evaluate, train_local


def blobs(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well separated Gaussian blobs in 2-D, labels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centres = torch.tensor([[-2.0, -2.0], [2.0, 2.0]])
    x = centres[y] + 0.5 * torch.randn(n, 2, generator=g)
    return x, y


def small_mlp(seed: int = 0) -> nn.Module:
    return build_model("mlp", input_shape=(2,), num_classes=2, hidden=(8,), seed=seed)


def bn_net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- train_local


def test_train_local_reduces_loss_on_separable_data() -> None:
    x, y = blobs()
    model = small_mlp()
    loss0, _ = evaluate(model, x, y)
    cfg = TrainConfig(epochs=5, batch_size=20, lr=0.1, momentum=0.9)
    result = train_local(model, x, y, cfg, generator=gen(0))
    loss1, acc1 = evaluate(model, x, y)
    assert loss1 < 0.5 * loss0
    assert acc1 >= 0.98
    assert result.num_examples == 200
    assert result.num_steps == 5 * math.ceil(200 / 20)
    assert math.isfinite(result.loss) and result.loss < loss0


def test_train_local_is_deterministic_given_the_generator() -> None:
    x, y = blobs()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05)
    a, b, c = small_mlp(), small_mlp(), small_mlp()
    ra = train_local(a, x, y, cfg, generator=gen(7))
    rb = train_local(b, x, y, cfg, generator=gen(7))
    train_local(c, x, y, cfg, generator=gen(8))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k in sa:
        assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert ra.loss == rb.loss
    assert any(not torch.equal(sa[k], sc[k]) for k in sa), "the shuffle order had no effect"


def test_full_batch_momentum_and_weight_decay_match_naive_sgd() -> None:
    """Two full-batch epochs = two steps of SGD with momentum, independent of shuffling."""
    x, y = blobs(40)
    lr, mom, wd = 0.1, 0.9, 0.01
    model = small_mlp()
    ref = copy.deepcopy(model)
    train_local(
        model,
        x,
        y,
        TrainConfig(epochs=2, batch_size=40, lr=lr, momentum=mom, weight_decay=wd),
        generator=gen(0),
    )
    params = [p.detach().clone() for p in ref.parameters()]
    velocity: list[torch.Tensor | None] = [None] * len(params)
    for _ in range(2):
        leaves = [p.clone().requires_grad_(True) for p in params]
        loss = F.cross_entropy(
            torch.func.functional_call(
                ref, dict(zip([n for n, _ in ref.named_parameters()], leaves, strict=True)), (x,)
            ),
            y,
        )
        grads = torch.autograd.grad(loss, leaves)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            d = g + wd * p
            velocity[i] = d if velocity[i] is None else mom * velocity[i] + d
            params[i] = p - lr * velocity[i]
    for got, want in zip(model.parameters(), params, strict=True):
        assert_close(got.detach(), want)


def test_prox_step_matches_naive_gradient_of_ce_plus_prox() -> None:
    x, y = blobs(50)
    mu, lr = 0.7, 0.2
    model = small_mlp(seed=0)
    global_state = {k: v.clone() for k, v in small_mlp(seed=1).state_dict().items()}
    start = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, batch_size=50, lr=lr, momentum=0.0)
    result = train_local(model, x, y, cfg, generator=gen(0), prox_mu=mu, global_state=global_state)
    assert result.num_steps == 1

    # naive: w - lr * d/dw [CE(w) + mu/2 * ||w - w_g||^2], gradient by autograd on a copy
    names = [n for n, _ in start.named_parameters()]
    w = [p.detach().clone().requires_grad_(True) for p in start.parameters()]
    logits = torch.func.functional_call(start, dict(zip(names, w, strict=True)), (x,))
    prox = sum(((p - global_state[n]) ** 2).sum() for n, p in zip(names, w, strict=True))
    objective = F.cross_entropy(logits, y) + mu / 2 * prox
    grads = torch.autograd.grad(objective, w)
    for n, got, p, g in zip(names, model.parameters(), w, grads, strict=True):
        assert_close(got.detach(), (p - lr * g).detach(), msg=f"parameter {n}")

    # and by hand: the prox term adds -lr * mu * (w - w_g) to the plain step
    plain = copy.deepcopy(start)
    train_local(
        plain, x, y, TrainConfig(epochs=1, batch_size=50, lr=lr, momentum=0.0), generator=gen(0)
    )
    for n, got, base, w0 in zip(
        names, model.parameters(), plain.parameters(), start.parameters(), strict=True
    ):
        assert_close(got.detach() - base.detach(), -lr * mu * (w0.detach() - global_state[n]))
    # the global weights are not touched
    for k, v in small_mlp(seed=1).state_dict().items():
        assert_close(global_state[k], v, rtol=0, atol=0)


def test_prox_without_global_state_is_rejected() -> None:
    x, y = blobs(10)
    with pytest.raises(ValueError, match=r"global_state: got None; required when prox_mu > 0"):
        train_local(small_mlp(), x, y, TrainConfig(), generator=gen(0), prox_mu=0.1)


@pytest.mark.parametrize("mu", [-0.5, float("inf"), float("nan")])
def test_bad_prox_mu_is_rejected_before_training(mu: float) -> None:
    x, y = blobs(10)
    model = small_mlp()
    before = copy.deepcopy(model.state_dict())
    state = {k: v.clone() for k, v in before.items()}
    with pytest.raises(ValueError, match=r"prox_mu: got .*; allowed: a finite number >= 0") as info:
        train_local(model, x, y, TrainConfig(), generator=gen(0), prox_mu=mu, global_state=state)
    assert repr(mu) in str(info.value)
    assert not str(info.value).startswith("train.")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_zero_prox_mu_equals_plain_training() -> None:
    x, y = blobs(40)
    a, b = small_mlp(seed=0), small_mlp(seed=0)
    other = {k: v + 1 for k, v in small_mlp(seed=1).state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.1)
    train_local(a, x, y, cfg, generator=gen(3))
    train_local(b, x, y, cfg, generator=gen(3), prox_mu=0.0, global_state=other)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_empty_client_trains_nothing() -> None:
    model = small_mlp()
    before = copy.deepcopy(model.state_dict())
    result = train_local(
        model, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), TrainConfig(), generator=gen(0)
    )
    assert result.num_examples == 0 and result.num_steps == 0 and math.isnan(result.loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_batchnorm_skips_single_sample_batch_and_reports_mean_of_trained_batches() -> None:
    """n=3, batch 2, BatchNorm: one step on 2 samples, the lone last sample is skipped.

    The reported loss is documented as the mean training loss; it must be the mean
    over the samples that were trained on, not their sum divided by n.
    """
    x, y = blobs(3)
    model = bn_net()
    start = copy.deepcopy(model)
    result = train_local(
        model, x, y, TrainConfig(epochs=1, batch_size=2, lr=0.1, momentum=0.0), generator=gen(4)
    )
    assert result.num_steps == 1
    order = torch.randperm(3, generator=gen(4))  # the documented use of the generator
    start.train()
    with torch.no_grad():
        expected = F.cross_entropy(start(x[order[:2]]), y[order[:2]]).item()
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_batchnorm_single_sample_client_reports_no_loss() -> None:
    """A BatchNorm model with one sample takes no step: like n=0, the loss is NaN, not 0."""
    x, y = blobs(1)
    result = train_local(bn_net(), x, y, TrainConfig(batch_size=4), generator=gen(0))
    assert result.num_steps == 0
    assert math.isnan(result.loss), f"reported loss {result.loss} for a client that never trained"


# --------------------------------------------------------------------------- evaluate


def _naive_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(len(y)):
            logits = model(x[i : i + 1])[0]
            log_p = logits - torch.logsumexp(logits, 0)
            total += -float(log_p[y[i]])
            best = max(range(len(logits)), key=lambda c: float(logits[c]))
            correct += int(best == int(y[i]))
    return total / len(y), correct / len(y)


@pytest.mark.parametrize("factory", [small_mlp, bn_net], ids=["mlp", "batchnorm"])
def test_evaluate_matches_naive_per_sample_loop(factory) -> None:
    x, y = blobs(53, seed=3)
    y = y if factory is small_mlp else torch.arange(53) % 3
    model = factory()
    # a few training steps so that BatchNorm's running statistics are not trivial
    train_local(model, x, y, TrainConfig(epochs=1, batch_size=8, lr=0.05), generator=gen(0))
    loss, acc = evaluate(model, x, y, batch_size=7)
    want_loss, want_acc = _naive_eval(copy.deepcopy(model), x, y)
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert acc == pytest.approx(want_acc)
    assert 0.0 < acc <= 1.0
    assert not model.training, "evaluate leaves the model in eval mode"


def test_evaluate_hand_worked() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # logits = x
    x = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    y = torch.tensor([0, 0, 0])
    # per sample: log 2 (tie: argmax picks class 0), log(4/3) right, log 4 wrong
    loss, acc = evaluate(model, x, y)
    assert_close(loss, (math.log(2) + math.log(4 / 3) + math.log(4)) / 3)
    assert acc == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", -0.1),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", -1e-4),
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("momentum", float("nan")),
        ("weight_decay", float("inf")),
    ],
)
def test_train_config_rejects_bad_values(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{key}: got {value!r}; allowed: ") as info:
        TrainConfig(**{key: value})
    assert "train." not in str(info.value)


def test_train_config_has_no_prox_mu() -> None:
    with pytest.raises(TypeError, match="prox_mu"):
        TrainConfig(prox_mu=0.1)  # type: ignore[call-arg]


def test_train_config_accepts_boundaries() -> None:
    cfg = TrainConfig(epochs=1, batch_size=1, lr=1e-6, momentum=0.0, weight_decay=0.0)
    assert (cfg.epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay) == (1, 1, 0.0, 0.0)


@pytest.mark.parametrize(("max_steps", "expected_batches"), [(0, 13), (5, 5), (13, 13), (50, 13)])
def test_max_steps_trains_the_first_batches_of_each_epochs_order(
    max_steps: int, expected_batches: int
) -> None:
    # 100 samples, batches of 8: 13 per epoch (the last one of 4).
    n, epochs, seed = 100, 2, 7
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)  # each sample is its own index
    y = torch.zeros(n, dtype=torch.long)
    seen: list[list[int]] = []
    model = nn.Linear(1, 2)
    model.register_forward_hook(
        lambda _m, inputs, _out: seen.append(inputs[0][:, 0].long().tolist())
    )
    config = TrainConfig(epochs=epochs, batch_size=8, lr=0.01, max_steps=max_steps)
    result = train_local(model, x, y, config, generator=torch.Generator().manual_seed(seed))

    # The same orders, drawn independently: epoch e's batches are its first slices of 8.
    gen = torch.Generator().manual_seed(seed)
    expected: list[list[int]] = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        expected += [order[8 * b : 8 * b + 8] for b in range(expected_batches)]
    assert seen == expected
    assert result.num_steps == epochs * expected_batches
    assert result.num_examples == n  # the averaging weight stays the data set's size


def test_negative_max_steps_is_refused_with_its_key() -> None:
    with pytest.raises(ValueError, match=r"max_steps: got -1; allowed: an integer >= 0"):
        TrainConfig(max_steps=-1)
