"""Overhead of fedmerge's Flower + Ray simulation against a bare PyTorch loop.

The same workload runs three ways in this process (``--repeat N``: N times each, interleaved):

(a) a bare single-process loop: the same partitions, initial weights, client
    sampling, local training (same per-client seeds), sample-weighted
    averaging and test-set evaluation every round, one client after another;
(b) ``fedmerge simulate`` (Flower's simulation runtime, Ray backend, one
    actor per core);
(c) the anchor: ``benchmarks/anchor_app``, a minimal Flower App as a Flower
    user writes it (Flower's own FedAvg, partition ids from ``node_config``,
    the simulation runtime starting Ray itself) on the same data, partitions,
    model and local training, run with ``flower-superlink --simulation`` and
    ``flwr run``.

Prints wall times and the ratios b/a and b/c, excluding and including
start-up, and the CPU time of (a) (all its threads; see the README for the
CPU of (b)'s processes). All three draw one line between start-up and
rounds: the rounds are 1..R, from the end of round 0 (the score of the
initial model) to the end of the last round's score; start-up is everything
else, before round 1 and after round R. For (a) that is loading the data,
partitioning, building the model and round 0; for (b) and (c) also the
SuperLink, Ray, the actors and their data, and shutdown.

Run:  .venv/bin/python benchmarks/sim_overhead.py [--rounds 10] [--clients 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedmerge.data.datasets import load_dataset
from fedmerge.training import evaluate, train_local
from sims.launch import simulate
from sims.processes import FLOWER_ENV, free_port
from sims.runtime import stop_process, wait_healthy
from sims.scenario_files import load_scenario
from strategies.config import RunConfig
from strategies.federation import SAMPLING_STREAM, Federation


def bare_loop(scenario: RunConfig) -> dict[str, float]:
    """The workload of a FedAvg or FedProx ``scenario`` in one process, one client at a time."""
    t0, cpu0 = time.perf_counter(), time.process_time()
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
    # FedProx's clients add the proximal term; every other strategy here trains plainly.
    prox_mu = float(getattr(scenario.strategy.options, "prox_mu", 0.0))
    evaluate(model, data.test_x, data.test_y)  # round 0
    t_round0 = time.perf_counter()
    acc = 0.0
    for server_round in range(1, scenario.rounds + 1):
        chosen = sorted(ids[i] for i in rng.choice(len(ids), scenario.clients_per_round, False))
        states, weights = [], []
        for pid in chosen:
            model.load_state_dict(global_state)
            x, y = fed.client_data(pid)
            gen = torch.Generator().manual_seed(fed.client_seed(server_round, pid))
            result = train_local(
                model, x, y, config, generator=gen, prox_mu=prox_mu, global_state=global_state
            )
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
    return {
        "round0": t_round0 - t_ready,
        "rounds": t_end - t_round0,
        "total": t_end - t0,
        "acc": acc,
        "cpu": time.process_time() - cpu0,  # every thread of this process
    }


ANCHOR = Path(__file__).resolve().parent / "anchor_app"


def plain_flower(scenario: RunConfig, tmp: Path) -> dict[str, float]:
    """Run the anchor app as a Flower user would: a SuperLink, then ``flwr run --stream``."""
    home, times = tmp / "home", tmp / "times.txt"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n[superlink.local]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "RAY_TMPDIR": str(tmp / "r")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    run_config = (
        f"rounds={scenario.rounds} num-clients={scenario.num_clients} "
        f"per-round={scenario.clients_per_round} seed={scenario.seed} times='{times}'"
    )
    t0 = time.perf_counter()
    with (tmp / "flower.log").open("wb") as log:
        superlink = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_healthy(port, superlink, timeout=60)
            subprocess.run(
                ["flwr", "run", str(ANCHOR), "local", "--stream", "--run-config", run_config,
                 "--federation-config",
                 f"num-supernodes={scenario.num_clients} client-resources-num-cpus=1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1800,
            )  # fmt: skip
        finally:
            stop_process(superlink, grace=1.0)
    total = time.perf_counter() - t0
    rows = [line.split() for line in times.read_text().splitlines()]
    if [row[0] for row in rows] != [str(r) for r in range(scenario.rounds + 1)]:
        raise RuntimeError(f"{times}: expected the scores of rounds 0..{scenario.rounds}")
    rounds = float(rows[-1][1]) - float(rows[0][1])  # from the end of round 0 on
    return {"rounds": rounds, "total": total, "acc": float(rows[-1][2])}


RATIOS = (
    "b/a excluding start-up",
    "b/a including start-up",
    "b/c excluding start-up",
    "b/c including start-up",
)


def compare_once(scenario: RunConfig) -> dict[str, float]:
    """Run (a), (b) and (c) once each, in that order; print their times and return the ratios."""
    a = bare_loop(scenario)
    print(
        f"(a) bare loop      : rounds {a['rounds']:7.2f} s  total {a['total']:7.2f} s  "
        f"(start-up {a['total'] - a['rounds']:.2f} s, of which round 0 {a['round0']:.2f} s)  "
        f"final acc {a['acc']:.4f}  CPU {a['cpu']:.2f} s"
    )
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
        t0 = time.perf_counter()
        s = simulate(scenario, Path(tmp) / "run")
        b_total = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").open()]
    b_rounds = sum(r["round_time"] for r in rows if r["round"] >= 1)
    round0 = next(r["round_time"] for r in rows if r["round"] == 0)
    print(
        f"(b) fedmerge/Flower: rounds {b_rounds:7.2f} s  total {b_total:7.2f} s  "
        f"(start-up {b_total - b_rounds:.2f} s, of which round 0 {round0:.2f} s)  "
        f"final acc {s['final_accuracy']:.4f}"
    )
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
        c = plain_flower(scenario, Path(tmp))
    print(
        f"(c) plain Flower   : rounds {c['rounds']:7.2f} s  total {c['total']:7.2f} s  "
        f"(start-up {c['total'] - c['rounds']:.2f} s)  final acc {c['acc']:.4f}"
    )
    values = (
        b_rounds / a["rounds"],
        b_total / a["total"],
        b_rounds / c["rounds"],
        b_total / c["total"],
    )
    ratios = dict(zip(RATIOS, values, strict=True))
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    return ratios


def add_repeat(parser: argparse.ArgumentParser) -> None:
    """The ``--repeat N`` option of a benchmark whose ways run interleaved (:func:`repeated`)."""
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run (a), (b) and (c) this many times, interleaved; the medians of the ratios last",
    )


def repeated(
    parser: argparse.ArgumentParser, times: int, once: Callable[[], dict[str, float]]
) -> None:
    """Call ``once`` ``times`` times; with more than one, print the median of each ratio last."""
    if times < 1:
        parser.error(f"--repeat: got {times}; allowed: 1 or more")
    runs = []
    for i in range(times):
        if times > 1:
            print(f"-- repetition {i + 1} of {times}")
        runs.append(once())
    if times > 1:
        print(f"-- medians of {times} repetitions")
        for name in runs[0]:
            values = [r[name] for r in runs]
            listed = " / ".join(f"{v:.2f}" for v in values)
            print(f"{name}: {statistics.median(values):.2f}x  ({listed})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-round", type=int, default=10)
    add_repeat(parser)
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
    repeated(parser, args.repeat, lambda: compare_once(scenario))


if __name__ == "__main__":
    main()
