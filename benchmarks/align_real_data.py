"""Alignment on real data: Fashion-MNIST MLPs.

1. Two MLPs trained from different seeds on the whole training set. The loss
   barrier at the midpoint of the linear interpolation,
   ``loss((A + B) / 2) - (loss(A) + loss(B)) / 2`` on the test set, naively
   and after aligning B to A by weight matching (also by activation matching
   and exact-EMD OT alignment, for comparison).
2. Two MLPs from different seeds, one trained on classes 0-4 and the other on
   classes 5-9, fused one-shot: vanilla averaging, weight matching + average,
   OTFusion (EMD; weight and activation costs) and activation matching +
   average. Test
   accuracy on all ten classes, with each parent's.

Run:  .venv/bin/python benchmarks/align_real_data.py [--epochs 10] [--hidden 512] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from fedmerge.align import (
    activation_matching,
    apply_permutation,
    collect_activation_stats,
    count_moved_units,
    ot_fuse,
    permutation_spec_for,
    weight_matching,
)
from fedmerge.data import load_dataset
from fedmerge.merge import weighted_average
from fedmerge.models import build_model
from fedmerge.training import TrainConfig, evaluate, train_local


def train(
    x: torch.Tensor, y: torch.Tensor, seed: int, hidden: tuple[int, ...], epochs: int
) -> nn.Module:
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=hidden, seed=seed)
    config = TrainConfig(epochs=epochs, batch_size=128, lr=0.05, momentum=0.9)
    train_local(model, x, y, config, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def with_state(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    model = build_model(
        "mlp", input_shape=(1, 28, 28), num_classes=10,
        hidden=[layer.out_features for layer in template.layers],  # type: ignore[union-attr]
    )  # fmt: skip
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=512, help="width of the 3 hidden layers")
    parser.add_argument("--act-samples", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = (args.hidden,) * 3
    start = time.perf_counter()
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    data = load_dataset("fashion-mnist")
    x, y, tx, ty = data.train_x, data.train_y, data.test_x, data.test_y
    act_batches = list(x[: args.act_samples].split(1000))

    def report(label: str, model: nn.Module) -> tuple[float, float]:
        loss, acc = evaluate(model, tx, ty)
        print(f"  {label:38s} test loss {loss:.4f}  accuracy {acc:.4f}")
        return loss, acc

    print(f"== 1. loss barrier: MLP {hidden}, {args.epochs} epochs, seeds 0 and 1")
    model_a = train(x, y, 0, hidden, args.epochs)
    model_b = train(x, y, 1, hidden, args.epochs)
    spec = permutation_spec_for(model_a)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    loss_a, _ = report("A", model_a)
    loss_b, _ = report("B", model_b)
    t = time.perf_counter()
    perm_wm, info = weight_matching(spec, sa, sb, rng=np.random.default_rng(0))
    wm_seconds = time.perf_counter() - t
    perm_am, _ = activation_matching(spec, model_a, model_b, act_batches)
    fused_ot = ot_fuse(spec, sa, sb)
    moved = sum(count_moved_units(perm_wm).values())
    print(
        f"  weight matching: {wm_seconds:.3f} s, {info.iterations} sweeps, "
        f"{moved} of {sum(hidden)} units moved"
    )
    rows = {
        "naive midpoint": weighted_average([sa, sb]),
        "weight matching midpoint": weighted_average([sa, apply_permutation(spec, perm_wm, sb)]),
        "activation matching midpoint": weighted_average(
            [sa, apply_permutation(spec, perm_am, sb)]
        ),
        "OT (EMD) fusion midpoint": fused_ot,
    }
    barriers = {}
    for label, state in rows.items():
        loss, _ = report(label, with_state(model_a, state))
        barriers[label] = loss - (loss_a + loss_b) / 2
    for label, barrier in barriers.items():
        print(f"  barrier, {label:30s} {barrier:.4f}")

    print("== 2. one-shot fusion of models trained on disjoint halves of the classes")
    low = y < 5
    model_c = train(x[low], y[low], 2, hidden, args.epochs)
    model_d = train(x[~low], y[~low], 3, hidden, args.epochs)
    sc, sd = model_c.state_dict(), model_d.state_dict()
    report("parent C (classes 0-4)", model_c)
    report("parent D (classes 5-9)", model_d)
    perm_wm, _ = weight_matching(spec, sc, sd, rng=np.random.default_rng(0))
    perm_am, _ = activation_matching(spec, model_c, model_d, act_batches)
    stats_cd = collect_activation_stats(spec, model_c, model_d, act_batches)
    fused = {
        "vanilla average": weighted_average([sc, sd]),
        "weight matching + average": weighted_average([sc, apply_permutation(spec, perm_wm, sd)]),
        "OTFusion (EMD, weight cost)": ot_fuse(spec, sc, sd),
        "OTFusion (EMD, activation cost)": ot_fuse(
            spec, sc, sd, cost="activation", activations=stats_cd
        ),
        "activation matching + average": weighted_average(
            [sc, apply_permutation(spec, perm_am, sd)]
        ),
    }
    for label, state in fused.items():
        report(label, with_state(model_c, state))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
