"""Diagonal Fisher against a loop of per-sample backward passes; Fisher merging by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.merge import diagonal_fisher, fisher_merge


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)  # eval-mode BatchNorm must use these
    model[1].running_var.uniform_(0.5, 2.0)
    return model


def _loop_fisher(model: nn.Module, x: torch.Tensor, label_sets) -> dict[str, torch.Tensor]:
    """Sum over samples n and (label c, weight q) in label_sets[n] of q * grad log p(c|x_n)^2."""
    model.eval()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for n in range(len(x)):
        for c, q in label_sets[n]:
            model.zero_grad()
            F.log_softmax(model(x[n : n + 1]), dim=-1)[0, c].backward()
            for name, p in model.named_parameters():
                total[name] += q * p.grad.square()
    return {name: t / len(x) for name, t in total.items()}


def test_empirical_fisher_is_the_mean_of_squared_per_sample_gradients() -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    model.train()
    got = diagonal_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])], labels="empirical")
    assert model.training  # mode restored
    expected = _loop_fisher(model, x, [[(int(c), 1.0)] for c in y])
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


def test_exact_fisher_takes_the_expectation_over_classes() -> None:
    model = _model()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    got = diagonal_fisher(model, [x], labels="exact")
    model.eval()
    with torch.no_grad():
        probs = F.softmax(model(x), dim=-1)
    expected = _loop_fisher(model, x, [[(c, float(probs[n, c])) for c in range(3)]
                                       for n in range(5)])  # fmt: skip
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


def test_sampled_fisher_uses_labels_drawn_from_the_model() -> None:
    model = _model()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    got = diagonal_fisher(model, [x], labels="sampled", generator=torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad():
        probs = F.softmax(model(x), dim=-1)
    drawn = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(9)).squeeze(1)
    expected = _loop_fisher(model, x, [[(int(c), 1.0)] for c in drawn])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


def test_fisher_needs_labels_for_the_empirical_fisher() -> None:
    with pytest.raises(ValueError, match="labels='empirical'"):
        diagonal_fisher(_model(), [torch.randn(2, 4)], labels="empirical")
    with pytest.raises(ValueError, match="labels: got 'true'"):
        diagonal_fisher(_model(), [torch.randn(2, 4)], labels="true")


def _states() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [
        {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g),
         "bn.running_var": torch.rand(3, generator=g), "bn.num_batches_tracked": torch.tensor(k)}
        for k in (2, 5, 9)
    ]  # fmt: skip


def test_fisher_merge_with_equal_fishers_is_the_weighted_mean() -> None:
    states, w = _states(), [1.0, 2.0, 5.0]
    g = torch.Generator().manual_seed(5)
    fisher = {"w": torch.rand(2, 3, generator=g), "b": torch.rand(3, generator=g)}
    out = fisher_merge(states, [fisher] * 3, w)
    share = np.array(w) / 8
    for name in ("w", "b", "bn.running_var"):
        mean = sum(c * s[name].double().numpy() for c, s in zip(share, states, strict=True))
        np.testing.assert_allclose(out[name].numpy(), mean, rtol=1e-5, atol=1e-6)
    assert out["bn.num_batches_tracked"].item() == round(2 / 8 + 10 / 8 + 45 / 8)


def test_fisher_merge_by_hand() -> None:
    states = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 4.0])}]
    fishers = [{"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}]
    out = fisher_merge(states, fishers, normalise_fishers=False)
    # (0 * 3 + 1 * 1) / 4; the second parameter: both Fishers floored at eps -> the mean
    torch.testing.assert_close(out["w"], torch.tensor([0.25, 2.0]))
    # normalised by the norms 3 and 1 after the floor: (1, eps / 3) and (1, eps): the first
    # parameter is the mean, the second weighs the models 1/4 and 3/4
    out = fisher_merge(states, fishers, normalise_fishers=True)
    torch.testing.assert_close(out["w"], torch.tensor([0.5, 3.0]))
    # only the first Fisher floored: the second parameter is the first model's
    out = fisher_merge(states, fishers, normalise_fishers=False, floor="first")
    torch.testing.assert_close(out["w"], torch.tensor([0.25, 0.0]))


def test_fisher_merge_rejects_bad_fishers() -> None:
    states = _states()[:2]
    with pytest.raises(ValueError, match="fishers: got 1 Fishers for 2"):
        fisher_merge(states, [{"w": torch.ones(2, 3)}])
    with pytest.raises(ValueError, match=r"fishers\[1\].w: got negative"):
        fisher_merge(states, [{"w": torch.ones(2, 3)}, {"w": -torch.ones(2, 3)}])
    with pytest.raises(ValueError, match="eps: got 0.0"):
        fisher_merge(states, [{"w": torch.ones(2, 3)}] * 2, eps=0.0)
