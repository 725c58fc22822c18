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
accuracies agree run by run.

Run:  .venv/bin/python benchmarks/python_runs.py [--sweep sims/sweeps/smoke.toml]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sims.compare import load_sweep, plan_sweep
from sims.launch import shared_runtimes, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="sims/sweeps/smoke.toml")
    args = parser.parse_args()
    sweep = load_sweep(args.sweep)
    with tempfile.TemporaryDirectory(prefix="fm-python-runs-") as tmp:
        scenarios = [run.scenario for run in plan_sweep(sweep, Path(tmp) / "plan")]
        print(f"sweep {sweep.name}: {len(scenarios)} runs")
        t0 = time.perf_counter()
        alone = [simulate(s, Path(tmp) / "a" / str(i)) for i, s in enumerate(scenarios)]
        a = time.perf_counter() - t0
        print(f"(a) a runtime per run      : {a:7.2f} s")
        t0 = time.perf_counter()
        with shared_runtimes():
            shared = [simulate(s, Path(tmp) / "b" / str(i)) for i, s in enumerate(scenarios)]
        b = time.perf_counter() - t0
        print(f"(b) one shared_runtimes block: {b:7.2f} s  = {b / a:.2f}x (a)")
        same = [r["final_accuracy"] for r in alone] == [r["final_accuracy"] for r in shared]
        print(f"same final accuracy run by run: {same}")


if __name__ == "__main__":
    main()
