"""Evaluation of an encoder: k-NN accuracy (cosine) and linear-probe accuracy on frozen features."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def encode(net: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """Features of ``x``: ``net.features`` when the network has it (an encoder), else ``net``.

    The network is put in eval mode; the features come back on the CPU, shape (n, d).
    """
    device = next(net.parameters()).device
    net.eval()
    fn = getattr(net, "features", net)
    out = [
        torch.flatten(fn(x[s : s + batch_size].to(device)), 1).cpu()
        for s in range(0, len(x), batch_size)
    ]
    return torch.cat(out) if out else x.new_zeros((0, 0))


def knn_accuracy(
    bank: torch.Tensor,
    bank_y: torch.Tensor,
    query: torch.Tensor,
    query_y: torch.Tensor,
    *,
    k: int,
    num_classes: int,
    batch_size: int = 1024,
) -> float:
    r"""Accuracy of a k-nearest-neighbour classifier with cosine similarity.

    Each query takes the :math:`k` bank features of highest cosine similarity;
    class :math:`c` scores :math:`\sum_{j \in \text{top-}k,\, y_j = c} \max(s_j, 0)`
    (votes weighted by similarity; a neighbour of negative similarity does
    not vote, so that it cannot rank its class below a class without votes)
    and the highest score wins (the lowest class index on a tie).

    Parameters
    ----------
    bank : Tensor, shape (m, d)
        Features of the labelled memory bank.
    bank_y : Tensor, shape (m,)
        Its labels.
    query : Tensor, shape (n, d)
        Features to classify.
    query_y : Tensor, shape (n,)
        Their labels.
    k : int
        Neighbours (at most ``m`` are used).
    num_classes : int
        Number of classes.
    """
    bank_n = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank_n))
    correct = 0
    for s in range(0, len(query), batch_size):
        q = F.normalize(query[s : s + batch_size].float(), dim=1)
        sim, idx = (q @ bank_n.T).topk(k, dim=1)
        scores = q.new_zeros(len(q), num_classes)
        scores.scatter_add_(1, bank_y[idx], sim.clamp_min(0))  # a negative vote is no vote
        correct += int((scores.argmax(1) == query_y[s : s + batch_size]).sum())
    return correct / max(len(query), 1)


def linear_probe(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int,
    steps: int = 100,
    weight_decay: float = 1e-4,
) -> tuple[float, float]:
    r"""Train a logistic regression on frozen features; return its test ``(loss, accuracy)``.

    Features are standardised with the training set's mean and standard
    deviation; the linear classifier starts at zero and minimises
    :math:`\frac{1}{n}\sum_i \mathrm{CE}(W f_i + b, y_i) + \lambda \lVert W \rVert_2^2`
    with full-batch L-BFGS (strong Wolfe line search), so the result is
    deterministic.

    Parameters
    ----------
    train_f : Tensor, shape (n, d)
        Frozen features of the labelled training subset.
    train_y : Tensor, shape (n,)
        Its labels.
    test_f : Tensor, shape (m, d)
        Features of the test set.
    test_y : Tensor, shape (m,)
        Its labels.
    num_classes : int
        Number of classes.
    steps : int (default: 100)
        L-BFGS iterations.
    weight_decay : float (default: 1e-4)
        :math:`\lambda`.
    """
    mean = train_f.mean(0, keepdim=True)
    std = (
        train_f.std(0, keepdim=True).clamp_min(1e-6) if len(train_f) > 1 else torch.ones_like(mean)
    )
    xtr, xte = (train_f - mean) / std, (test_f - mean) / std
    w = torch.zeros(num_classes, xtr.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w.T + b, train_y) + weight_decay * (w**2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        logits = xte @ w.T + b
        loss = float(F.cross_entropy(logits, test_y)) if len(test_y) else float("nan")
        correct = int((logits.argmax(1) == test_y).sum())
        acc = correct / len(test_y) if len(test_y) else float("nan")
    return loss, acc
