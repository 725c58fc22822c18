"""Tests of merge_many (anchor and MergeMany references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fedmerge.align import (
    apply_permutation,
    count_moved_units,
    mlp_spec,
    permutation_spec_for,
    random_permutation,
)
from fedmerge.merge import merge_many, weighted_average
from fedmerge.models import MLP, build_model


def _copies(model: torch.nn.Module, spec, count: int, noise: float):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    base = model.state_dict()
    states = [base]
    for _ in range(count - 1):
        perm = random_permutation(spec, base, generator=gen)
        state = apply_permutation(spec, perm, base)
        states.append(
            {
                k: v + noise * v.std() * torch.randn(v.shape, generator=gen)
                if v.is_floating_point() and v.numel() > 1
                else v
                for k, v in state.items()
            }
        )
    return states


@pytest.mark.parametrize("reference", ["anchor", "mean"])
def test_permuted_copies_merge_back_into_the_original(reference: str) -> None:
    model = MLP((6,), 3, hidden=(16, 12))
    spec = mlp_spec(model)
    states = _copies(model, spec, 4, noise=0.0)
    merged, info = merge_many(spec, states, reference=reference, rng=np.random.default_rng(0))
    for key, value in states[0].items():
        assert_close(merged[key], value)
    assert info.converged
    assert count_moved_units(info.perms[0]) == {"P_layers.0": 0, "P_layers.1": 0}
    assert all(sum(count_moved_units(p).values()) > 0 for p in info.perms[1:])
    naive = weighted_average(states)  # without alignment the mean is far from the original
    assert float((naive["layers.0.weight"] - states[0]["layers.0.weight"]).abs().max()) > 0.1


def test_noisy_copies_merge_close_to_the_original_with_weights() -> None:
    model = MLP((6,), 3, hidden=(16, 12))
    spec = mlp_spec(model)
    states = _copies(model, spec, 3, noise=0.05)
    merged, info = merge_many(spec, states, [2.0, 1.0, 1.0], reference="mean", anchor=0)
    error = (merged["layers.1.weight"] - states[0]["layers.1.weight"]).abs().max()
    assert float(error) < 0.05 * float(states[0]["layers.1.weight"].std()) * 3
    assert info.rounds >= 1


def test_batchnorm_statistics_are_re_estimated() -> None:
    model = build_model("resnet20", input_shape=(1, 8, 8), num_classes=3, seed=0)
    spec = permutation_spec_for(model)
    states = _copies(model, spec, 2, noise=0.0)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    with pytest.raises(ValueError, match=r"batches: got None.*reset_bn=False"):
        merge_many(spec, states, model=model)
    with pytest.raises(ValueError, match=r"batches: got no batch.*reset_bn=False"):
        merge_many(spec, states, model=model, batches=iter([]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged, info = merge_many(spec, states, reference="anchor", model=model, batches=batches)
    assert info.bn_reset
    assert int(merged["bn1.num_batches_tracked"]) == 2
    # the init statistics (mean 0) are replaced by the merged model's own
    assert float(merged["layer2.0.bn1.running_mean"].abs().max()) > 0
    assert float(states[0]["layer2.0.bn1.running_mean"].abs().max()) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # not modified
    kept, info = merge_many(spec, states, reference="anchor", reset_bn=False)
    assert not info.bn_reset
    assert_close(kept["layer2.0.bn1.running_var"], states[0]["layer2.0.bn1.running_var"])


def test_options_are_validated() -> None:
    model = MLP((2,), 2, hidden=(3,))
    spec, states = mlp_spec(model), [model.state_dict()] * 2
    with pytest.raises(ValueError, match=r"reference: got 'median'"):
        merge_many(spec, states, reference="median")
    with pytest.raises(ValueError, match=r"anchor: got 2"):
        merge_many(spec, states, anchor=2)
    with pytest.raises(ValueError, match=r"max_rounds: got 0"):
        merge_many(spec, states, max_rounds=0)
