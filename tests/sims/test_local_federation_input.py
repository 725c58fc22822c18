"""``fedmerge federation up|down``: bad input, the split, PIDs reused by other processes, and
processes that outlive SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sims.local_federation
from fedmerge.data import load_dataset
from sims.certs import write_certs
from sims.cli import main
from sims.local_federation import (
    LOCK_FILE,
    STATE_FILE,
    FederationOptions,
    down,
    running,
    split_data,
    start_time,
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "0"], "--nodes: got 0; allowed: 1 to 64"),
        (["--port", "70000"], "--port: got 70000; allowed: 1 to 65535"),
        (["--dataset", "imagenet"], "--dataset: got 'imagenet'; allowed: cifar10"),
        (["--seed", "-1"], "--seed: got -1; allowed: an integer >= 0"),
        (["--dataset", "mnist", "--dataset-root", "/nonexistent"],
         "--dataset-root: got '/nonexistent', which is not a directory; allowed: a directory "
         "holding the data set's files (nothing is downloaded)"),
    ],
)  # fmt: skip
def test_up_refuses_bad_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["federation", "up", str(tmp_path / "f"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "f").exists()  # refused before anything was written


def test_down_without_a_state_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["federation", "down", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"DIR: got '{tmp_path}', which has no readable {STATE_FILE}" in err
    assert "\n" not in err


def test_split_covers_every_sample_once(tmp_path: Path) -> None:
    data = load_dataset("digits")
    split_data(FederationOptions(tmp_path, nodes=3, dataset="digits"), data)
    shards = [np.load(tmp_path / f"node-{i}" / "data.npz") for i in range(3)]
    for split in ("train", "test"):
        x = np.concatenate([s[f"{split}_x"] for s in shards])
        y = np.concatenate([s[f"{split}_y"] for s in shards])
        ref_x = getattr(data, f"{split}_x").numpy()
        assert len(x) == len(ref_x)
        order_x, order_ref = (
            np.lexsort(x.reshape(len(x), -1).T),
            np.lexsort(ref_x.reshape(len(ref_x), -1).T),
        )
        np.testing.assert_array_equal(x[order_x], ref_x[order_ref])
        assert sorted(y.tolist()) == sorted(getattr(data, f"{split}_y").numpy().tolist())
    sizes = [len(s["train_y"]) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_down_leaves_a_reused_pid_alone(tmp_path: Path) -> None:
    """A recorded PID whose start time differs is another process: not signalled."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = {
            "processes": [{"role": "superlink", "pid": proc.pid, "start_time": -1}],
        }
        (tmp_path / STATE_FILE).write_text(json.dumps(state))
        assert running(state) == []
        assert down(tmp_path) == []
        assert proc.poll() is None  # still running
        assert not (tmp_path / STATE_FILE).exists()
        state["processes"][0]["start_time"] = start_time(proc.pid)
        assert running(state) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


