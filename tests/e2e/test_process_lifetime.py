"""Nothing ``fedmerge simulate`` starts outlives it, even when it is killed with SIGKILL,
and the run killed so resumes as if never killed; a Ray worker that dies stops the
run, which then resumes.

The first run starts its own SuperLink and Ray head (no ``simulation.ray_address``),
so the tree below the CLI holds every kind of process a run has: the
watchdog, the SuperLink and its SuperExec, ``flwr run``, the simulation
process, Ray's daemons and the ClientApp actors.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sims.launch import SimulationError, simulate
from sims.processes import (
    alive,
    command_line,
    descendants,
    marked,
    runs_program,
    stat_fields,
    stop_tree,
)
from sims.runs import read_json, read_rows
from sims.runtime import Runtime
from sims.scenario_files import load_scenario
from tests.e2e.short_runs import SHORT, TEST_SAMPLES

REPO = Path(__file__).resolve().parent.parent.parent


_LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp*
RAY_CLIENT_PORT = 10001  # where `ray start` puts its Client server unless told otherwise


def _listen_table() -> dict[str, str]:
    """Every listening TCP socket of the machine: inode -> local address (``IP:PORT``).

    Read from ``/proc/net/tcp`` and ``tcp6``, the addresses decoded from hexadecimal.
    """
    sockets: dict[str, str] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != _LISTEN:
                continue
            ip_hex, port_hex = local.split(":")
            raw = bytes.fromhex(ip_hex)
            # each 32-bit word is in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(words)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            assert len(ip_hex) == width
            sockets[inode] = f"{ip}:{int(port_hex, 16)}"
    return sockets


def _socket_inodes(pid: int) -> list[str]:
    """The inodes of the sockets ``pid`` holds open (``/proc/PID/fd``); none once it has ended."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # the process has ended
        return []
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return [x[len("socket:[") : -1] for x in links if x.startswith("socket:[")]


def _listening(pids: list[int], table: dict[str, str]) -> dict[int, list[str]]:
    """The addresses in ``table`` (:func:`_listen_table`) that ``pids`` listen on, by PID."""
    found: dict[int, list[str]] = {}
    for pid in pids:
        addresses = sorted(table[i] for i in _socket_inodes(pid) if i in table)
        if addresses:
            found[pid] = addresses
    return found


