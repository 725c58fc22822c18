"""A run that fails on a shared runtime stops it; the runs beside it say which run that was.

The runtime is a stand-in here (it fails one run and ends the other when it
is closed, as stopping a real SuperLink does); the real runs of a shared
runtime are in test_compare.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from sims import launch
from sims.errors import SimulationError
from strategies.config import run_config_from_dict


class _Runtime:
    """Fails the run in ``failing/``; ends every other run when closed."""

    def __init__(self) -> None:
        self.failed_run: Path | None = None
        self.closed = threading.Event()
        self.started = threading.Event()

    def start(self, ray_address: str, ray_num_cpus: int, log: Path, shared: bool = False) -> None:
        # what a simulation process writes there when Flower's engine cannot start its actors
        with log.open("a") as out:
            out.write("ERROR : An exception occurred !! actor died\n")

    def run(
        self, run_dir: Path, run_config: str, fed_config: str, on_round: Any = None
    ) -> str | None:
        (run_dir / "flower.log").write_text(f"log of {run_dir.name}\n")
        if run_dir.name == "failing":
            assert self.started.wait(30)  # the other run is going
            return "`flwr run` exited"
        self.started.set()
        assert self.closed.wait(30)
        return "`flwr run` exited"

    def close(self, grace: float = 1.0) -> None:
        self.closed.set()


def test_the_run_beside_a_failed_one_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "new_runtime", _Runtime)
    # A Ray address of its own: the session's shared runtimes are never this one.
    scenario = run_config_from_dict({"simulation": {"ray_address": "127.0.0.1:9"}})
    errors: dict[str, str] = {}

    def one(name: str) -> None:
        try:
            launch.simulate(scenario, tmp_path / name)
        except SimulationError as e:
            errors[name] = str(e)

    with launch.shared_runtimes():
        threads = [threading.Thread(target=one, args=(n,)) for n in ("failing", "beside")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    failing = (tmp_path / "failing").resolve()
    assert errors["failing"].startswith(f"run did not complete; see {failing / 'flower.log'}")
    assert "log of failing" in errors["failing"]
    # the block's log is a temporary file: the engine's error comes with the message
    assert " and the runtime's log " in errors["failing"]
    assert "An exception occurred !! actor died" in errors["failing"]
    assert errors["failing"].splitlines()[-1] == "`flwr run` exited"
    assert errors["beside"] == (
        f"run stopped: the run in {failing} failed and stopped the runtime that both ran on; "
        f"see {failing / 'flower.log'}"
    )


class _Finishing:
    """Finishes every run (its summary written); records whether it was closed."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.closed = False
        made.append(self)

    def start(self, ray_address: str, ray_num_cpus: int, log: Path, shared: bool = False) -> None:
        self.cpus = ray_num_cpus
        self.shared = shared

    def run(
        self, run_dir: Path, run_config: str, fed_config: str, on_round: Any = None
    ) -> str | None:
        assert not self.closed
        (run_dir / "summary.json").write_text("{}")
        self.runs.append(run_dir.name)
        return None

    def close(self, grace: float = 1.0) -> None:
        self.closed = True


made: list[_Finishing] = []


def test_a_nested_block_stops_the_runtimes_of_its_parallel_runs_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "new_runtime", _Finishing)
    monkeypatch.setattr(launch, "_shared", None)  # this test's blocks, not the session's
    made.clear()
    scenario = run_config_from_dict({"simulation": {"ray_num_cpus": 2}})
    with launch.shared_runtimes():
        launch.simulate(scenario, tmp_path / "alone")
        with launch.shared_runtimes():  # a sweep with two runs at a time, as compare runs it
            launch.simulate(scenario, tmp_path / "slot0", slot=0, slots=2)
            launch.simulate(scenario, tmp_path / "slot1", slot=1, slots=2)
            launch.simulate(scenario, tmp_path / "alone-again")
        assert [(r.runs, r.cpus, r.closed) for r in made] == [
            (["alone", "alone-again"], 2, False),  # the outer block's: still there
            (["slot0"], 1, True),  # a CPU each, stopped with the sweep
            (["slot1"], 1, True),
        ]
        launch.simulate(scenario, tmp_path / "after", slot=0, slots=2)  # a fresh one
    assert len(made) == 4 and made[3].runs == ["after"]
    assert all(r.closed for r in made)
    # a block's runtimes may serve several runs: their drivers are forked with Ray imported
    assert all(r.shared for r in made)
