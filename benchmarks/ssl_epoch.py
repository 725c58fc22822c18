"""One self-supervised client epoch: fedmerge's task against a bare PyTorch loop.

Both train the same network (the simple CNN without its classifier plus a
projection MLP, or ResNet-20's encoder) on the same Fashion-MNIST samples
with SGD, two augmented views per batch (random resized crop and flip by one
``affine_grid``/``grid_sample``, brightness and contrast), and the SimCLR
NT-Xent loss or BYOL's loss with an EMA target and a predictor. The bare loop
writes all of it inline, without fedmerge's task, config or helper code.
The script prints the median epoch time of each (runs interleaved, the order
alternating), their ratio, and the share of fedmerge's epoch spent on
augmentation alone. Times are the process's CPU time by default (``--clock
cpu``; with one torch thread that is the compute, whatever else runs on a
shared machine), or wall-clock time (``--clock wall``).

Run:  .venv/bin/python benchmarks/ssl_epoch.py [--task simclr|byol]
      [--model simple-cnn|resnet20] [--samples 2000] [--batch-size 128]
      [--repeats 5] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from fedmerge.data import DatasetConfig, load_dataset_config
from fedmerge.models import build_model
from fedmerge.tasks import TaskConfig, augment, augment_config, get_task, mlp_head
from fedmerge.training import TrainConfig


def bare_view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Crop (area 0.5-1, ratio 3/4-4/3), flip, contrast 0.6-1.4, brightness +-0.4, inline."""
    n = x.shape[0]
    area = 0.5 + 0.5 * torch.rand(n, generator=g)
    ratio = torch.exp(
        math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=g)
    )
    sx, sy = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    tx = (2 * torch.rand(n, generator=g) - 1) * (1 - sx)
    ty = (2 * torch.rand(n, generator=g) - 1) * (1 - sy)
    flip = torch.rand(n, generator=g) < 0.5
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = torch.where(flip, -sx, sx), tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    out = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False),
                        padding_mode="border", align_corners=False)  # fmt: skip
    c = (0.6 + 0.8 * torch.rand(n, generator=g)).view(n, 1, 1, 1)
    b = (-0.4 + 0.8 * torch.rand(n, generator=g)).view(n, 1, 1, 1)
    m = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - m) * c + m + b


def bare_epoch(task: str, net: nn.Module, x: torch.Tensor, bs: int, lr: float, seed: int) -> None:
    """The same epoch as fedmerge's task, written out."""
    g = torch.Generator().manual_seed(seed)
    predictor, target = None, None
    params = list(net.parameters())
    if task == "byol":
        target = copy.deepcopy(net).requires_grad_(False)
        predictor = mlp_head((128, 512, 128))
        params += list(predictor.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    net.train()
    order = torch.randperm(len(x), generator=g)
    for s in range(0, len(x), bs):
        xb = x[order[s : s + bs]]
        b = len(xb)
        views = torch.cat([bare_view(xb, g), bare_view(xb, g)])
        if predictor is None or target is None:
            z = F.normalize(net(views), dim=1)
            sim = (z @ z.T / 0.5).masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
            labels = torch.cat([torch.arange(b) + b, torch.arange(b)])
            loss = F.cross_entropy(sim, labels)
        else:
            p = predictor(net(views))
            with torch.no_grad():
                t = target(views)
            loss = (2 - 2 * F.cosine_similarity(p[:b], t[b:])).mean() + (
                2 - 2 * F.cosine_similarity(p[b:], t[:b])
            ).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target is not None:
            with torch.no_grad():
                for tp, op in zip(target.parameters(), net.parameters(), strict=True):
                    tp.mul_(0.99).add_(op, alpha=0.01)


def main() -> None:
    """Time both loops and print the ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", choices=["simclr", "byol"], default="simclr")
    ap.add_argument("--model", default="simple-cnn")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset_config(DatasetConfig(), None)
    x, y = data.train_x[: args.samples], data.train_y[: args.samples]
    config = TaskConfig(name=args.task)
    task = get_task(args.task)
    train = TrainConfig(batch_size=args.batch_size, lr=0.05)

    def fresh() -> nn.Module:
        model = build_model(args.model, input_shape=(1, 28, 28), num_classes=10, seed=0)
        return task.network(model, config, seed=1)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ours, bare, aug_only = [], [], []
    for r in range(args.repeats + 1):  # the first round warms up and is not counted
        seconds = {}
        for name in sorted(("ours", "bare"), reverse=bool(r % 2)):  # alternate the order
            net = fresh()
            t0 = clock()
            if name == "ours":
                task.train(net, x, y, train, config, generator=torch.Generator().manual_seed(r))
            else:
                bare_epoch(args.task, net, x, args.batch_size, 0.05, r)
            seconds[name] = clock() - t0
        g, aug = torch.Generator().manual_seed(r), augment_config(config)
        t0 = clock()
        for s in range(0, len(x), args.batch_size):
            augment(x[s : s + args.batch_size], aug, generator=g)
            augment(x[s : s + args.batch_size], aug, generator=g)
        if r:
            ours.append(seconds["ours"])
            bare.append(seconds["bare"])
            aug_only.append(clock() - t0)
    a, b, c = statistics.median(ours), statistics.median(bare), statistics.median(aug_only)
    load = os.getloadavg()[0]
    print(f"{args.task}, {args.model}, {args.samples} samples, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.clock} time, load {load:.2f}")  # fmt: skip
    print(f"fedmerge epoch   {a:.3f} s (median of {args.repeats})")
    print(f"bare loop epoch  {b:.3f} s")
    print(f"ratio            {a / b:.3f}x")
    print(f"augmentation     {c:.3f} s ({100 * c / a:.0f}% of fedmerge's epoch)")


if __name__ == "__main__":
    main()
