"""fedmerge's kernel on a GPU: correctness against the CPU, and timings.

What a simulated client and a merging server do, run directly on one device
(no Flower, no Ray): local training (:func:`fedmerge.training.train_local`
against a bare PyTorch loop), weight and activation matching, OT alignment,
weighted averaging and one DIMAT peer merge. Every GPU result is checked
against the CPU (same permutation found; merged weights equal within float
tolerance), then timed. ``--clients 1,4`` also trains that many clients at
once, each in its own process on the same GPU, as Ray runs clients with
``simulation.num_gpus_per_client = 1/N``, and prints the throughput.

Data are random tensors of Fashion-MNIST's shape (the point is the device
path, not accuracy).

Run:  .venv/bin/python benchmarks/gpu_kernel.py [--device cuda] [--clients 1,4]
      [--samples 6000] [--no-tf32] [--only training,alignment,merging,clients]
      [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

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
from fedmerge.merge import peer_merge, reset_bn_stats, weighted_average
from fedmerge.models import build_model
from fedmerge.training import TrainConfig, train_local

SHAPE = (1, 28, 28)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _data(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *SHAPE, generator=g).to(device), torch.randint(
        0, 10, (n,), generator=g
    ).to(device)


def _bare_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
    """A hand-written epoch of SGD with momentum (the same work as train_local)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    model.train()
    for start in range(0, len(y), 32):
        idx = order[start : start + 32]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def training(device: torch.device, samples: int) -> dict[str, float]:
    """One epoch of local training: fedmerge's train_local against a bare loop."""
    x, y = _data(samples, device)
    config = TrainConfig(epochs=1, batch_size=32, lr=0.01, momentum=0.9)

    def fedmerge_epoch() -> None:
        model = build_model("simple-cnn", input_shape=SHAPE, num_classes=10, seed=0).to(device)
        train_local(model, x, y, config, generator=torch.Generator().manual_seed(1))

    def bare_epoch() -> None:
        model = build_model("simple-cnn", input_shape=SHAPE, num_classes=10, seed=0).to(device)
        _bare_loop(model, x, y, 1)

    fm, bare = _time(fedmerge_epoch, device), _time(bare_epoch, device)
    return {"train_local_s": fm, "bare_loop_s": bare, "ratio": fm / bare}


def alignment(device: torch.device) -> dict[str, Any]:
    """Weight matching, OT (EMD) and activation matching of a planted permutation.

    Model B is an exact permutation of model A (BatchNorm statistics of A
    estimated first, so that no unit is dead): each method must find the
    inverse permutation on the device, and is timed there.
    """
    out: dict[str, Any] = {}
    shape = (3, 32, 32)
    for name, width in (("resnet20", 4), ("vgg11", 1)):
        gen = torch.Generator().manual_seed(0)
        model_a = build_model(name, input_shape=shape, num_classes=10, width=width, seed=0)
        x = torch.randn(64, *shape, generator=gen)
        reset_bn_stats(model_a, [x])
        spec = permutation_spec_for(model_a)
        perm = random_permutation(spec, model_a.state_dict(), generator=gen)
        model_b = build_model(name, input_shape=shape, num_classes=10, width=width)
        model_b.load_state_dict(apply_permutation(spec, perm, model_a.state_dict()))
        model_a, model_b = model_a.to(device).eval(), model_b.to(device).eval()
        a, b = model_a.state_dict(), model_b.state_dict()
        answer = {k: v.to(device) for k, v in invert_permutation(perm).items()}
        batches = [x.to(device)]

        def same(found: dict[str, torch.Tensor], answer: dict[str, torch.Tensor] = answer) -> bool:
            return all(torch.equal(found[k], answer[k]) for k in answer)

        wm, _ = weight_matching(spec, a, b)
        plans, _ = ot_align(spec, a, b, solver="emd", cost="weight")
        am, _ = activation_matching(spec, model_a, model_b, batches)
        out[f"{name}x{width}"] = {
            "weight_matching_exact": same(wm),
            "weight_matching_s": _time(lambda s=spec, a=a, b=b: weight_matching(s, a, b), device),
            "ot_emd_exact": same({g: transport_to_permutation(p) for g, p in plans.items()}),
            "ot_emd_s": _time(lambda s=spec, a=a, b=b: ot_align(s, a, b), device),
            "activation_matching_exact": same(am),
            "activation_matching_s": _time(
                lambda s=spec, ma=model_a, mb=model_b, xb=batches: activation_matching(
                    s, ma, mb, xb
                ),
                device,
            ),
        }
    return out


