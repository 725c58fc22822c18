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
reached the same final accuracy run by run. ``--repeat N`` runs (a), (b) and
(c) N times, interleaved, and prints the medians of the ratios last: the
bare loop's speed on a shared machine moves by a fifth from one minute to
the next, and each ratio with it (``--parallel 0`` leaves (c) out).

Run:  .venv/bin/python benchmarks/sweep_overhead.py [--sweep sims/sweeps/smoke.toml] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_overhead import add_repeat, bare_loop, repeated

from sims.compare import Sweep, load_sweep, plan_sweep, run_sweep


def compare_once(sweep: Sweep, parallel: int) -> dict[str, float]:
    """(a), (b) and, unless ``parallel`` is 0, (c) once; their ratios to (a)."""
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fm-sweep-") as tmp:
        runs = plan_sweep(sweep, Path(tmp) / "plan")
        print(f"sweep {sweep.name}: {len(runs)} runs")
        bare = [bare_loop(run.scenario) for run in runs]
        a = sum(b["total"] for b in bare)
        print(f"(a) bare loops, summed      : {a:7.2f} s")
        finals = {}
        ways = [("(b) one runtime, 1 at a time", 1)]
        if parallel:
            ways.append((f"(c) {parallel} at a time, a runtime each", parallel))
        for label, slots in ways:
            planned = plan_sweep(sweep, Path(tmp) / f"p{slots}")
            t0 = time.perf_counter()
            summaries = run_sweep(planned, parallel=slots)
            wall = time.perf_counter() - t0
            finals[slots] = [s["final_accuracy"] for s in summaries]
            ratios[f"{label[:3]}/(a)"] = wall / a
            print(f"{label:<28}: {wall:7.2f} s  = {wall / a:.2f}x (a)")
        if parallel:
            same = finals[1] == finals[parallel]
            print(f"same final accuracy run by run, 1 vs {parallel} at a time: {same}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="sims/sweeps/smoke.toml")
    parser.add_argument(
        "--parallel", type=int, default=2, help="runs at a time in (c); 0 leaves (c) out"
    )
    add_repeat(parser)
    args = parser.parse_args()
    if args.parallel < 0 or args.parallel == 1:
        parser.error(f"--parallel: got {args.parallel}; allowed: 0 (no (c)) or 2 or more")
    sweep = load_sweep(args.sweep)
    repeated(parser, args.repeat, lambda: compare_once(sweep, args.parallel))


if __name__ == "__main__":
    main()
