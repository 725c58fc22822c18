"""NT-Xent and BYOL's loss against independent, written-out computations."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.tasks import byol_loss, nt_xent


def _nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR's eq. (1), summed over all 2N anchors with Python loops and math.exp.

    l(i, j) = -log( exp(sim(u_i, u_j) / tau) / sum_{k != i} exp(sim(u_i, u_k) / tau) ),
    sim = cosine similarity, L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)].
    """
    rows = [list(map(float, r)) for r in torch.cat([z1, z2])]
    n = len(z1)

    def cos(a: list[float], b: list[float]) -> float:
        dot = sum(p * q for p, q in zip(a, b, strict=True))
        return dot / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))

    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        denom = sum(math.exp(cos(rows[i], rows[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(cos(rows[i], rows[j]) / tau) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_formula_on_a_tiny_batch(tau: float) -> None:
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    got = float(nt_xent(z1, z2, tau))
    assert got == pytest.approx(_nt_xent_by_hand(z1, z2, tau), rel=1e-5)


def test_nt_xent_of_two_orthogonal_pairs_by_hand() -> None:
    # u1 = u1' = e1, u2 = u2' = e2: each anchor sees its positive at cos 1 and
    # two negatives at cos 0 -> l = -log(e^(1/t) / (e^(1/t) + 2))
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([e1, e2])
    tau = 0.5
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    assert float(nt_xent(z, 3 * z, tau)) == pytest.approx(expected, rel=1e-6)


def test_nt_xent_refuses_mismatched_views() -> None:
    with pytest.raises(ValueError, match="z1, z2: got shapes"):
        nt_xent(torch.zeros(2, 3), torch.zeros(3, 3), 0.5)


def test_byol_loss_is_two_minus_two_cosine_and_stops_the_target_gradient() -> None:
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[0.0, 2.0], [2.0, 2.0]], requires_grad=True)
    loss = byol_loss(p, z)
    # pair 1: cos = 0 -> 2; pair 2: cos = 1 -> 0; mean 1
    assert float(loss.detach()) == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    assert z.grad is None and p.grad is not None