def merging(device: torch.device) -> dict[str, Any]:
    """Weighted average and one DIMAT peer merge: GPU equals CPU within float tolerance."""
    states, models = [], []
    for seed in range(4):
        m = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, width=2, seed=seed)
        models.append(m)
        states.append(m.state_dict())
    cpu = weighted_average(states, [1.0, 2.0, 3.0, 4.0])
    on_device = [{k: v.to(device) for k, v in s.items()} for s in states]
    gpu = weighted_average(on_device, [1.0, 2.0, 3.0, 4.0])
    avg_ok = all(torch.allclose(gpu[k].cpu(), cpu[k], rtol=1e-5, atol=1e-6) for k in cpu)
    avg_s = _time(lambda: weighted_average(on_device, [1.0, 2.0, 3.0, 4.0]), device)
    spec = permutation_spec_for(models[0])
    batches = [torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(7))]

    def merge_on(dev: torch.device) -> dict[str, torch.Tensor]:
        model = models[0].to(dev)
        own = {k: v.to(dev) for k, v in states[0].items()}
        nbrs = {j: {k: v.to(dev) for k, v in states[j].items()} for j in (1, 2)}
        merged, _ = peer_merge(
            model, own, nbrs, {1: 1 / 3, 2: 1 / 3}, 1 / 3,
            align="activation", spec=spec, batches=[b.to(dev) for b in batches],
        )  # fmt: skip
        return merged

    merged_cpu = merge_on(torch.device("cpu"))
    merged_gpu = merge_on(device)
    close = [
        torch.allclose(merged_gpu[k].cpu().double(), merged_cpu[k].double(), rtol=1e-3, atol=1e-4)
        for k in merged_cpu
        if merged_cpu[k].is_floating_point()
    ]

    def perm_on(dev: torch.device) -> dict[str, torch.Tensor]:
        a, b = models[0].to(dev), models[1].to(dev)
        perm, _ = activation_matching(spec, a, b, [x.to(dev) for x in batches])
        return {k: v.cpu() for k, v in perm.items()}

    perm_cpu, perm_dev = perm_on(torch.device("cpu")), perm_on(device)
    units = sum(len(v) for v in perm_cpu.values())
    same_units = sum(int((perm_cpu[k] == perm_dev[k]).sum()) for k in perm_cpu)
    merge_s = _time(lambda: merge_on(device), device)
    return {
        "weighted_average_matches_cpu": avg_ok,
        "weighted_average_s": avg_s,
        "peer_merge_matches_cpu_fraction": sum(close) / len(close),
        "activation_matching_same_units_as_cpu": f"{same_units}/{units}",
        "peer_merge_s": merge_s,
    }


def _client(rank: int, device: str, samples: int, epochs: int, queue: Any) -> None:
    dev = torch.device(device)
    x, y = _data(samples, dev)
    model = build_model("simple-cnn", input_shape=SHAPE, num_classes=10, seed=rank).to(dev)
    config = TrainConfig(epochs=epochs, batch_size=32)
    _sync(dev)
    t = time.perf_counter()
    train_local(model, x, y, config, generator=torch.Generator().manual_seed(rank))
    _sync(dev)
    queue.put(time.perf_counter() - t)


def clients_per_device(device: torch.device, counts: list[int], samples: int) -> dict[str, Any]:
    """``n`` clients training at once on one device, each in its own process."""
    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {}
    for n in counts:
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_client, args=(r, str(device), samples, 2, queue)) for r in range(n)
        ]
        t = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.perf_counter() - t
        each = [queue.get() for _ in range(n)]
        out[str(n)] = {
            "training_s_each": max(each),
            "samples_per_s": n * 2 * samples / max(each),
            "wall_s_with_start": wall,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--out")
    parser.add_argument("--only", default="training,alignment,merging,clients")
    parser.add_argument(
        "--no-tf32", action="store_true", help="full float32 convolutions and matmuls on the GPU"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "tf32": not args.no_tf32}
    for key, fn in (
        ("training", lambda: training(device, args.samples)),
        ("alignment", lambda: alignment(device)),
        ("merging", lambda: merging(device)),
        ("clients", lambda: clients_per_device(
            device, [int(c) for c in args.clients.split(",")], args.samples
        )),
    ):  # fmt: skip
        if key not in args.only.split(","):
            continue
        t = time.perf_counter()
        results[key] = fn()
        print(f"{key} ({time.perf_counter() - t:.1f} s): {json.dumps(results[key], indent=1)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
