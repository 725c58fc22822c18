"""Evaluation batch size on this CPU: fedmerge's CPU batch against 2,048-sample batches.

For each model, ``fedmerge.training.evaluate`` scores the same random samples
with batches of :data:`fedmerge.training.CPU_EVAL_BATCH` and of 2,048 samples
(the batch of earlier versions), alternating, and prints the median time of
each and their ratio, with the loss and accuracy both gave (accuracies equal;
losses equal up to float32 rounding, the batches are summed in another order).

Run:  .venv/bin/python benchmarks/eval_batch.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedmerge.models.factory import build_model
from fedmerge.training import CPU_EVAL_BATCH, evaluate

OLD_BATCH = 2048

#: (model, input shape, samples): Fashion-MNIST-sized and CIFAR-sized inputs.
CASES = (
    ("simple-cnn", (1, 28, 28), 10_000),
    ("mlp", (1, 28, 28), 10_000),
    ("resnet20", (3, 32, 32), 2_048),
    ("vgg11", (3, 32, 32), 2_048),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}; batch {CPU_EVAL_BATCH} against {OLD_BATCH}")
    print(f"{'model':12s} {'samples':>8s} {'new s':>8s} {'old s':>8s} {'new/old':>8s}  results")
    for name, shape, n in CASES:
        model = build_model(name, input_shape=shape, num_classes=10, seed=0)
        x = torch.randn(n, *shape, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        evaluate(model, x[:CPU_EVAL_BATCH], y[:CPU_EVAL_BATCH])  # warm-up
        times: dict[int, list[float]] = {CPU_EVAL_BATCH: [], OLD_BATCH: []}
        results = {}
        for _ in range(args.repeats):
            for batch in times:
                t0 = time.perf_counter()
                results[batch] = evaluate(model, x, y, batch_size=batch)
                times[batch].append(time.perf_counter() - t0)
        new, old = (statistics.median(times[b]) for b in (CPU_EVAL_BATCH, OLD_BATCH))
        said = "; ".join(f"{b}: loss {r[0]:.7f} acc {r[1]:.4f}" for b, r in results.items())
        print(f"{name:12s} {n:8d} {new:8.3f} {old:8.3f} {new / old:7.2f}x  {said}")


if __name__ == "__main__":
    main()
