"""Start-up and shutdown of ``fedmerge simulate`` on the embedded default scenario.

Runs ``fedmerge simulate`` (the command a user types; default scenario unless
``--set`` overrides it) several times, each into a fresh temporary run
directory, and prints for every run:

- ``command``: wall time of the whole command, from its start to its exit;
- ``rounds``: the training rounds 1..R (``round_time`` in ``metrics.jsonl``);
- ``round 0``: the ServerApp's evaluation of the initial model;
- ``start-up + shutdown``: ``command`` minus ``rounds``, i.e. everything before
  round 1 (the command's imports, SuperLink, Ray, the simulation process, the
  ServerApp, round 0) plus everything after the last round;
- ``of which Flower + Ray``: the command's own ``simulate`` wall time minus the
  ServerApp's time from ready to finished (``summary.json``): the SuperLink,
  Ray, ``flwr run`` and the simulation process, without the command's imports
  and round 0.

Then the median of each column.

Run:  .venv/bin/python benchmarks/startup.py [--repeat 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDMERGE = Path(sys.executable).parent / "fedmerge"
COLUMNS = ("command", "rounds", "round 0", "start-up + shutdown", "of which Flower + Ray")


def one_run(overrides: list[str]) -> dict[str, float]:
    """Run ``fedmerge simulate`` once; return the columns of :data:`COLUMNS` in seconds."""
    with tempfile.TemporaryDirectory(prefix="fm-startup-") as tmp:
        run_dir = Path(tmp) / "run"
        argv = [str(FEDMERGE), "simulate", "--run-dir", str(run_dir)]
        for item in overrides:
            argv += ["--set", item]
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        command = time.perf_counter() - t0
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
    rounds = sum(r["round_time"] for r in rows if r["round"] >= 1)
    return {
        "command": command,
        "rounds": rounds,
        "round 0": rows[0]["round_time"],
        "start-up + shutdown": command - rounds,
        "of which Flower + Ray": summary["wall_time"] - summary["train_time"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    print("run " + "".join(f"{c:>24}" for c in COLUMNS))
    results = []
    for i in range(args.repeat):
        results.append(one_run(args.set))
        print(f"{i + 1:>3} " + "".join(f"{results[-1][c]:>22.2f} s" for c in COLUMNS))
    medians = {c: statistics.median(r[c] for r in results) for c in COLUMNS}
    print("med " + "".join(f"{medians[c]:>22.2f} s" for c in COLUMNS))


if __name__ == "__main__":
    main()
