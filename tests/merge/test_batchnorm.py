"""Tests of BatchNorm re-estimation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fedmerge.merge import has_batchnorm, reset_bn_state, reset_bn_stats


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU())


def test_statistics_are_the_cumulative_average_over_batches() -> None:
    model = _model()
    batches = [torch.randn(4, 2, 5, 5) * (i + 1) + i for i in range(3)]
    with torch.no_grad():
        outs = [model[0](x) for x in batches]
    # naive: per-batch mean and unbiased variance per channel, averaged over batches
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).reshape(3, -1).var(1) for o in outs]).mean(0)
    weight = model[0].weight.detach().clone()
    model.eval()
    reset_bn_stats(model, [(x, torch.zeros(4)) for x in batches])
    assert_close(model[1].running_mean, means)
    assert_close(model[1].running_var, variances)
    assert int(model[1].num_batches_tracked) == 3
    assert model[1].momentum == 0.3
    assert not model.training
    assert torch.equal(model[0].weight, weight)


def test_model_without_batchnorm_is_unchanged() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reset_bn_stats(model, [torch.randn(3, 2)]) is model
    assert not has_batchnorm(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_empty_batches_are_refused_before_anything_is_reset() -> None:
    model = _model()
    model.train()
    model(torch.randn(4, 2, 5, 5))
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="batches: got no batch"):
        reset_bn_stats(model, iter([]))
    assert torch.equal(model[1].running_mean, before)
    assert has_batchnorm(model)


def test_reset_bn_state_works_on_a_copy() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in before.items()}
    state["0.weight"] = state["0.weight"] * 2  # a state other than the model's own
    batches = [torch.randn(4, 2, 5, 5) + i for i in range(2)]
    with torch.no_grad():
        outs = [nn.functional.conv2d(x, state["0.weight"], state["0.bias"]) for x in batches]
    got = reset_bn_state(model, state, batches)
    # naive: the statistics of the state's own conv outputs, averaged over the batches
    assert_close(got["1.running_mean"], torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0))
    variances = [o.transpose(0, 1).reshape(3, -1).var(1) for o in outs]
    assert_close(got["1.running_var"], torch.stack(variances).mean(0))
    assert int(got["1.num_batches_tracked"]) == 2
    assert torch.equal(got["0.weight"], state["0.weight"])
    assert got["0.weight"] is not state["0.weight"]
    assert not any(v.requires_grad for v in got.values())
    for key, value in model.state_dict().items():  # the model is untouched
        assert torch.equal(value, before[key])
    assert torch.equal(state["1.running_mean"], before["1.running_mean"])


def test_reset_bn_state_without_batchnorm_or_batches_keeps_the_state() -> None:
    plain = nn.Sequential(nn.Linear(2, 2))
    state = {k: v.clone() + 1 for k, v in plain.state_dict().items()}
    got = reset_bn_state(plain, state, [torch.randn(3, 2)])
    assert got == state  # same tensors
    assert got is not state
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = reset_bn_state(model, state, iter([]))
    assert all(got[k] is state[k] for k in state)
