"""Where a command's CPU goes: every process's CPU time, summed by the kind of process.

Reads ``/proc/PID/stat`` of every process on the machine every ``--every``
seconds while the command runs, keeps each process's last reading (a process
is a PID with its start time), subtracts what the processes that were already
running had spent before, and prints the sums by kind (:data:`KINDS`, the
first pattern found in a process's command line). A process that lived less
than one interval is missed, and the sampler's own CPU is left out; on a
machine that is otherwise idle, the sums are the command's. Ray
workers, which no one waits for, are counted like every other process.

Run:  .venv/bin/python benchmarks/process_cpu.py -- make test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from sims.processes import command_line, cpu_seconds, stat_fields

#: (kind, patterns): a process is of the first kind one of whose patterns its command
#: line contains.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ServerApps of simulated runs (flwr-simulation)", ("flwr-simulation",)),
    ("ClientApp actors (Ray workers)", ("ray::ClientAppActor",)),
    ("Ray worker shims and idle workers", ("fedmerge-ray-worker", "ray::IDLE")),
    ("warm processes and their drivers' processes", ("sims.warm serve", "sims.warm drivers")),
    ("SuperLinks", ("flower-superlink",)),
    ("SuperNodes", ("flower-supernode",)),
    ("fedmerge supernode's ClientApp processes", ("sims.clientapp_worker",)),
    ("SuperExecs", ("flower-superexec",)),
    ("deployed ServerApps and ClientApps", ("flwr-serverapp", "flwr-clientapp")),
    ("Ray heads: raylets", ("raylet",)),
    ("Ray heads: GCS servers", ("gcs_server",)),
    ("Ray heads: log monitors", ("log_monitor",)),
    ("Ray heads: agents", ("DashboardAgent", "RuntimeEnvAgent")),
    (
        "Ray heads: ray start and the rest",
        (
            "ray.util.client.server",
            "dashboard",
            "ray start",
            "sims.ray_head",  # `ray start` as a runtime starts it
            "monitor.py",
        ),
    ),
    ("pytest workers", ("-u -c import sys",)),
    ("command-line subprocesses (fedmerge, flwr)", ("sims.cli", "flwr ")),
)


def sample(seen: dict[tuple[str, str], tuple[float, str]]) -> None:
    """Update ``seen`` ((pid, start time) -> (CPU seconds, command line)) from /proc."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fields = stat_fields(int(pid))
        if fields is None:  # gone meanwhile
            continue
        key = (pid, fields[19])  # its start time
        # The last command line read: a Ray worker renames itself after its actor.
        command = command_line(int(pid)) or seen.get(key, (0.0, ""))[1]
        seen[key] = (cpu_seconds(fields), command)


def kind_of(command: str) -> str:
    for kind, patterns in KINDS:
        if any(p in command for p in patterns):
            return kind
    return "the rest"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=0.25, help="seconds between readings")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = parser.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        parser.error("give the command after --")
    seen: dict[tuple[str, str], tuple[float, str]] = {}
    sample(seen)
    before = {key: cpu for key, (cpu, _) in seen.items()}
    me = str(os.getpid())
    proc = subprocess.Popen(argv)
    while proc.poll() is None:
        sample(seen)
        time.sleep(args.every)
    sample(seen)
    totals: dict[str, list[float]] = {}
    for (pid, start), (cpu, command) in seen.items():
        spent = cpu - before.get((pid, start), 0.0)
        if pid == me or spent <= 0:
            continue
        total = totals.setdefault(kind_of(command), [0.0, 0])
        total[0] += spent
        total[1] += 1
    print(f"exit {proc.returncode}", file=sys.stderr)
    print(f"{'CPU s':>9} {'processes':>9}  kind")
    for kind, (cpu, count) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"{cpu:9.1f} {int(count):9d}  {kind}")
    print(f"{sum(t[0] for t in totals.values()):9.1f} {'':9}  in all")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