def test_down_waits_for_processes_it_had_to_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes that ignore SIGTERM (a SuperLink that waits for a streaming ``flwr run``
    does, for longer than the grace period) are SIGKILLed; ``down`` then returns once they
    are gone. It used to look right after the SIGKILL, find them still running, and exit
    1 with "did not stop"."""
    monkeypatch.setattr(sims.local_federation, "STOP_GRACE", 0.3)
    ignore = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path(sys.argv[1]).write_text('')\n"
        "time.sleep(120)\n"
    )
    marks = [tmp_path / f"ready-{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", ignore, str(m)]) for m in marks]
    try:
        deadline = time.monotonic() + 30
        while not all(m.exists() for m in marks):
            assert time.monotonic() < deadline, "the processes did not start"
            time.sleep(0.02)
        pids = [p.pid for p in procs]
        state = {
            "processes": [
                {"role": f"node-{i}", "pid": pid, "start_time": start_time(pid)}
                for i, pid in enumerate(pids)
            ]
        }
        (tmp_path / STATE_FILE).write_text(json.dumps(state))
        assert down(tmp_path) == pids  # no "did not stop"
        # gone, SIGKILLed after they ignored SIGTERM; their statuses are their Popen's to
        # collect (stop_tree reaps nothing)
        assert [p.wait(5) for p in procs] == [-signal.SIGKILL] * 3
        assert not (tmp_path / STATE_FILE).exists()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_up_refuses_a_directory_where_a_federation_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    me = os.getpid()  # a live process recorded with its own start time
    state = {"processes": [{"role": "superlink", "pid": me, "start_time": start_time(me)}]}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert main(["federation", "up", str(tmp_path), "--nodes", "1"]) == 2
    err = capsys.readouterr().err
    assert f"where a federation runs (PIDs [{me}])" in err
    assert not (tmp_path / "certs").exists()


def test_up_when_the_superlink_cannot_start_is_one_line_and_stops_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real SuperLink on a port that another socket holds exits at once: ``up`` says so in
    one line, exits 1, and leaves no process of its own running."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = main(["federation", "up", str(tmp_path / "f"), "--nodes", "1",
                     "--port", str(port)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("fedmerge: federation failed: the SuperLink exited with code")
    assert not any("Traceback" in line for line in err)
    state = tmp_path / "f" / STATE_FILE
    if state.exists():  # whatever it recorded is gone
        assert running(json.loads(state.read_text())) == []


def test_up_refuses_a_directory_with_a_quote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["federation", "up", str(tmp_path / "it's")]) == 2
    err = capsys.readouterr().err.strip()
    assert "DIR: got" in err and "allowed: a path without quotes" in err and "\n" not in err
    assert not (tmp_path / "it's").exists()


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file()}  # fmt: skip


def test_up_that_cannot_load_its_data_leaves_the_last_federations_files_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data set is loaded before anything is written: a root without MNIST's files is
    refused in one line, and the certificates of the federation that ran here stay."""
    fed = tmp_path / "fed"
    write_certs(fed / "certs", ["127.0.0.1"], 2)
    before = _files(fed)
    empty = tmp_path / "no-mnist-here"
    empty.mkdir()
    code = main(["federation", "up", str(fed), "--nodes", "2", "--dataset", "mnist",
                 "--dataset-root", str(empty)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("fedmerge: error: ") and "input: got" not in err
    after = _files(fed)
    after.pop(LOCK_FILE)  # empty: the lock that up held
    assert after == before


def test_a_second_up_or_down_meanwhile_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = tmp_path / "fed"
    fed.mkdir()
    me = os.getpid()  # a "federation" of this process: down would stop it
    state = {"processes": [{"role": "superlink", "pid": me, "start_time": start_time(me)}]}
    (fed / STATE_FILE).write_text(json.dumps(state))
    holder = subprocess.Popen(  # another up or down at work: it holds the directory's lock
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(fed / LOCK_FILE)!r}, 'a')\n"
         "fcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        for action in (["up", str(fed), "--nodes", "1"], ["down", str(fed)]):
            assert main(["federation", *action]) == 2
            err = capsys.readouterr().err
            assert err == (
                f"fedmerge: error: DIR: got {str(fed)!r}, where another fedmerge federation "
                "up or down is at work; allowed: the same command once it has finished, or "
                "another directory\n"
            )
    finally:
        holder.kill()
        holder.wait()
    assert (fed / STATE_FILE).exists() and not (fed / "certs").exists()


@pytest.mark.parametrize("processes", [[{"x": 1}], [5], [{"pid": "12"}], [{"pid": -1}], {"pid": 3}])
def test_down_with_a_damaged_state_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], processes: object
) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"processes": processes}))
    assert main(["federation", "down", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedmerge: error: DIR: {str(tmp_path / STATE_FILE)!r} is not a federation state file "
        "(a list of processes, each with its PID); allowed: the federation.json that fedmerge "
        "federation up wrote\n"
    )
