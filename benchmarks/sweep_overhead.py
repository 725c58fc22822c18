"""A sweep's wall time against the sum of its runs' bare-loop times.

Runs a sweep (default: ``sims/sweeps/smoke.toml``, FedAvg and FedProx x two
seeds) three ways in this process, each into a fresh temporary runs root:

(a) every run as a bare single-process loop (``benchmarks/sim_overhead.py``'s
    ``bare_loop``: same partitions, initial weights, sampling and local
    training, one client after another), summed;
(b) ``fedmerge compare``'s runner, one run at a time on one runtime (one
    SuperLink and one Ray head for the whole sweep);
(c) ``--parallel 2``: two runs at a time, each slot on a runtime of its own
    with half the Ray head's CPUs (runs that go together never share a cluster).

Prints the wall times and the ratios b/a and c/a, and checks that (b) and (c)
reached the same final accuracy run by run.

Run:  .venv/bin/python benchmarks/sweep_overhead.py [--sweep sims/sweeps/smoke.toml]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_overhead import bare_loop

from sims.compare import load_sweep, plan_sweep, run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="sims/sweeps/smoke.toml")
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    sweep = load_sweep(args.sweep)
    with tempfile.TemporaryDirectory(prefix="fm-sweep-") as tmp:
        runs = plan_sweep(sweep, Path(tmp) / "plan")
        print(f"sweep {sweep.name}: {len(runs)} runs")
        bare = [bare_loop(run.scenario) for run in runs]
        a = sum(b["total"] for b in bare)
        print(f"(a) bare loops, summed      : {a:7.2f} s")
        finals = {}
        ways = [("(b) one runtime, 1 at a time", 1)]
        ways.append((f"(c) {args.parallel} at a time, a runtime each", args.parallel))
        for label, parallel in ways:
            planned = plan_sweep(sweep, Path(tmp) / f"p{parallel}")
            t0 = time.perf_counter()
            summaries = run_sweep(planned, parallel=parallel)
            wall = time.perf_counter() - t0
            finals[parallel] = [s["final_accuracy"] for s in summaries]
            print(f"{label:<28}: {wall:7.2f} s  = {wall / a:.2f}x (a)")
        same = finals[1] == finals[args.parallel]
        print(f"same final accuracy run by run, 1 vs {args.parallel} at a time: {same}")


if __name__ == "__main__":
    main()
