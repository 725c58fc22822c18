"""CPU of an idle deployment: a SuperLink and SuperNodes on loopback, no run going.

Starts ``fedmerge superlink --insecure --no-auth`` on 127.0.0.1 and
``--nodes`` ``fedmerge supernode --insecure`` beside it (``--isolation``:
``process``, fedmerge's default, one long-lived ClientApp process per node;
or ``subprocess``, Flower's default), waits ``--settle`` seconds, then sums
the CPU time of every process of the deployment (read from ``/proc``) over
``--window`` seconds, and stops them all by PID.

It does that twice in the same run:

- ``poll 0.1 s``: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1`` in the environment,
  the interval fedmerge used to set for every Flower process (each SuperExec
  asks for a task ten times a second);
- ``fedmerge``: the environment as it is, which is what ``fedmerge
  superlink`` and ``fedmerge supernode`` run with now.

and prints each one's CPU as a share of one core, by process, and the ratio.

Run:  .venv/bin/python benchmarks/deploy_idle.py [--nodes 2] [--isolation process]
      [--settle 15] [--window 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from sims.processes import command_line, cpu_seconds, descendants, free_port, stat_fields, stop_tree
from sims.runtime import wait_healthy

POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def cpu_of(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each of ``pids`` still running."""
    out = {}
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None:
            out[pid] = cpu_seconds(fields)
    return out


def kind(pid: int) -> str:
    """A short name for a process of the deployment, from its command line."""
    words = command_line(pid).split()
    for word in words:
        name = Path(word).name
        if name.startswith(("flower-", "flwr-")):
            return name
        if name == "sims.clientapp_worker":
            return "ClientApp process (sims.clientapp_worker)"
    if "sims.cli" in words:
        return "fedmerge supernode (supervisor)"
    return " ".join(words[:2])


def idle_cpu(args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    """CPU seconds by process kind of an idle deployment over ``args.window`` seconds."""
    fedmerge = [sys.executable, "-m", "sims.cli"]
    port = free_port()
    roots: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fm-idle-") as home:
        env = {**env, "FLWR_HOME": home}
        try:
            superlink = subprocess.Popen(
                [*fedmerge, "superlink", "--insecure", "--no-auth", "--host", "127.0.0.1",
                 "--port", str(port)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            roots.append(superlink)
            wait_healthy(port, superlink, timeout=60)
            for i in range(args.nodes):
                node = subprocess.Popen(
                    [*fedmerge, "supernode", "--insecure",
                     "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                     "--isolation", args.isolation,
                     "--node-config", f"partition-id={i} num-partitions={args.nodes}"],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
                roots.append(node)
            time.sleep(args.settle)
            pids = [q for p in roots for q in (p.pid, *descendants(p.pid))]
            before = cpu_of(pids)
            time.sleep(args.window)
            after = cpu_of(pids)
            spent: defaultdict[str, float] = defaultdict(float)
            for pid, seconds in after.items():
                spent[kind(pid)] += seconds - before.get(pid, 0.0)
            return dict(spent)
        finally:
            stop_tree([p.pid for p in roots], grace=5.0)
            for proc in roots:
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--isolation", choices=("process", "subprocess"), default="process")
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k != POLL_ENV}
    settings = {"poll 0.1 s": {**base, POLL_ENV: "0.1"}, "fedmerge": base}
    results = {name: idle_cpu(args, env) for name, env in settings.items()}
    print(
        f"idle deployment: a SuperLink and {args.nodes} SuperNodes "
        f"(--isolation {args.isolation}), CPU over {args.window:.0f} s, as % of one core"
    )
    kinds = sorted({k for spent in results.values() for k in spent})
    print(f"{'process':<45}" + "".join(f"{name:>14}" for name in results))
    for k in kinds:
        cells = "".join(
            f"{100 * spent.get(k, 0.0) / args.window:13.1f}%" for spent in results.values()
        )
        print(f"{k:<45}{cells}")
    totals = {name: 100 * sum(spent.values()) / args.window for name, spent in results.items()}
    print(f"{'total':<45}" + "".join(f"{t:13.1f}%" for t in totals.values()))
    old, new = totals["poll 0.1 s"], totals["fedmerge"]
    print(f"fedmerge / poll 0.1 s: {new / old:.2f}x" if old else "no CPU measured")


if __name__ == "__main__":
    main()
