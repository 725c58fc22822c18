"""What a forked run process saves when its warm process has imported the app.

Imports what a warm process imports (:data:`sims.warm.PRELOAD`), stages the
app as a runtime does, then forks children that load the ServerApp and the
ClientApp with Flower's own ``load_app`` from another copy of the app (as a
run loads its FAB), alternating: children of this process as it is (the app
not imported), and children of a fork of it that has imported the staged
copy first (:func:`sims.warm.import_app`). Prints each kind's median CPU
time per child (user + system, from ``os.wait4``) and the difference.

Run:  .venv/bin/python benchmarks/app_import.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import tempfile
from pathlib import Path

from sims.runtime import stage_app
from sims.warm import PRELOAD, app_components, import_app


def child_cpu(fab: Path) -> float:
    """Fork a child that loads the app's components from ``fab``; its CPU seconds."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            from flwr.supercore.object_ref import load_app

            for ref in app_components(fab):
                load_app(ref, ValueError, project_dir=fab)
        except BaseException:
            code = 1
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("a child failed to load the app")
    return usage.ru_utime + usage.ru_stime


def warm_child_cpu(app: Path, fab: Path) -> float:
    """The same, in a child of a fork of this process that has imported ``app`` first."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        import_app(str(app))
        os.write(write, repr(child_cpu(fab)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = pipe.read()
    os.waitpid(pid, 0)
    return float(said)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for module in PRELOAD:
        importlib.import_module(module)
    with tempfile.TemporaryDirectory(prefix="fm-app-import-") as tmp:
        app, fab = stage_app(Path(tmp) / "app"), stage_app(Path(tmp) / "fab")
        cold: list[float] = []
        warm: list[float] = []
        for _ in range(args.repeats):
            cold.append(child_cpu(fab))
            warm.append(warm_child_cpu(app, fab))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"CPU per forked process that loads the ServerApp and ClientApp, {args.repeats} each:")
    print(f"  app not imported by its parent: {c:.3f} s (median; {min(cold):.3f}-{max(cold):.3f})")
    print(f"  app imported by its parent:     {w:.3f} s (median; {min(warm):.3f}-{max(warm):.3f})")
    print(f"  saved per process:              {c - w:.3f} s")


if __name__ == "__main__":
    main()
