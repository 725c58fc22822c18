"""Tests of fedmerge.align.permute, against hand-indexed tensors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fedmerge.align import (
    PermAxis,
    PermutationSpec,
    apply_permutation,
    count_moved_units,
    identity_permutation,
    invert_permutation,
    random_permutation,
)

SPEC = PermutationSpec(
    {
        "conv.weight": ("C", None, None, None),
        "conv.bias": ("C",),
        "fc.weight": ("H", PermAxis("C", 4)),
        "fc.bias": ("H",),
        "head.weight": (None, "H"),
        "head.bias": (None,),
        "count": (),
    }
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "conv.weight": (3, 2, 1, 1),
        "conv.bias": (3,),
        "fc.weight": (5, 12),
        "fc.bias": (5,),
        "head.weight": (2, 5),
        "head.bias": (2,),
    }
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    state["count"] = torch.tensor(7)
    return state


def test_apply_matches_hand_indexing() -> None:
    state = _state()
    c, h = torch.tensor([2, 0, 1]), torch.tensor([4, 3, 0, 1, 2])
    out = apply_permutation(SPEC, {"C": c, "H": h}, state)
    # fc reads 3 channels x 4 pixels: column block k*4..k*4+3 belongs to channel k
    cols = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7])
    assert_close(out["conv.weight"], state["conv.weight"][[2, 0, 1]])
    assert_close(out["conv.bias"], state["conv.bias"][[2, 0, 1]])
    assert_close(out["fc.weight"], state["fc.weight"][[4, 3, 0, 1, 2]][:, cols])
    assert_close(out["fc.bias"], state["fc.bias"][[4, 3, 0, 1, 2]])
    assert_close(out["head.weight"], state["head.weight"][:, [4, 3, 0, 1, 2]])
    assert out["head.bias"] is state["head.bias"]
    assert out["count"] is state["count"]


def test_inverse_undoes_and_identity_keeps() -> None:
    state = _state()
    perm = random_permutation(SPEC, state, generator=torch.Generator().manual_seed(3))
    back = apply_permutation(SPEC, invert_permutation(perm), apply_permutation(SPEC, perm, state))
    for key, value in state.items():
        assert_close(back[key], value)
    same = apply_permutation(SPEC, identity_permutation(SPEC, state), state)
    for key, value in state.items():
        assert_close(same[key], value)


def test_random_permutation_is_seeded() -> None:
    state = _state()
    p1 = random_permutation(SPEC, state, generator=torch.Generator().manual_seed(5))
    p2 = random_permutation(SPEC, state, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert sorted(p1["H"].tolist()) == [0, 1, 2, 3, 4]


def test_count_moved_units_counts_non_fixed_points() -> None:
    perm = {"A": torch.tensor([0, 2, 1, 3]), "B": torch.arange(3), "C": torch.tensor([1, 2, 0])}
    assert count_moved_units(perm) == {"A": 2, "B": 0, "C": 3}


def test_missing_permutation_is_named() -> None:
    with pytest.raises(ValueError, match="missing permutation 'H'"):
        apply_permutation(SPEC, {"C": torch.arange(3)}, _state())


@pytest.mark.parametrize(
    "bad", [torch.tensor([0, 0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1, 3])]
)
def test_non_permutation_is_refused(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"perm\['C'\]"):
        apply_permutation(SPEC, {"C": bad, "H": torch.arange(5)}, _state())
