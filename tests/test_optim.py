"""fedmerge's optimisers make torch.optim's updates bit for bit, without torch._dynamo."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedmerge.optim import SGD, Adam, LocalOptimizer
from tests.fresh_python import run_fresh


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    net[1].weight.requires_grad_(False)  # a parameter that never gets a gradient
    return net


def _train(net: nn.Module, optimizer: torch.optim.Optimizer | LocalOptimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=gen)
        y = torch.randint(0, 5, (16,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()


CASES: dict[str, tuple[Callable[..., torch.optim.Optimizer], Callable[..., LocalOptimizer]]] = {
    "sgd": (
        lambda p: torch.optim.SGD(p, lr=0.05),
        lambda p: SGD(p, lr=0.05),
    ),
    "sgd-momentum-decay": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    ),
    "adam": (
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: Adam(p, lr=0.01),
    ),
    "adam-decay": (
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2),
        lambda p: Adam(p, lr=0.01, weight_decay=1e-2),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_updates_equal_torch_optim_bit_for_bit(case: str) -> None:
    theirs, ours = CASES[case]
    a, b = _net(0), _net(0)
    _train(a, theirs(a.parameters()), steps=25)
    _train(b, ours(b.parameters()), steps=25)
    start = _net(0).state_dict()
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    for trained in ("0.weight", "4.weight", "4.bias"):  # the conv's bias feeds BatchNorm
        assert not torch.equal(a.state_dict()[trained], start[trained]), trained
    assert torch.equal(a[1].weight, start["1.weight"])  # no gradient: left alone by both


def test_zero_grad_keeps_or_drops_the_gradient() -> None:
    net = _net(0)
    opt = SGD(net.parameters(), lr=0.1)
    F.cross_entropy(net(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    weight = net[0].weight
    opt.zero_grad(set_to_none=False)
    assert weight.grad is not None and not weight.grad.any()
    opt.zero_grad()
    assert weight.grad is None


def test_an_empty_parameter_list_is_refused() -> None:
    with pytest.raises(ValueError, match="params: got an empty list"):
        Adam([], lr=0.1)


def test_local_training_does_not_import_torch_dynamo() -> None:
    """torch.optim imports torch._dynamo (seconds of CPU) in every process that trains."""
    code = (
        "import sys, torch\n"
        "from fedmerge.training import TrainConfig, train_local\n"
        "for opt in ('sgd', 'adam'):\n"
        "    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))\n"
        "    train_local(net, torch.randn(40, 4, 4), torch.randint(0, 3, (40,)),\n"
        "                TrainConfig(optimizer=opt), generator=torch.Generator().manual_seed(0))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch.optim'))))\n"
    )
    imported = eval(run_fresh(code).strip())  # a list of module names
    assert "torch._dynamo" not in imported, imported
