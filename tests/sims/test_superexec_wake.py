"""A runtime's SuperExec looks for submitted runs often only when told that one is coming."""

from __future__ import annotations

import importlib
import socket
import threading
import time
from pathlib import Path

import pytest

from sims import warm


@pytest.fixture
def superexec_loop(monkeypatch: pytest.MonkeyPatch) -> object:
    """Flower's SuperExec loop module; its ``time`` is put back afterwards."""
    module = importlib.import_module("flwr.supercore.superexec.run_superexec")
    monkeypatch.setattr(module, "time", time)
    return module


def test_an_idle_superexec_sleeps_until_a_wake_up_then_polls_at_flowers_interval(
    superexec_loop: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warm, "IDLE_POLL", 30.0)
    path = str(tmp_path / "wake")
    warm._wake_on_request(path)
    patched = vars(superexec_loop)["time"]
    assert patched is not time and patched.monotonic is time.monotonic  # the rest is time's
    t0 = time.monotonic()
    patched.sleep(0.01)  # just started: awake, Flower's interval
    assert time.monotonic() - t0 < 30.0
    monkeypatch.setattr(warm, "IDLE_POLL", 1.0)
    monkeypatch.setattr(warm, "AWAKE", 0.0)
    monkeypatch.setattr(superexec_loop, "time", time)
    warm._wake_on_request(path)  # a SuperExec that started long ago, as it were
    patched = vars(superexec_loop)["time"]
    t0 = time.monotonic()
    patched.sleep(0.01)  # nobody said a run comes: the idle interval, not Flower's
    assert time.monotonic() - t0 >= 1.0
    monkeypatch.setattr(warm, "IDLE_POLL", 30.0)
    monkeypatch.setattr(warm, "AWAKE", 30.0)
    threading.Timer(0.2, warm.wake_superexec, (path,)).start()
    t0 = time.monotonic()
    patched.sleep(0.01)  # cut short by the wake-up
    assert time.monotonic() - t0 < 30.0
    t0 = time.monotonic()
    patched.sleep(0.01)  # awake now: Flower's interval
    assert time.monotonic() - t0 < 30.0


def test_a_wake_up_that_nobody_hears_is_harmless(tmp_path: Path) -> None:
    warm.wake_superexec(str(tmp_path / "nobody"))
    plain = tmp_path / "plain"
    plain.write_text("")  # not a socket
    warm.wake_superexec(str(plain))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "listening"))
        warm.wake_superexec(str(tmp_path / "listening"))
        assert sock.recv(64) == b"run"


def test_a_superexec_rests_once_it_has_launched_the_run_it_was_told_of(
    superexec_loop: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.proto.task_pb2 import Task
    from flwr.supercore.superexec.executor import LaunchResult

    original = vars(superexec_loop)["_handle_launch_result"]
    seen: list[object] = []
    monkeypatch.setattr(
        superexec_loop, "_handle_launch_result", lambda r, t: (seen.append(r), original(r, t))
    )
    monkeypatch.setattr(warm, "IDLE_POLL", 1.0)
    monkeypatch.setattr(warm, "AWAKE", 30.0)
    path = str(tmp_path / "wake")
    warm._wake_on_request(path)
    patched = vars(superexec_loop)["time"]
    handle = vars(superexec_loop)["_handle_launch_result"]
    task = Task(task_id=7, run_id=1)
    rejected = LaunchResult.capacity_rejected("busy")
    handle(rejected, task)  # the run is still to launch: awake, Flower's interval
    t0 = time.monotonic()
    patched.sleep(0.01)
    assert time.monotonic() - t0 < 1.0
    accepted = LaunchResult.accepted()
    handle(accepted, task)
    assert seen == [rejected, accepted]  # Flower's own handling still runs
    t0 = time.monotonic()
    patched.sleep(0.01)  # the run has started: the idle interval until the next wake-up
    assert time.monotonic() - t0 >= 1.0
    threading.Timer(0.2, warm.wake_superexec, (path,)).start()
    patched.sleep(0.01)  # cut short by the wake-up
    t0 = time.monotonic()
    patched.sleep(0.01)  # awake again
    assert time.monotonic() - t0 < 1.0
