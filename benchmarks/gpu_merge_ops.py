"""The merge operators and robust aggregators on a GPU: same result as on the CPU, and their cost.

For K client models (perturbations of one global model: simple CNN and
ResNet-20 at Fashion-MNIST's and CIFAR's shapes), every server-side kernel runs
on the CPU and on ``--device``:

- FedAvg's ``weighted_average``, L-DAWA, task arithmetic, TIES, Fisher-weighted
  averaging (with ``diagonal_fisher`` on one batch), coordinate median,
  trimmed mean, Krum, norm clipping, ZipIt! (on random proxy inputs).

It prints milliseconds per call on each device and the largest absolute
difference between the device's result and the CPU's (float32; TF32 off, so a
difference is only rounding order). ``--json`` writes the figures to a file.

Needs only PyTorch (no Flower, no Ray). Run:
    .venv/bin/python benchmarks/gpu_merge_ops.py [--device cuda] [--clients 10] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from fedmerge.align import permutation_spec_for
from fedmerge.merge import (
    LDAWAConfig,
    clip_updates,
    coordinate_median,
    diagonal_fisher,
    fisher_merge,
    krum,
    ldawa_aggregate,
    task_arithmetic,
    ties_merge,
    trimmed_mean,
    weighted_average,
    zipit_merge,
)
from fedmerge.models import build_model, example_input

StateDict = dict[str, torch.Tensor]
MODELS = {"simple-cnn": (1, 28, 28), "resnet20": (3, 32, 32)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (and the result compared across devices)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats * 1e3, out


def _max_diff(a: Any, b: Any) -> float:
    if isinstance(a, dict):
        return max(_max_diff(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return max(_max_diff(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max())
    return 0.0


def cases(
    name: str, shape: tuple[int, ...], k: int, device: torch.device
) -> dict[str, Callable[[], Any]]:
    """Every kernel call on ``device``, on the same data whatever the device."""
    gen = torch.Generator().manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=10, seed=0)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    states: list[StateDict] = []
    for _ in range(k):
        noise = {n: 0.01 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        states.append({n: t + noise[n] if t.is_floating_point() else t for n, t in base.items()})
    fishers = [{n: torch.rand(t.shape, generator=gen) for n, t in s.items()} for s in states]
    proxy = torch.randn(64, *shape, generator=gen)
    labels = torch.randint(0, 10, (64,), generator=gen)
    spec = permutation_spec_for(model, example_input(shape))
    weights = [float(i + 1) for i in range(k)]
    counts = [i + 1 for i in range(k)]

    def on(d: StateDict) -> StateDict:
        return {n: t.to(device) for n, t in d.items()}

    base_d, states_d, fishers_d = on(base), [on(s) for s in states], [on(f) for f in fishers]
    models_d = []
    for s in states:
        m = build_model(name, input_shape=shape, num_classes=10, seed=0)
        m.load_state_dict(s)
        models_d.append(m.to(device).eval())
    fisher_model = build_model(name, input_shape=shape, num_classes=10, seed=0).to(device)
    batch = (proxy.to(device), labels.to(device))
    proxy_d = [proxy.to(device)]
    return {
        "fedavg (weighted_average)": lambda: weighted_average(states_d, weights),
        "ldawa": lambda: ldawa_aggregate(base_d, states_d, counts, LDAWAConfig()),
        "task-arithmetic": lambda: task_arithmetic(base_d, states_d, weights),
        "ties": lambda: ties_merge(base_d, states_d, weights),
        "fisher (merge)": lambda: fisher_merge(states_d, fishers_d, weights),
        "fisher (diagonal, 64 samples)": lambda: diagonal_fisher(
            fisher_model, [batch], labels="empirical"
        ),
        "median": lambda: coordinate_median(states_d),
        "trimmed mean (0.1)": lambda: trimmed_mean(states_d, 0.1),
        "krum (f=1)": lambda: krum(states_d, 1),
        "clip (norm 0.5)": lambda: clip_updates(base_d, states_d, 0.5),
        "zipit (3 clients, 64 proxy inputs)": lambda: zipit_merge(
            spec, models_d[:3], proxy_d
        ).states[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    cpu = torch.device("cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.clients} clients; device: {where}; torch {torch.__version__}")
    rows = []
    for name, shape in MODELS.items():
        on_cpu, on_dev = (
            cases(name, shape, args.clients, cpu),
            cases(name, shape, args.clients, device),
        )
        for op in on_cpu:
            ms_cpu, out_cpu = _time(on_cpu[op], cpu, args.repeat)
            ms_dev, out_dev = _time(on_dev[op], device, args.repeat)
            row = {"model": name, "op": op, "cpu_ms": ms_cpu, "device_ms": ms_dev,
                   "max_abs_diff": _max_diff(out_cpu, out_dev)}  # fmt: skip
            rows.append(row)
            print(
                f"{name:<11} {op:<30} cpu {ms_cpu:9.2f} ms  {device.type} {ms_dev:9.2f} ms  "
                f"max |diff| {row['max_abs_diff']:.2e}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "clients": args.clients, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