def test_sigkill_of_simulate_leaves_no_process_behind(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tree: list[int] = []
    argv = [
        sys.executable, "-m", "sims.cli", "simulate", "default", "--run-dir", str(run_dir),
        "--set", "rounds=20", "--set", "num_clients=4", "--set", "clients_per_round=2",
        "--set", "simulation.ray_num_cpus=2",
        # whole local epochs: rounds of 40 steps end so fast that one more can be
        # written while the watchdog is still stopping the tree
        "--set", TEST_SAMPLES,
    ]  # fmt: skip
    # Another program on Ray's default Client port that lets others share it, as a
    # second Ray head would. Held elsewhere already, it is someone else's socket there.
    squat = socket.socket()
    squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with contextlib.suppress(OSError):
        squat.bind(("127.0.0.1", RAY_CLIENT_PORT))
        squat.listen()
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline and not any(r["round"] == 1 for r in rows):
            assert proc.poll() is None, f"simulate exited early with {proc.returncode}"
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists():
                rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            time.sleep(0.1)
        assert any(r["round"] == 1 for r in rows), "round 1 never finished"
        tree = descendants(proc.pid)
        commands = " ".join(command_line(p) for p in tree)
        for part in ("sims.processes", "flower-superlink", "flwr run", "raylet", "gcs_server"):
            assert part in commands, f"{part} is not below the CLI: the test sees too little"
        assert any("ClientAppActor" in command_line(p) for p in tree)
        # Nothing of a run uses Ray Client or Ray's API server: its head starts neither.
        for server in ("ray.util.client.server", "/dashboard/dashboard.py"):
            assert not any(server in command_line(p) for p in tree), (server, commands)
        # Ray's own Python programs of the head are forked from the warm process (a
        # shim below the raylet or `ray start` stands for each): none starts cold.
        warm = next(p for p in tree if "sims.warm serve" in command_line(p))
        forked = set(descendants(warm))
        for program in ("/log_monitor.py", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            found = {p for p in tree if program in command_line(p)} - {
                p for p in tree if "fedmerge-ray-worker" in command_line(p)
            }
            assert found and found <= forked, (program, {p: command_line(p) for p in found})
        # Every server of the run, Ray's GCS and raylet included, listens on loopback only.
        table = _listen_table()
        listening = _listening(tree, table)
        named = {f"{p} {command_line(p)[:120]}": a for p, a in listening.items()}
        # the check sees Ray's GCS (a whole command line: a long install path comes first)
        assert any("gcs_server" in command_line(p) for p in listening), named
        exposed = {k: [a for a in v if not ipaddress.ip_address(a.rsplit(":", 1)[0]).is_loopback]
                   for k, v in named.items()}  # fmt: skip
        assert not any(exposed.values()), exposed
        # ... and on ports of its own: no socket outside the run listens on one of them
        # (Ray's Client server would share its default port 10001 with `squat`).
        ports = {a.rsplit(":", 1)[1] for v in listening.values() for a in v}
        ours = {i for p in tree for i in _socket_inodes(p)}
        shared = sorted(
            a for i, a in table.items() if i not in ours and a.rsplit(":", 1)[1] in ports
        )
        assert not shared, (shared, named)
        # the runtime's temporary folder: the watchdog's guard file is in it
        watchdog = next(p for p in tree if "sims.processes" in command_line(p))
        words = command_line(watchdog).split()  # ... -m sims.processes PID GUARD NAME=VALUE
        guard, marker = words[words.index("sims.processes") + 2 :][:2]
        runtime_tmp = Path(guard).parent
        assert (runtime_tmp / "guard").is_file() and (runtime_tmp / "app").is_dir()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rows_at_kill = len((run_dir / "metrics.jsonl").read_text().splitlines())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.1)
        survivors = {p: command_line(p)[:120] for p in tree if alive(p)}
        assert not survivors, survivors
        name, _, value = marker.partition("=")
        assert name == "FLWR_HOME" and marked(name, value) == []  # nor any process of its own
        # ... and the watchdog took the runtime's temporary folder with it
        assert not runtime_tmp.exists(), sorted(p.name for p in runtime_tmp.iterdir())
    finally:
        squat.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_tree([p for p in tree if alive(p)], 1.0)  # whatever a failed test left
    # Nothing finished the run into the directory behind the user's back.
    time.sleep(2)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == rows_at_kill
    assert not (run_dir / "summary.json").exists()


def test_a_run_killed_with_sigkill_resumes_with_the_numbers_of_an_uninterrupted_one(
    ray_address: str, tmp_path: Path
) -> None:
    """``kill -9`` of ``fedmerge simulate`` mid-run, then the same run again: as if never killed.

    The watchdog stops the killed run's processes (its ServerApp first); the
    resumed run goes on from the last checkpoint, on the session's runtime,
    and ends with the rows and the model of a run that nobody stopped.
    """
    overrides = [
        "rounds=4", "num_clients=4", "clients_per_round=2", "partition.scheme='dirichlet'",
        *SHORT, f"simulation.ray_address='{ray_address}'",
    ]  # fmt: skip
    run_dir = tmp_path / "killed"
    argv = [sys.executable, "-m", "sims.cli", "simulate", "default", "--run-dir", str(run_dir)]
    with (tmp_path / "killed.log").open("wb") as log:
        proc = subprocess.Popen(
            [*argv, *(x for item in overrides for x in ("--set", item))],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while read_json(run_dir / "checkpoint.json").get("round", -1) < 1:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 was never checkpointed"
            time.sleep(0.05)
        tree = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in tree):  # the watchdog stops them
            assert time.monotonic() < deadline, {p: command_line(p)[:120] for p in tree}
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_tree([p for p in tree if alive(p)], 1.0)  # whatever a failed test left
    killed_at = read_json(run_dir / "checkpoint.json")["round"]
    assert not (run_dir / "summary.json").exists(), (
        f"the run ended before the kill took ({killed_at})"
    )
    scenario = load_scenario(None, overrides)
    resumed = simulate(scenario, run_dir)
    assert f"resuming after round {killed_at}" in (run_dir / "flower.log").read_text()
    reference = simulate(scenario, tmp_path / "reference")
    assert resumed["status"] == reference["status"] == "completed"
    rows, expected = read_rows(run_dir), read_rows(tmp_path / "reference")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for a, b in zip(rows, expected, strict=True):
        for key in ("round", "accuracy", "loss", "train_loss", "sampled", "bytes_up"):
            assert a[key] == b[key], (a["round"], key)
    weights, same = (
        load_file(str(d / "model.safetensors")) for d in (run_dir, tmp_path / "reference")
    )
    assert weights.keys() == same.keys()
    for key in same:
        torch.testing.assert_close(weights[key], same[key], rtol=0, atol=0)


@contextlib.contextmanager
def _killing_after_round_1(run_dir: Path, find: Callable[[], list[int]]) -> Iterator[list[int]]:
    """SIGKILL the first PID that ``find`` returns once the run's round 1 is recorded.

    Yields the list of what was killed (one PID, once it happened).
    """
    killed: list[int] = []
    done = threading.Event()  # the test is over: kill nothing more

    def kill() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed and not done.is_set():
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                found = find()
                if found:
                    os.kill(found[0], signal.SIGKILL)
                    killed.append(found[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        done.set()
        killer.join()


def test_a_dead_ray_worker_stops_the_run_which_then_resumes(
    ray_head: tuple[str, int], tmp_path: Path
) -> None:
    """Flower never replaces a dead actor: the run stops after that round and resumes whole."""
    address, _head_pid = ray_head
    scenario = load_scenario(
        None,
        ["rounds=4", "num_clients=4", "clients_per_round=4", "dataset.name='digits'",
         "model.name='mlp'", f"simulation.ray_address='{address}'"],
    )  # fmt: skip
    run_dir = tmp_path / "run"

    def actors() -> list[int]:
        # Below this process: the Ray head's workers, or the warm
        # process's (sims.warm) when Ray starts them through it.
        return [p for p in descendants(os.getpid()) if "ClientAppActor" in command_line(p)]

    with _killing_after_round_1(run_dir, actors) as killed:
        with pytest.raises(SimulationError, match=r"the Ray worker of partition \d+ .*died"):
            simulate(scenario, run_dir)
    assert killed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stopped = rows[-1]["round"]
    assert 2 <= stopped < 4  # the round that lost the worker's clients, and no later one
    assert any("ActorDiedError" in r for r in rows[-1]["skipped_reasons"])
    assert json.loads((run_dir / "checkpoint.json").read_text())["round"] == stopped
    resumed = simulate(scenario, run_dir)  # fresh workers: every later round has all clients
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["clients"] == 4 for r in rows[stopped + 1 :])
    assert resumed["status"] == "degraded"  # round `stopped` did lose clients


def test_a_run_whose_flwr_run_is_killed_says_so(tmp_path: Path) -> None:
    """A run that ends without a summary says how ``flwr run``, which follows it, ended.

    The run starts its own Ray head, whose output joins the log when the
    runtime closes, after that line: the error still ends with it.
    """
    scenario = load_scenario(
        None,
        ["rounds=30", "num_clients=2", "clients_per_round=2", "dataset.name='digits'",
         "model.name='mlp'"],
    )  # fmt: skip
    run_dir = tmp_path / "run"

    def flwr_run() -> list[int]:
        # `flwr run` itself, forked from the runtime's warm process (the process this
        # test started, the child of this process, is the shim in front of it), as the
        # kernel's out-of-memory killer would choose it
        me = str(os.getpid())
        return [
            p for p in descendants(os.getpid())
            if runs_program(p, "flwr") and (stat_fields(p) or ["", ""])[1] != me
        ]  # fmt: skip

    with _killing_after_round_1(run_dir, flwr_run) as killed:
        with pytest.raises(SimulationError) as failed:
            simulate(scenario, run_dir)
    assert killed
    message = str(failed.value)
    assert message.startswith("run did not complete"), message
    line = "fedmerge: `flwr run` was killed by SIGKILL before the run wrote summary.json"
    assert message.splitlines()[-1] == line, message
    assert message.count(line) == 1, message
    assert line in (run_dir / "flower.log").read_text().splitlines()
    assert not (run_dir / "summary.json").exists()


#: A driver whose task prints: Ray's log monitor carries the line to the driver's output.
PRINTING_DRIVER = """
import ray
ray.init()
@ray.remote
def speak():
    print("a line from a Ray worker", flush=True)
ray.get(speak.remote())
"""


def test_a_ray_head_that_stops_early_says_why(tmp_path: Path) -> None:
    """The error of a run whose Ray head stopped quotes what ``ray start`` printed.

    Before it stops, the head shows that its log monitor, forked from the
    runtime's warm process, works: a worker's output reaches its driver.
    """
    runtime = Runtime()
    try:
        runtime.start("", 1, tmp_path / "runtime.log")
        assert runtime.ray is not None
        # once `ray start` has started every daemon and watches them
        said = runtime.tmp / "ray.log"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "block forever" not in said.read_text():
            assert runtime.ray.poll() is None, said.read_text()
            time.sleep(0.2)
        driver = subprocess.run(
            [sys.executable, "-c", PRINTING_DRIVER], env=runtime.env, cwd=REPO,
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert driver.returncode == 0, driver.stderr[-3000:]
        assert "a line from a Ray worker" in driver.stdout + driver.stderr, driver.stderr[-3000:]
        raylets = [p for p in descendants(runtime.ray.pid) if "/raylet " in command_line(p)]
        assert raylets, "the head started no raylet"
        os.kill(raylets[0], signal.SIGKILL)
        runtime.ray.wait(timeout=60)  # `ray start --block` stops once a daemon has died
        (tmp_path / "run").mkdir()
        with pytest.raises(SimulationError) as stopped:
            runtime.run(tmp_path / "run", "", "num-supernodes = 1")
    finally:
        runtime.close()
    message = str(stopped.value)
    assert message.startswith(f"ray start exited with code {runtime.ray.returncode}"), message
    # Ray's own words, naming the daemon that died
    assert "exited unexpectedly" in message and "raylet" in message.split("\n", 1)[1], message
    # and the runtime's log keeps the whole of it
    assert "exited unexpectedly" in (tmp_path / "runtime.log").read_text()
