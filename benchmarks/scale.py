r"""Start-up, time per round and memory of a simulation as the number of clients grows.

For each client count, ``fedmerge simulate`` runs the default scenario
(Fashion-MNIST, simple CNN) with that many clients on an IID split, 10 per
round, 2 rounds, and the script prints:

- start-up: everything before round 1 and the shutdown after the last
  (wall time of the whole call less the rounds);
- the ServerApp's own start-up (before round 1, ``summary.json``);
- the mean time of a training round;
- peak memory: the largest sum of the resident memory (RSS) of every
  process of the run seen while it ran, and the largest private memory (USS)
  of one ClientApp actor's Ray worker (found by its process name,
  ``ray::ClientAppA``, as Ray names it).

Memory is sampled every 0.2 s from /proc (Linux). The data set must hold at
least as many training samples as there are clients (Fashion-MNIST: 60,000;
MNIST-1D as many as ``dataset.mnist1d_samples``).

Run:  .venv/bin/python benchmarks/scale.py [--clients 1000,10000] [--max-nodes 64]
      .venv/bin/python benchmarks/scale.py --clients 1000,10000,100000 \
          --set "dataset.name='mnist1d'" --set dataset.mnist1d_samples=250000 \
          --set "model.name='mlp'"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from sims.launch import simulate
from sims.processes import descendants
from sims.scenario_files import load_scenario

#: The process name (``/proc/PID/comm``, 15 bytes) of a ClientApp actor's Ray worker.
ACTOR_NAME = "ray::ClientAppA"


def _memory(pid: int) -> tuple[int, int, str]:
    """(RSS, USS) in bytes and the command name of ``pid`` (zeros if it is gone)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return 0, 0, ""
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in rollup[1:]}
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Rss", 0), uss, name


class MemorySampler(threading.Thread):
    """Peak RSS of this process's descendants together, and peak USS of one actor's worker."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_rss = 0
        self.peak_worker_uss = 0
        self._done = threading.Event()

    def run(self) -> None:
        """Sample until :meth:`stop`."""
        while not self._done.is_set():
            total = 0
            for pid in descendants(os.getpid()):
                rss, uss, name = _memory(pid)
                total += rss
                if name.startswith(ACTOR_NAME):
                    self.peak_worker_uss = max(self.peak_worker_uss, uss)
            self.peak_rss = max(self.peak_rss, total)
            self._done.wait(0.2)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._done.set()
        self.join()


def measure(clients: int, max_nodes: int, overrides: list[str]) -> dict[str, float]:
    config = load_scenario(
        None,
        [
            f"num_clients={clients}", "clients_per_round=10", "rounds=2",
            "partition.scheme='iid'", f"simulation.max_nodes={max_nodes}",
            f"name='scale-{clients}'", *overrides,
        ],
    )  # fmt: skip
    sampler = MemorySampler()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="fm-scale-") as tmp:
        t0 = time.perf_counter()
        summary = simulate(config, Path(tmp) / "run")
        wall = time.perf_counter() - t0
        rows = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    sampler.stop()
    round_times = [json.loads(r)["round_time"] for r in rows[1:]]
    return {
        "startup": wall - summary["train_time"],
        "serverapp_startup": summary["startup_time"],
        "round": statistics.mean(round_times),
        "peak_rss_gb": sampler.peak_rss / 1e9,
        "peak_worker_uss_gb": sampler.peak_worker_uss / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1000,10000")
    parser.add_argument("--max-nodes", type=int, default=64)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="scenario override for every client count (e.g. dataset.name='mnist1d')",
    )  # fmt: skip
    args = parser.parse_args()
    print(f"{'clients':>8} {'start-up s':>10} {'ServerApp s':>11} {'round s':>8} "
          f"{'peak RSS GB':>11} {'worker USS GB':>13}")  # fmt: skip
    for n in (int(c) for c in args.clients.split(",")):
        m = measure(n, args.max_nodes, args.set)
        print(
            f"{n:>8} {m['startup']:>10.1f} {m['serverapp_startup']:>11.1f} {m['round']:>8.2f} "
            f"{m['peak_rss_gb']:>11.2f} {m['peak_worker_uss_gb']:>13.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
