"""Wall time of a command and the CPU time the whole machine spent meanwhile.

``/usr/bin/time`` counts only the processes that the command waits for: a Ray
worker is reaped by its raylet, which ignores SIGCHLD, so its CPU time is
never added to anyone's. This script reads the machine's busy time from
``/proc/stat`` (user, nice, system, irq, softirq, steal) before and after the
command instead; on an otherwise idle machine that is the command's CPU time,
every process it started included.

Run:  .venv/bin/python benchmarks/machine_cpu.py -- make test
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def busy_seconds() -> float:
    """CPU seconds this machine has spent busy since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _minutes(seconds: float) -> str:
    """``M min S s``; below a minute, seconds to two decimals."""
    if seconds < 60:
        return f"{seconds:.2f} s"
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    busy, start = busy_seconds(), time.monotonic()
    try:
        code = subprocess.call(argv)
    except OSError as exc:
        print(f"machine_cpu.py: command: got {argv[0]!r}; {exc.strerror}", file=sys.stderr)
        return 2
    wall, cpu = time.monotonic() - start, busy_seconds() - busy
    print(
        f"exit {code}; wall {_minutes(wall)}; machine CPU {_minutes(cpu)} "
        f"({cpu / wall:.2f} cores busy)",
        file=sys.stderr,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
