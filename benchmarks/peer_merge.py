"""Time of one peer's merge step (alignment + mixing + BatchNorm reset) in DIMAT.

For degrees 2, 4 and 8 and two architectures, one peer aligns ``degree``
independently initialised neighbours to its own model by activation matching
on 512 of its local Fashion-MNIST images (DIMAT), mixes them with uniform
weights and re-estimates BatchNorm statistics on the same images. Weight
matching (``dimat-wm``) and plain averaging (``gossip``) are timed alongside.

Run:  .venv/bin/python benchmarks/peer_merge.py [--samples 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from fedmerge.align import permutation_spec_for
from fedmerge.data import load_dataset
from fedmerge.merge import peer_merge
from fedmerge.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a peer's share)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    x = data.train_x[: args.samples]
    print(f"torch threads {args.threads}; {args.samples} local samples; best of {args.repeat}")
    print(
        f"{'model':<12}{'degree':>7}  {'dimat (act.)':>13}{'dimat-wm':>10}{'gossip':>9}"
        "  units moved"
    )
    for name, width in [("simple-cnn", 1), ("resnet20", 1)]:
        inputs = x if name == "simple-cnn" else F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
        batches = list(torch.split(inputs, 128))
        shape = tuple(inputs.shape[1:])
        model = build_model(name, input_shape=shape, num_classes=10, width=width, seed=0)
        spec = permutation_spec_for(model)
        own = model.state_dict()
        for degree in (2, 4, 8):
            nbrs = {
                j: build_model(
                    name, input_shape=shape, num_classes=10, width=width, seed=j
                ).state_dict()
                for j in range(1, degree + 1)
            }
            mixing = {j: 1.0 / (degree + 1) for j in nbrs}
            times, moved = {}, 0
            for align in ("activation", "weight", "none"):
                best = float("inf")
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    _, info = peer_merge(
                        model, own, nbrs, mixing, 1.0 / (degree + 1), align=align,
                        spec=spec, batches=batches, rng=np.random.default_rng(0),
                    )  # fmt: skip
                    best = min(best, time.perf_counter() - t0)
                times[align] = best
                if align == "activation":
                    moved = sum(info.moved.values())
            print(
                f"{name:<12}{degree:>7}  {times['activation']:>12.3f}s{times['weight']:>9.3f}s"
                f"{times['none']:>8.3f}s  {moved}"
            )


if __name__ == "__main__":
    main()
