"""How ``run_sweep`` schedules parallel runs (the runs themselves are stand-ins here).

Flower installs the app on a run's first start and takes a half-copied
install of a concurrent run for a finished one, so with ``parallel > 1`` the
first run goes alone until it writes its first metrics row (a resumed run's
rows from before its interruption do not count). The real
Flower runs of ``--parallel 2`` are in test_compare.py.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sims import compare
from strategies.config import run_config_from_dict


def _runs(tmp_path: Path, n: int, done: int = 0) -> list[compare.PlannedRun]:
    runs = []
    for seed in range(n):
        scenario = run_config_from_dict({"seed": seed})
        run_dir = tmp_path / scenario.digest()
        run_dir.mkdir()
        state = "done" if seed < done else "new"
        if state == "done":
            (run_dir / "summary.json").write_text('{"status": "completed"}')
        runs.append(compare.PlannedRun(scenario, run_dir, state=state))
    return runs


def _fake(events: list[tuple[str, int]], lock: threading.Lock) -> Any:
    def simulate(scenario: Any, run_dir: Path, *, on_round: Any = None) -> dict[str, Any]:
        with lock:
            events.append(("start", scenario.seed))
        # As sims.launch.simulate does, every row already in metrics.jsonl (a
        # resumed run's rows from before its interruption) goes to on_round first.
        metrics = run_dir / "metrics.jsonl"
        for line in metrics.read_text().splitlines() if metrics.exists() else []:
            on_round(json.loads(line))
        time.sleep(0.3)  # installing the app, starting the ServerApp
        with lock:
            events.append(("row", scenario.seed))
        on_round({"round": 0})
        time.sleep(0.3)
        return {"status": "completed", "wall_time": 0.6}

    return simulate


@pytest.mark.parametrize("done", [0, 1])
def test_the_first_run_to_start_goes_alone_until_its_first_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, done: int
) -> None:
    events: list[tuple[str, int]] = []
    monkeypatch.setattr(compare, "simulate", _fake(events, threading.Lock()))
    runs = _runs(tmp_path, 4, done=done)
    summaries = compare.run_sweep(runs, parallel=3)
    assert [s["status"] for s in summaries] == ["completed"] * 4
    first = done  # cached runs never start
    assert events[:2] == [("start", first), ("row", first)]
    started = [seed for kind, seed in events if kind == "start"]
    assert sorted(started) == list(range(done, 4))
    # after the first row the others go together: two start at once on the two free workers
    assert [k for k, _ in events[2:4]] == ["start", "start"]


def test_a_first_run_that_fails_before_any_row_stops_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def failing(scenario: Any, run_dir: Path, *, on_round: Any = None) -> dict[str, Any]:
        calls.append(scenario.seed)
        raise RuntimeError("simulation failed")

    monkeypatch.setattr(compare, "simulate", failing)
    with pytest.raises(RuntimeError, match="simulation failed"):
        compare.run_sweep(_runs(tmp_path, 3), parallel=2)
    assert calls == [0]  # nothing else started after the first run failed


def test_a_resumed_first_run_goes_alone_until_it_writes_a_new_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its rows from before the interruption do not mean that this sweep installed the app."""
    events: list[tuple[str, int]] = []
    monkeypatch.setattr(compare, "simulate", _fake(events, threading.Lock()))
    runs = _runs(tmp_path, 3)
    runs[0] = dataclasses.replace(runs[0], state="resume")
    (runs[0].run_dir / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    compare.run_sweep(runs, parallel=2)
    assert events[:2] == [("start", 0), ("row", 0)]
    assert sorted(seed for kind, seed in events if kind == "start") == [0, 1, 2]
