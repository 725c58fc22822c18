"""Runs started from Python: each on a runtime of its own, or all in one ``shared_runtimes`` block.

The runs of a sweep (default: ``sims/sweeps/smoke.toml``, FedAvg and FedProx x
two seeds) go through ``sims.launch.simulate`` twice in this process, each
time into a fresh temporary runs root:

(a) one call per run, outside any block: every call starts a runtime (the
    warm process, a SuperLink, a Ray head) and stops it when its run ends,
    as that many ``fedmerge simulate`` commands would;
(b) the same calls inside one ``sims.launch.shared_runtimes()`` block: the
    first call starts the runtime, the others run on it, the block's end
    stops it.

Prints the wall time of each, the ratio b/a, and whether the final
accuracies agree run by run. ``--repeat N`` does both N times, (a) first in
the first repetition, (b) first in the second, and so on, and prints the
median ratio last.

Run:  .venv/bin/python benchmarks/python_runs.py [--sweep sims/sweeps/smoke.toml] [--repeat 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sims.compare import load_sweep, plan_sweep
from sims.launch import shared_runtimes, simulate
from strategies.config import RunConfig


def alone(scenarios: list[RunConfig], root: Path) -> list[dict[str, Any]]:
    """(a): every run on a runtime of its own."""
    return [simulate(s, root / str(i)) for i, s in enumerate(scenarios)]


def shared(scenarios: list[RunConfig], root: Path) -> list[dict[str, Any]]:
    """(b): every run in one ``shared_runtimes`` block."""
    with shared_runtimes():
        return [simulate(s, root / str(i)) for i, s in enumerate(scenarios)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="sims/sweeps/smoke.toml")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat: got {args.repeat}; allowed: 1 or more")
    sweep = load_sweep(args.sweep)
    ratios = []
    with tempfile.TemporaryDirectory(prefix="fm-python-runs-") as tmp:
        scenarios = [run.scenario for run in plan_sweep(sweep, Path(tmp) / "plan")]
        print(f"sweep {sweep.name}: {len(scenarios)} runs")
        for rep in range(args.repeat):
            ways = [("a", alone), ("b", shared)]
            walls, finals = {}, {}
            for label, way in ways if rep % 2 == 0 else ways[::-1]:
                t0 = time.perf_counter()
                summaries = way(scenarios, Path(tmp) / f"{label}{rep}")
                walls[label] = time.perf_counter() - t0
                finals[label] = [r["final_accuracy"] for r in summaries]
            ratios.append(walls["b"] / walls["a"])
            print(
                f"(a) a runtime per run: {walls['a']:7.2f} s   (b) one shared_runtimes block: "
                f"{walls['b']:7.2f} s  = {ratios[-1]:.2f}x (a)   same final accuracy run by run: "
                f"{finals['a'] == finals['b']}"
            )
        if args.repeat > 1:
            listed = " / ".join(f"{r:.2f}" for r in ratios)
            print(f"b/a median of {args.repeat}: {statistics.median(ratios):.2f}x  ({listed})")


if __name__ == "__main__":
    main()
