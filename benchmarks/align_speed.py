"""Speed of permutation alignment on this CPU, with planted permutations.

For ResNet-20 at widths 1, 4, 8 and 16 and for VGG-11, model B is a random
permutation of model A plus Gaussian noise (1% of each tensor's std). The
script times weight matching (forward order, and the paper's seeded random
order), activation matching and OT alignment (exact EMD, weight cost), and
says whether each recovered the planted permutation exactly. For weight
matching it also splits the time into setup, cost matrices (gathers and
matrix products) and linear assignment.

Activation matching and OT alignment get one batch of random 32x32 images
(``--samples``); BatchNorm statistics of A are first estimated on that batch
so that no unit is dead.

Run:  .venv/bin/python benchmarks/align_speed.py [--repeats 3] [--samples 32]
      [--only resnet20x4,resnet20x8] [--weights-only] [--threads N]

Timings are wall-clock seconds (median and minimum over the repeats); other
work on the machine inflates them, which the printed load average shows.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedmerge.align import (
    activation_matching,
    apply_permutation,
    invert_permutation,
    ot_align,
    permutation_spec_for,
    random_permutation,
    transport_to_permutation,
    weight_matching,
)
from fedmerge.merge import reset_bn_stats
from fedmerge.models import build_model

# the package re-exports the function under the module's name: fetch the module itself
wm_module = importlib.import_module("fedmerge.align.weight_matching")

CASES = [("resnet20", 1), ("resnet20", 4), ("resnet20", 8), ("resnet20", 16), ("vgg11", 1)]


class Timer:
    """Accumulates the time spent in wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``fn`` adding its run time to ``self.seconds[name]``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


def planted(name: str, width: int, samples: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 32, 32)
    model_a = build_model(name, input_shape=shape, num_classes=10, width=width, seed=seed)
    x = torch.randn(samples, *shape, generator=gen)
    reset_bn_stats(model_a, [x])
    model_a.eval()
    spec = permutation_spec_for(model_a)
    state_a = model_a.state_dict()
    perm = random_permutation(spec, state_a, generator=gen)
    params = dict(model_a.named_parameters())
    state_b = {
        k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen)
        if k in params and v.numel() > 1
        else v
        for k, v in apply_permutation(spec, perm, state_a).items()
    }
    model_b = build_model(name, input_shape=shape, num_classes=10, width=width)
    model_b.load_state_dict(state_b)
    model_b.eval()
    n_params = sum(v.numel() for v in params.values())
    return dict(
        spec=spec, a=model_a, b=model_b, sa=state_a, sb=state_b, x=x,
        answer=invert_permutation(perm), params=n_params,
    )  # fmt: skip


def recovered(perm: dict[str, torch.Tensor], answer: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(perm[k], answer[k]) for k in answer)


def time_weight_matching(case: dict[str, Any], repeats: int, rng_seed: int | None) -> str:
    times, breakdown = [], Timer()
    originals = {
        name: getattr(wm_module, name)
        for name in ("linear_sum_assignment", "_build_terms", "_objective", "check_finite")
    }
    for name, fn in originals.items():
        setattr(wm_module, name, breakdown.wrap(name, fn))
    try:
        for _ in range(repeats):
            rng = None if rng_seed is None else np.random.default_rng(rng_seed)
            start = time.perf_counter()
            perm, info = weight_matching(case["spec"], case["sa"], case["sb"], rng=rng)
            times.append(time.perf_counter() - start)
    finally:
        for name, fn in originals.items():
            setattr(wm_module, name, fn)
    total = sum(times)
    parts = {k: v / total * 100 for k, v in breakdown.seconds.items()}
    lsa = parts.get("linear_sum_assignment", 0.0)
    setup = parts.get("_build_terms", 0.0) + parts.get("check_finite", 0.0)
    final = parts.get("_objective", 0.0)
    costs = 100 - lsa - setup - final
    order = "forward" if rng_seed is None else "random"
    return (
        f"  weight matching ({order:7s}) {statistics.median(times):7.3f} s "
        f"(min {min(times):.3f})  "
        f"iterations {info.iterations}  solves {info.solves:3d}  "
        f"recovered {recovered(perm, case['answer'])}  "
        f"[cost matrices {costs:4.1f}%, assignment {lsa:4.1f}%, setup {setup:4.1f}%, "
        f"objective {final:4.1f}%]"
    )


def time_activation_matching(case: dict[str, Any]) -> str:
    start = time.perf_counter()
    with torch.no_grad():
        case["a"](case["x"])
        case["b"](case["x"])
    forward = time.perf_counter() - start
    start = time.perf_counter()
    perm, _ = activation_matching(case["spec"], case["a"], case["b"], [case["x"]])
    seconds = time.perf_counter() - start
    return (
        f"  activation matching     {seconds:7.3f} s  (of which ~{forward:.3f} s two forward "
        f"passes)  recovered {recovered(perm, case['answer'])}"
    )


def time_ot(case: dict[str, Any]) -> str:
    start = time.perf_counter()
    plans, _ = ot_align(case["spec"], case["sa"], case["sb"])
    seconds = time.perf_counter() - start
    try:
        ok = recovered({k: transport_to_permutation(p) for k, p in plans.items()}, case["answer"])
    except ValueError:
        ok = False
    return f"  OT alignment (EMD)      {seconds:7.3f} s  permutation matrices, recovered {ok}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="weight-matching repeats")
    parser.add_argument("--samples", type=int, default=32, help="images for activations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--skip-x16-activations", action="store_true")
    parser.add_argument(
        "--only", default="", help="comma-separated cases such as resnet20x4,vgg11x1"
    )
    parser.add_argument("--weights-only", action="store_true", help="skip activations and OT")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f} (other work on the machine slows every figure)"
    )
    only = {c for c in args.only.split(",") if c}
    for name, width in CASES:
        if only and f"{name}x{width}" not in only:
            continue
        case = planted(name, width, args.samples)
        sizes = case["spec"].perm_sizes(case["sa"])
        print(
            f"{name} x{width}: {case['params'] / 1e6:.2f}M parameters, {len(sizes)} "
            f"permutations, widest {max(sizes.values())} units"
        )
        repeats = 1 if width >= 16 else args.repeats
        print(time_weight_matching(case, repeats, None))
        print(time_weight_matching(case, repeats, 0))
        if args.weights_only:
            continue
        if not (width >= 16 and args.skip_x16_activations):
            print(time_activation_matching(case))
        print(time_ot(case))


if __name__ == "__main__":
    main()
