"""A shared runtime with a Ray head of its own keeps its ClientApp actors from run to run.

A real SuperLink, Ray head and warm process (:class:`sims.runtime.Runtime`,
as ``fedmerge compare`` starts them): the second run's engine takes over the
first run's actors and computes the same model; a run that asks for other
resources gets actors of its own, and the kept ones are ended to free their
CPUs; once the warm process is gone, the kept actors end with it, and a run
started without it (each shim's fallback) gets the CPUs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections import Counter
from pathlib import Path

from sims.processes import alive, command_line, descendants
from sims.runtime import Runtime
from sims.scenario_files import load_scenario
from tests.e2e import loud_plugin
from tests.e2e.loud_plugin import LINE
from tests.e2e.runtime_runs import submit
from tests.references import REFERENCE_RUNS


def _digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()


def _client_lines(run_dir: Path) -> Counter[int]:
    """How many lines of :mod:`tests.e2e.loud_plugin` each partition's client has in the log."""
    found = re.findall(rf"{LINE} (\d+)", (run_dir / "flower.log").read_text())
    return Counter(int(p) for p in found)


def _trained(run_dir: Path) -> Counter[int]:
    """How many rounds each partition trained in, from ``metrics.jsonl``."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return Counter(p for row in rows for p in row["sampled"])


def test_runs_on_a_runtime_of_its_own_keep_their_actors(tmp_path: Path) -> None:
    # FedAvg whose clients print a line each time they train
    loud = ["strategy.name='toy-loud-fedavg'", f"plugins=['{loud_plugin.__file__}']"]
    base = [*REFERENCE_RUNS["fedavg"], *loud]
    runtime = Runtime()
    runtime.start("", 2, tmp_path / "runtime.log", shared=True)  # its own head, two CPUs
    actors: dict[str, list[int]] = {}

    def run(name: str, *overrides: str) -> bool:
        """Whether the run wrote its summary; its actors' workers at round 1 go into ``actors``."""

        def look(row: dict[str, object]) -> None:
            if row["round"] == 1 and runtime.warm is not None:
                found = [p for p in descendants(runtime.warm.pid) if alive(p)]
                actors[name] = sorted(p for p in found if "ray::ClientAppActor" in command_line(p))

        return submit(runtime, load_scenario(None, [*base, *overrides]), tmp_path / name, look)

    try:
        assert runtime.warm is not None
        warm = runtime.warm.pid
        assert run("a")
        assert run("b")
        assert len(actors["a"]) == 2, actors  # one actor per CPU
        assert actors["b"] == actors["a"], actors  # taken over, not started again
        assert all(alive(p) for p in actors["a"])  # left running by the run's end
        # Each run's log shows every line its clients printed, those of the actors that
        # run b took over (Ray's driver shows its own job's workers only) included.
        for name in ("a", "b"):
            assert _client_lines(tmp_path / name) == _trained(tmp_path / name), name
        # Two CPUs per client: one actor of other resources; the two kept ones are ended.
        assert run("c", "simulation.num_cpus_per_client=2")
        assert len(actors["c"]) == 1 and not set(actors["c"]) & set(actors["a"]), actors
        assert not any(alive(p) for p in actors["a"])
        os.kill(warm, signal.SIGTERM)  # each shim falls back to the real program
        runtime.warm.wait(timeout=30)
        # the kept actor ends with the warm process, so the cold run's actors get the CPUs
        assert run("cold")
        assert not alive(actors["c"][0])
    finally:
        runtime.close()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") == _digest(tmp_path / "cold")
