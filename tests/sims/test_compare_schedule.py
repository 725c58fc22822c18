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

from sims import compare, launch
from strategies.config import run_config_from_dict


def _runs(tmp_path: Path, n: int, done: int = 0) -> list[compare.PlannedRun]:
    runs = []
    for seed in range(n):
        # a Ray head of 8 CPUs: room for every run's clients at once
        scenario = run_config_from_dict({"seed": seed, "simulation": {"ray_num_cpus": 8}})
        run_dir = tmp_path / scenario.digest()
        run_dir.mkdir()
        state = "done" if seed < done else "new"
        if state == "done":
            (run_dir / "summary.json").write_text('{"status": "completed"}')
        runs.append(compare.PlannedRun(scenario, run_dir, state=state))
    return runs


def _fake(
    events: list[tuple[str, int]],
    lock: threading.Lock,
    seen_slots: list[tuple[int, int]] | None = None,
) -> Any:
    running: set[int] = set()

    def simulate(
        scenario: Any, run_dir: Path, *, on_round: Any = None, slot: int = 0, slots: int = 1
    ) -> dict[str, Any]:
        with lock:
            events.append(("start", scenario.seed))
            assert slot not in running, f"slot {slot} is taken by a run still going"
            running.add(slot)
            if seen_slots is not None:
                seen_slots.append((slot, slots))
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
        with lock:
            running.discard(slot)
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

    def failing(scenario: Any, run_dir: Path, **kwargs: Any) -> dict[str, Any]:
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


def test_runs_that_go_together_each_get_a_slot_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, int]] = []
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(compare, "simulate", _fake(events, threading.Lock(), seen))
    compare.run_sweep(_runs(tmp_path, 5), parallel=3)
    # the fake asserts that no two runs going at once share a slot
    assert len(seen) == 5 and {n for _, n in seen} == {3}
    assert {slot for slot, _ in seen} == {0, 1, 2}


@pytest.mark.parametrize(
    ("cpus", "per_client", "parallel", "expected"),
    [(8, 1, 3, 3), (2, 1, 3, 2), (4, 2, 4, 2), (2, 2, 2, 1), (3, 1, 1, 1)],
)
def test_runs_at_a_time_are_as_many_as_the_ray_head_holds(
    tmp_path: Path, cpus: int, per_client: int, parallel: int, expected: int
) -> None:
    sim = {"ray_num_cpus": cpus, "num_cpus_per_client": per_client}
    scenario = run_config_from_dict({"simulation": sim})
    runs = [compare.PlannedRun(scenario, tmp_path / str(i), state="new") for i in range(8)]
    at_a_time = compare.runs_at_a_time(runs, parallel)
    assert at_a_time == expected
    # every slot's head holds at least one client, and the slots split the head
    keys = [launch.runtime_key(scenario, slot, at_a_time) for slot in range(at_a_time)]
    assert len(set(keys)) == at_a_time
    assert all(head_cpus >= per_client for _, head_cpus, _ in keys)
    assert sum(head_cpus for _, head_cpus, _ in keys) <= cpus


def test_runs_on_a_cluster_of_the_users_go_one_at_a_time(tmp_path: Path) -> None:
    """Flower sizes each run's actor pool to the whole cluster: two could each hold part."""
    sim = {"ray_address": "10.0.0.5:6379"}
    runs = [compare.PlannedRun(run_config_from_dict({"simulation": sim}), tmp_path, state="new")]
    assert compare.runs_at_a_time(runs, 4) == 1
    done = [compare.PlannedRun(runs[0].scenario, tmp_path, state="done")]
    assert compare.runs_at_a_time(done, 4, force=True) == 1  # --force runs it again
    assert compare.runs_at_a_time(done, 4) == 1  # nothing of it runs


@pytest.mark.parametrize(("to_go", "expected"), [(0, 1), (1, 1), (2, 2), (5, 3)])
def test_no_more_runs_go_at_a_time_than_there_are_runs_to_go(
    tmp_path: Path, to_go: int, expected: int
) -> None:
    """A huge --parallel on a cached sweep once queued that many slots (and ran out of memory)."""
    scenario = run_config_from_dict({"simulation": {"ray_num_cpus": 3}})
    runs = [
        compare.PlannedRun(scenario, tmp_path / str(i), state="new" if i < to_go else "done")
        for i in range(6)
    ]
    assert compare.runs_at_a_time(runs, 10**9) == expected
