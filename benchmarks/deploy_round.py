"""A deployed round against the same round in simulation, on this machine (loopback).

One scenario (default: fedavg, ``digits``, ``mlp``, 3 clients, all sampled
every round) runs

(a) in simulation: ``fedmerge simulate`` (Flower's simulation runtime, Ray);
(b) deployed: a ``flower-superlink`` on 127.0.0.1 and one ``fedmerge
    supernode`` per client (``partition-id=i num-partitions=N``: the same
    partitions as in simulation), the run submitted with ``flwr run``; once
    for each ``--isolation`` asked for: ``process`` (one long-lived
    ClientApp process per node, fedmerge's default) and ``subprocess``
    (Flower's default, a new ClientApp process per message).

Per-round wall time comes from each run's ``metrics.jsonl`` (``round_time``:
from the end of one round to the end of the next, on the server). Round 1
carries the first messages' costs; the table prints it apart and the mean
of rounds 2 to R, and the ratio deployed / simulated of that mean. Every
process started here is stopped by PID (its whole tree), also on failure.

Run:  .venv/bin/python benchmarks/deploy_round.py [--rounds 6] [--clients 3]
      [--isolation process subprocess]
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
from pathlib import Path
from typing import Any

from sims.processes import FLOWER_ENV, free_port, stop_tree
from sims.runtime import wait_healthy

REPO = Path(__file__).resolve().parents[1]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _scenario(args: argparse.Namespace) -> list[str]:
    return [
        f"strategy.name='{args.strategy}'",
        f"dataset.name='{args.dataset}'",
        f"model.name='{args.model}'",
        f"num_clients={args.clients}",
        f"clients_per_round={args.clients}",
        f"rounds={args.rounds}",
        "simulation.timeout=120",
    ]


def simulated(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Round rows of the scenario run by ``fedmerge simulate``."""
    run_dir = tmp / "sim"
    cmd = [sys.executable, "-m", "sims.cli", "simulate", "--run-dir", str(run_dir)]
    for kv in _scenario(args):
        cmd += ["--set", kv]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        if proc.wait(timeout=900) != 0:
            raise RuntimeError(f"fedmerge simulate exited with {proc.returncode}")
    finally:
        stop_tree([proc.pid], 5.0)
        proc.wait()
    return _rows(run_dir)


def deployed(
    args: argparse.Namespace, tmp: Path, env: dict[str, str], isolation: str
) -> list[dict[str, Any]]:
    """Round rows of the scenario on a loopback SuperLink with one SuperNode per client."""
    home = tmp / f"home-{isolation}"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n[superlink.bench]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**env, "FLWR_HOME": str(home)}
    run_dir = tmp / f"deploy-{isolation}"
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with (tmp / log).open("wb") as sink:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        procs.append(proc)
        return proc

    try:
        link = start(
            [str(Path(sys.executable).parent / "flower-superlink"), "--insecure",
             "--host", "127.0.0.1", "--port", str(port)],
            f"superlink-{isolation}.log",
        )  # fmt: skip
        wait_healthy(port, link, timeout=60)
        for i in range(args.clients):
            start(
                [sys.executable, "-m", "sims.cli", "supernode", "--insecure",
                 "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                 "--isolation", isolation,
                 "--node-config", f"partition-id={i} num-partitions={args.clients}"],
                f"supernode-{isolation}-{i}.log",
            )  # fmt: skip
        run_config = " ".join(
            [*_scenario(args), "simulation.assign_partitions=false", f"output.run-dir='{run_dir}'"]
        )
        flwr = start(
            [str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "--stream",
             "--run-config", run_config],
            f"flwr-run-{isolation}.log",
        )  # fmt: skip
        deadline = time.monotonic() + 900
        while flwr.poll() is None and not (run_dir / "summary.json").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"deployed run ({isolation}) did not finish in 900 s")
            time.sleep(0.5)
        if not (run_dir / "summary.json").exists():
            raise RuntimeError(
                f"deployed run ({isolation}): flwr run exited {flwr.returncode} without a "
                f"summary.json; see flwr-run-{isolation}.log"
            )
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("status") != "completed":
            raise RuntimeError(f"deployed run ({isolation}): {summary}")
        return _rows(run_dir)
    finally:
        stop_tree([p.pid for p in procs], 5.0)
        for p in procs:
            p.wait()


def _line(name: str, rows: list[dict[str, Any]], base: float | None) -> tuple[str, float]:
    times = [r["round_time"] for r in rows[1:]]
    rest = statistics.mean(times[1:]) if len(times) > 1 else float("nan")
    ratio = f"{rest / base:6.2f}x" if base else "    -  "
    text = (
        f"{name:<24} {times[0]:9.2f} s {rest:12.3f} s   {ratio}   "
        f"final accuracy {rows[-1]['accuracy']:.4f}"
    )
    return text, rest


def main() -> int:
    """Run the scenario simulated and deployed; print round times and ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="mlp")
    p.add_argument(
        "--isolation",
        nargs="+",
        choices=["process", "subprocess"],
        default=["process", "subprocess"],
    )
    p.add_argument("--keep", metavar="DIR", help="work (logs, runs) in DIR and keep it")
    args = p.parse_args()
    if args.rounds < 2:
        p.error(f"--rounds: got {args.rounds}; allowed: >= 2")
    env = {**os.environ, **FLOWER_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryDirectory(prefix="deploy-round-") as name:
        tmp = Path(args.keep or name)
        tmp.mkdir(parents=True, exist_ok=True)
        env["RAY_TMPDIR"] = str(tmp / "ray")
        results = [("simulation", simulated(args, tmp, env))]
        for isolation in args.isolation:
            results.append((f"deployed ({isolation})", deployed(args, tmp, env, isolation)))
    print(
        f"{args.strategy} on {args.dataset}, {args.model}, {args.clients} clients, "
        f"{args.rounds} rounds, cores: {os.cpu_count()}"
    )
    print(f"{'':<24} {'round 1':>11} {'rounds 2-R':>14}   ratio")
    base = None
    for name, rows in results:
        text, rest = _line(name, rows, base)
        base = rest if base is None else base
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
