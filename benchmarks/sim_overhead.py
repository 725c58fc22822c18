"""Overhead of fedmerge's Flower + Ray simulation against a bare PyTorch loop.

The same workload runs twice in this process:

(a) a bare single-process loop: the same partitions, initial weights, client
    sampling, local training (same per-client seeds), sample-weighted
    averaging and test-set evaluation every round, one client after another;
(b) ``fedmerge simulate`` (Flower's simulation runtime, Ray backend, one
    actor per core).

Prints wall times and the ratio b/a excluding and including start-up.
Start-up of (a) is loading data, partitioning and building the model; of (b)
everything before round 1 (SuperLink, Ray, actors, their data) plus that.

Run:  .venv/bin/python benchmarks/sim_overhead.py [--rounds 10] [--clients 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedmerge.data.datasets import load_dataset
from fedmerge.training import evaluate, train_local
from sims.launch import simulate
from sims.scenario_files import load_scenario
from strategies.config import RunConfig
from strategies.federation import SAMPLING_STREAM, Federation


def bare_loop(scenario: RunConfig) -> dict[str, float]:
    t0 = time.perf_counter()
    load_dataset.cache_clear()
    fed = Federation(scenario)
    data = fed.data
    fed.partitions  # noqa: B018 -- partitioning is part of the start-up
    model = fed.initial_model()
    t_ready = time.perf_counter()
    rng = np.random.default_rng([scenario.seed, SAMPLING_STREAM])
    ids = list(range(scenario.num_clients))
    config = scenario.train
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, data.test_x, data.test_y)
    acc = 0.0
    for server_round in range(1, scenario.rounds + 1):
        chosen = sorted(ids[i] for i in rng.choice(len(ids), scenario.clients_per_round, False))
        states, weights = [], []
        for pid in chosen:
            model.load_state_dict(global_state)
            x, y = fed.client_data(pid)
            gen = torch.Generator().manual_seed(fed.client_seed(server_round, pid))
            result = train_local(model, x, y, config, generator=gen)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            weights.append(result.num_examples)
        total = sum(weights)
        global_state = {
            k: sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=True)).to(
                states[0][k].dtype
            )
            for k in states[0]
        }
        model.load_state_dict(global_state)
        _, acc = evaluate(model, data.test_x, data.test_y)
    t_end = time.perf_counter()
    return {"startup": t_ready - t0, "rounds": t_end - t_ready, "total": t_end - t0, "acc": acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-round", type=int, default=10)
    args = parser.parse_args()
    scenario = load_scenario(
        None,
        [
            f"rounds={args.rounds}",
            f"num_clients={args.clients}",
            f"clients_per_round={args.per_round}",
            "name='sim-overhead'",
        ],
    )
    print(
        f"workload: {scenario.dataset.name}, {scenario.model.name}, {scenario.num_clients} "
        f"clients ({scenario.partition.scheme}), {scenario.clients_per_round}/round, "
        f"{scenario.train.epochs} local epoch, {scenario.rounds} rounds; "
        f"torch threads {torch.get_num_threads()}"
    )
    a = bare_loop(scenario)
    print(
        f"(a) bare loop      : rounds {a['rounds']:7.2f} s  total {a['total']:7.2f} s  "
        f"(start-up {a['startup']:.2f} s)  final acc {a['acc']:.4f}"
    )
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
        t0 = time.perf_counter()
        s = simulate(scenario, Path(tmp) / "run")
        b_total = time.perf_counter() - t0
    b_start = b_total - s["train_time"]
    print(
        f"(b) fedmerge/Flower: rounds {s['train_time']:7.2f} s  total {b_total:7.2f} s  "
        f"(start-up {b_start:.2f} s, of which the ServerApp before round 1 "
        f"{s['startup_time']:.2f} s)  final acc {s['final_accuracy']:.4f}"
    )
    print(f"b/a excluding start-up: {s['train_time'] / a['rounds']:.2f}x")
    print(f"b/a including start-up: {b_total / a['total']:.2f}x")


if __name__ == "__main__":
    main()
