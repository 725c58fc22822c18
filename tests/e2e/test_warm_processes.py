"""Runs on one runtime get their Flower and Ray processes forked from the warm process.

A real SuperLink, Ray and Flower's SuperExec: ``flwr run``, the SuperExec's
``flwr-simulation`` and Ray's workers are shims whose requests the warm
process serves with a fork running the real program. Once the warm process is
gone, each shim runs the real program itself, and the run's numbers are the
same bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedmerge.run_end import END_OF_RUN
from sims.processes import alive, command_line, descendants, marked, stat_fields
from sims.runtime import MARKER, Runtime
from sims.scenario_files import load_scenario
from sims.warm import WAKE_ENV
from tests.e2e.runtime_runs import submit
from tests.references import REFERENCE_RUNS

#: The command line of a forked simulation process (the shim's starts with ``python -S``).
FORKED_SIMULATION = str(Path(sys.executable).parent / "flwr-simulation")


def _name(pid: int) -> str:
    """The process's name (``/proc/PID/comm``): what ``top`` and ``pgrep`` show."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""  # gone meanwhile


def _digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()


def _accuracies(run_dir: Path) -> list[float]:
    return [json.loads(x)["accuracy"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _whole_log(run_dir: Path) -> bool:
    """Whether ``flower.log`` shows every round's score and, last, the ServerApp's end."""
    lines = (run_dir / "flower.log").read_text().splitlines()
    scored = [f"round {r}: accuracy {a:.4f}" for r, a in enumerate(_accuracies(run_dir))]
    ours = [x for x in lines if any(s in x for s in scored) or END_OF_RUN in x]
    return len(ours) == len(scored) + 1 and END_OF_RUN in ours[-1]


def test_runs_are_forked_from_the_warm_process_and_equal_a_cold_one(
    ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = load_scenario(
        None, [*REFERENCE_RUNS["fedavg"], f"simulation.ray_address='{ray_address}'"]
    )
    # As in a user's shell: Python buffers what Flower's programs print to their logs,
    # unless the runtime says otherwise (a stopped `flwr run` lost its whole buffer).
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    runtime = Runtime()
    runtime.start(ray_address, 0, tmp_path / "runtime.log", shared=True)

    def run(name: str, on_round: Callable[[dict[str, Any]], None] | None = None) -> bool:
        """Whether the run wrote its summary."""
        return submit(runtime, scenario, tmp_path / name, on_round)

    try:
        assert runtime.warm is not None
        warm = runtime.warm.pid
        children: list[list[int]] = []
        workers: list[list[int]] = []
        at_round0: list[list[int]] = []  # each run's actors' workers when round 0 is written
        at_round1: list[list[int]] = []
        titles: set[str] = set()  # the programs the forked children run
        names: set[str] = set()  # the actors' workers' process names
        # what the simulation processes were forked from: (its command line, its parent)
        drivers_parents: set[tuple[str, int]] = set()

        def look(row: dict[str, Any]) -> None:
            found = [p for p in descendants(warm) if alive(p)]
            children.append(found)
            titles.update(Path(command_line(p).split(" ")[0]).name for p in found)
            for pid in found:
                fields = stat_fields(pid)
                if fields is not None and command_line(pid).startswith(FORKED_SIMULATION):
                    above = stat_fields(int(fields[1])) or ["", "-1"]
                    drivers_parents.add((command_line(int(fields[1])).strip(), int(above[1])))
            # A Ray worker names itself after its actor (setproctitle) once it is created.
            actors = sorted(p for p in found if "ray::ClientAppActor" in command_line(p))
            if row["round"] == 0:  # the ServerApp waited for the actors before this row
                at_round0.append(actors)
            if row["round"] >= 1:  # the actors have trained: their workers run
                workers.append(actors)
                # named as Ray's setproctitle names a cold worker: what top and pgrep show
                names.update(n for n in map(_name, workers[-1]) if n)
            if row["round"] == 1:
                at_round1.append(actors)

        assert run("a", look)
        assert run("b", look)
        # Every round of both runs found `flwr run` and the simulation process
        # below the warm process; every trained round, the actors' Ray workers.
        assert children and all(len(found) >= 2 for found in children), children
        assert {"flwr", "flwr-simulation", "ray::ClientAppActor", "flower-superexec"} <= titles
        # Both runs' simulation processes (Ray drivers) were forked from one child of
        # the warm process that had imported Ray with their environment; the warm
        # process itself has not imported Ray (its forked Ray workers could not run).
        assert drivers_parents == {(f"{sys.executable} -m sims.warm drivers", warm)}, (
            drivers_parents
        )
        # The forked SuperExec listens for the wake-up that each run sends.
        assert stat.S_ISSOCK(Path(runtime.env[WAKE_ENV]).stat().st_mode)
        assert all(workers), workers
        # The actors were up before the initial model was scored: the same ones trained.
        assert len(at_round0) == 2 and all(at_round0), at_round0
        assert at_round0 == at_round1, (at_round0, at_round1)
        # The Ray cluster is not the runtime's: its actors are not kept for the next run
        # (tests/e2e/test_kept_actors.py keeps them, on a head of the runtime's own).
        assert not set(at_round1[0]) & set(at_round1[1]), at_round1
        assert names == {"ray::ClientAppA"}, names
        forks = {pid for found in children for pid in found}
        assert len(forks) >= 6, forks  # three or more per run
        assert alive(warm)
        # A forked child shows the warnings that the same program started cold
        # would: Python's defaults hide the DeprecationWarnings of Flower's
        # dependencies, which Flower's Ray transport shows once the warm process
        # has imported it.
        for log in (tmp_path / "runtime.log", tmp_path / "a" / "flower.log"):
            assert "DeprecationWarning" not in log.read_text(), log.read_text()

        os.kill(warm, signal.SIGTERM)  # each shim falls back to the real program
        runtime.warm.wait(timeout=30)
        assert run("cold")
    finally:
        runtime.close()
    # Nothing of the runtime is left: the cold run's ServerApp, started by a SuperExec
    # that the warm process had forked, lost its parent's tree and outlived close() by
    # seconds (Flower's parent watch ended it).
    assert marked(MARKER, runtime.env[MARKER]) == []
    # every run's log is whole, the cold one's too (Flower's own intervals there)
    for name in ("a", "b", "cold"):
        assert _whole_log(tmp_path / name), (tmp_path / name / "flower.log").read_text()
    assert "actors up after" in (tmp_path / "a" / "flower.log").read_text()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") == _digest(tmp_path / "cold")
    assert _accuracies(tmp_path / "a") == _accuracies(tmp_path / "cold")
