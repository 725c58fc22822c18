"""k-NN and linear-probe evaluation of frozen features."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedmerge.tasks import encode, knn_accuracy, linear_probe


def test_linear_probe_on_one_hot_labels_is_perfect() -> None:
    g = torch.Generator().manual_seed(0)
    train_y = torch.randint(0, 10, (500,), generator=g)
    test_y = torch.randint(0, 10, (300,), generator=g)
    _, acc = linear_probe(
        F.one_hot(train_y, 10).float(), train_y, F.one_hot(test_y, 10).float(), test_y,
        num_classes=10,
    )  # fmt: skip
    assert acc == 1.0


def test_linear_probe_on_random_features_is_about_chance() -> None:
    g = torch.Generator().manual_seed(1)
    train_y = torch.randint(0, 10, (1000,), generator=g)
    test_y = torch.randint(0, 10, (2000,), generator=g)
    _, acc = linear_probe(
        torch.randn(1000, 32, generator=g), train_y, torch.randn(2000, 32, generator=g), test_y,
        num_classes=10,
    )  # fmt: skip
    # chance is 0.1; a binomial with n = 2000 has a standard deviation of 0.0067
    assert 0.06 < acc < 0.14


def _knn_by_hand(bank, bank_y, query, k, num_classes):  # type: ignore[no-untyped-def]
    preds = []
    for q in query:
        sims = [float(q @ b) / float(q.norm() * b.norm()) for b in bank]
        top = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in top:
            votes[int(bank_y[j])] += max(sims[j], 0.0)  # a neighbour of negative cosine: no vote
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return preds


def test_knn_accuracy_matches_a_hand_written_vote() -> None:
    g = torch.Generator().manual_seed(2)
    bank, bank_y = torch.randn(40, 5, generator=g), torch.randint(0, 4, (40,), generator=g)
    query = torch.randn(25, 5, generator=g)
    preds = _knn_by_hand(bank, bank_y, query, 7, 4)
    query_y = torch.tensor(preds)
    query_y[:5] = (query_y[:5] + 1) % 4  # five wrong labels: accuracy 20/25
    assert knn_accuracy(bank, bank_y, query, query_y, k=7, num_classes=4) == pytest.approx(0.8)


def test_knn_with_k_one_finds_the_scaled_copy() -> None:
    bank = torch.eye(3)
    bank_y = torch.tensor([2, 0, 1])
    query = 5 * torch.eye(3)  # cosine ignores the scale
    assert knn_accuracy(bank, bank_y, query, bank_y, k=1, num_classes=3) == 1.0


def test_encode_uses_the_encoder_features_when_the_network_has_them() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * 0

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    x = torch.arange(6.0).view(3, 2)
    torch.testing.assert_close(encode(Net(), x, batch_size=2), x + 1)
