"""``fedmerge federation up|down``: a whole TLS federation on this machine, to try deployment.

``up DIR --nodes N`` writes, under ``DIR``::

    certs/                 # fedmerge certs: CA, SuperLink certificate, N node key pairs
    node-I/data.npz        # node I's own data: a shard of the data set's train and test splits
    flwr/config.toml       # FLWR_HOME with the connection "federation" (TLS, ca.crt)
    logs/*.log             # every process's output
    federation.json        # the state file: PIDs (with their start times), ports, paths

and starts a SuperLink with TLS and SuperNode authentication on 127.0.0.1,
registers the N node keys, and starts N ``fedmerge supernode`` processes
(each with its long-lived ClientApp process), each on its own data
directory. ``down DIR`` stops exactly the processes ``up`` recorded, with
everything below them, by PID; a PID whose start time differs from the
recorded one is another process that reused it, and is left alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmerge.atomic import atomic_write_text
from sims.certs import write_certs
from sims.errors import FederationError
from sims.processes import (
    alive,
    flower_environment,
    free_port,
    start_time,
    still_running,
    stop_tree,
)

if TYPE_CHECKING:  # PyTorch: ``down`` never needs it
    from fedmerge.data import DatasetBundle

#: The directory that holds the ``sims`` package that runs this command.
_ROOT = Path(__file__).resolve().parents[1]
#: The state file in a federation's directory.
STATE_FILE = "federation.json"
#: The lock that ``up`` and ``down`` hold on a federation's directory.
LOCK_FILE = ".federation.lock"
#: The connection name ``up`` writes into ``DIR/flwr/config.toml``.
CONNECTION = "federation"
#: Seconds ``up`` waits for the SuperLink to accept the node keys.
READY_TIMEOUT = 120.0
#: Seconds from SIGTERM to SIGKILL when ``down`` stops a process tree.
STOP_GRACE = 10.0


@dataclass(frozen=True)
class FederationOptions:
    """What ``fedmerge federation up`` starts.

    Attributes
    ----------
    directory : Path
        Where certificates, data, logs and the state file go.
    nodes : int
        Number of SuperNodes, 1 to 64.
    dataset : str
        Data set split into the nodes' data directories (one of
        :data:`strategies.node_data.DATA_SPECS`).
    dataset_root : str, optional
        Its files, for data sets that are not generated (``load_dataset``'s
        ``root``).
    port : int
        The SuperLink's port on 127.0.0.1; 0 picks a free one.
    seed : int
        Seed of the shuffle before the split.
    """

    directory: Path
    nodes: int = 2
    dataset: str = "digits"
    dataset_root: str | None = None
    port: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse a node count, port or data set that cannot work."""
        if not 1 <= self.nodes <= 64:
            raise ValueError(f"--nodes: got {self.nodes}; allowed: 1 to 64")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port: got {self.port}; allowed: 1 to 65535, or 0 for a free one")
        if self.seed < 0:
            raise ValueError(f"--seed: got {self.seed}; allowed: an integer >= 0")
        if self.dataset_root is not None and not Path(self.dataset_root).is_dir():
            raise ValueError(
                f"--dataset-root: got {self.dataset_root!r}, which is not a directory; allowed: "
                "a directory holding the data set's files (nothing is downloaded)"
            )
        from strategies.node_data import DATA_SPECS  # PyTorch: ``down`` never needs it

        if self.dataset not in DATA_SPECS:
            raise ValueError(
                f"--dataset: got {self.dataset!r}; allowed: {', '.join(sorted(DATA_SPECS))}"
            )
        if any(c in str(self.directory.resolve()) for c in "'\"\\"):
            raise ValueError(
                f"DIR: got {str(self.directory)!r}; allowed: a path without quotes or "
                "backslashes (it goes into each SuperNode's --node-config)"
            )


@contextmanager
def _federation_lock(directory: Path) -> Iterator[None]:
    """Hold ``DIR/.federation.lock`` (``flock``, exclusive) while ``up`` or ``down`` works.

    A second ``up`` or ``down`` on the same directory meanwhile is refused in
    one line. The lock goes with the process: a killed one leaves no stale
    lock. ``up`` creates ``DIR`` for it; ``down`` needs one that exists.
    """
    if not directory.is_dir():  # down: read_state says what is missing
        yield
        return
    with (directory / LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"DIR: got {str(directory)!r}, where another fedmerge federation up or down "
                "is at work; allowed: the same command once it has finished, or another "
                "directory"
            ) from None
        yield  # closing the file releases the lock


def read_state(directory: Path) -> dict[str, Any]:
    """The state file of ``directory``; one-line ``ValueError`` when there is none."""
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(
            f"DIR: got {str(directory)!r}, which has no readable {STATE_FILE}; allowed: a "
            f"directory written by fedmerge federation up"
        ) from None
    if not isinstance(state, dict):
        state = {}
    processes = state.get("processes")
    if not isinstance(processes, list) or not all(
        isinstance(p, dict) and type(p.get("pid")) is int and p["pid"] > 0 for p in processes
    ):
        raise ValueError(
            f"DIR: {str(path)!r} is not a federation state file (a list of processes, each "
            "with its PID); allowed: the federation.json that fedmerge federation up wrote"
        )
    return state


def running(state: dict[str, Any]) -> list[int]:
    """The recorded PIDs that still run the recorded process (same start time)."""
    return still_running({int(p["pid"]): p.get("start_time") for p in state["processes"]})


def split_data(options: FederationOptions, data: DatasetBundle) -> list[Path]:
    """Shuffle ``data``'s splits (the data set of ``options``) with ``seed``; one shard per node."""
    import numpy as np  # ``down`` never needs it

    rng = np.random.default_rng(options.seed)
    train = np.array_split(rng.permutation(len(data.train_y)), options.nodes)
    test = np.array_split(rng.permutation(len(data.test_y)), options.nodes)
    dirs = []
    for i in range(options.nodes):
        d = options.directory / f"node-{i}"
        d.mkdir(parents=True, exist_ok=True)
        np.savez(
            d / "data.npz",
            train_x=data.train_x.numpy()[train[i]],
            train_y=data.train_y.numpy()[train[i]],
            test_x=data.test_x.numpy()[test[i]],
            test_y=data.test_y.numpy()[test[i]],
        )
        dirs.append(d)
    return dirs


class _Starter:
    """Starts processes detached (own session, output to a log), remembering each."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.logs = directory / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cwd = directory
        self.env = env
        self.records: list[dict[str, Any]] = []
        self.procs: list[subprocess.Popen[bytes]] = []  # to stop and reap if ``up`` fails

    def start(self, role: str, cmd: list[str], **extra: Any) -> subprocess.Popen[bytes]:
        log = self.logs / f"{role}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                cmd, cwd=self.cwd, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        self.records.append(
            {"role": role, "pid": proc.pid, "start_time": start_time(proc.pid), "log": str(log),
             **extra}
        )  # fmt: skip
        return proc


def _flwr(
    args: list[str], env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> subprocess.CompletedProcess[str]:
    """Run one ``flwr`` command against the SuperLink (a minute at most).

    While it runs, ``procs`` (the SuperLink first) are watched: if one exits,
    the command is stopped and the error says which. A SuperLink that could
    not start leaves its port to whoever holds it, and ``flwr`` would wait
    on that port for its own timeout.
    """
    command = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                out, err = command.communicate(timeout=0.2)
                return subprocess.CompletedProcess(args, command.returncode, out, err)
            except subprocess.TimeoutExpired:
                pass
            for proc in procs:
                if proc.poll() is not None:
                    raise _exited(proc, procs[0])
            if time.monotonic() > deadline:
                raise FederationError(f"{' '.join(args[1:3])} did not answer in 60 s")
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()


def _exited(proc: subprocess.Popen[bytes], link: subprocess.Popen[bytes]) -> FederationError:
    """The error for a process of the federation that exited (the SuperLink by name)."""
    if proc is link:
        return FederationError(f"the SuperLink exited with code {proc.returncode}")
    return FederationError(f"process {proc.pid} exited with code {proc.returncode}")


def _register(key: Path, env: dict[str, str], link: subprocess.Popen[bytes]) -> None:
    """``flwr supernode register``, retried until the SuperLink answers."""
    deadline = time.monotonic() + READY_TIMEOUT
    flwr = str(Path(sys.executable).parent / "flwr")
    while True:
        if link.poll() is not None:
            raise _exited(link, link)
        out = _flwr([flwr, "supernode", "register", str(key), CONNECTION], env, [link])
        if out.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise FederationError(f"flwr supernode register {key.name} failed: {out.stdout[-500:]}")
        time.sleep(1.0)


def _wait_online(nodes: int, env: dict[str, str], procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait until ``flwr supernode list`` shows ``nodes`` nodes online."""
    deadline = time.monotonic() + READY_TIMEOUT
    flwr = str(Path(sys.executable).parent / "flwr")
    online = 0
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise _exited(proc, procs[0])
        out = _flwr([flwr, "supernode", "list", CONNECTION, "--format", "json"], env, procs)
        try:
            listed = json.loads(out.stdout).get("nodes", [])
        except ValueError:
            listed = []
        online = sum(1 for n in listed if n.get("status") == "online")
        if online >= nodes:
            return
        time.sleep(1.0)
    raise FederationError(f"{online} of {nodes} SuperNodes online after {READY_TIMEOUT:.0f} s")


def up(options: FederationOptions) -> dict[str, Any]:
    """Start the federation of ``options`` and write its state file; the state.

    Returns once every SuperNode is online. If anything fails, every process
    started so far is stopped (by PID) before the error is raised.
    """
    # absolute: the nodes run in DIR, and their data directories go into their node config
    directory = options.directory.resolve()
    options = replace(options, directory=directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _federation_lock(directory):
        if (directory / STATE_FILE).exists():
            pids = running(read_state(directory))
            if pids:
                raise ValueError(
                    f"DIR: got {str(directory)!r}, where a federation runs (PIDs {pids}); "
                    f"allowed: another directory, or fedmerge federation down {directory} first"
                )
        from fedmerge.data import load_dataset  # PyTorch: ``down`` never needs it

        data = load_dataset(options.dataset, options.dataset_root)  # before anything is written
        return _start(options, data)


def _start(options: FederationOptions, data: DatasetBundle) -> dict[str, Any]:
    """:func:`up` once its input is checked and its directory is locked."""
    directory = options.directory
    port = options.port or free_port()
    certs = directory / "certs"
    # a new federation: the certificates of one that ran here before are replaced
    write_certs(certs, ["127.0.0.1"], options.nodes, force=True)
    dirs = split_data(options, data)
    home = directory / "flwr"
    home.mkdir(exist_ok=True)
    atomic_write_text(
        home / "config.toml",
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n',
    )
    env = {**flower_environment(), "FLWR_HOME": str(home)}
    # the processes run the fedmerge that runs this command, from whatever directory
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    starter = _Starter(directory, env)
    fedmerge = [sys.executable, "-m", "sims.cli"]
    state: dict[str, Any] = {
        "directory": str(directory),
        "superlink": f"127.0.0.1:{port}",
        "flwr_home": str(home),
        "connection": CONNECTION,
        "dataset": options.dataset,
        "nodes": options.nodes,
        "processes": starter.records,
    }
    try:
        link = starter.start(
            "superlink",
            [*fedmerge, "superlink", "--certs", str(certs), "--host", "127.0.0.1",
             "--port", str(port)],
            port=port,
        )  # fmt: skip
        atomic_write_text(directory / STATE_FILE, json.dumps(state, indent=2) + "\n")
        for i in range(options.nodes):
            _register(certs / f"node-{i}.pub", env, link)
        nodes = []
        for i, d in enumerate(dirs):
            runtime = free_port()
            node = starter.start(
                f"supernode-{i}",
                [*fedmerge, "supernode", "--superlink", f"127.0.0.1:{port}",
                 "--certs", str(certs), "--key", str(certs / f"node-{i}"),
                 "--port", str(runtime),
                 "--node-config", f"partition-id={i} num-partitions={options.nodes} "
                 f"data-dir='{d}'"],
                partition=i, data_dir=str(d), runtime_port=runtime,
            )  # fmt: skip
            nodes.append(node)
            atomic_write_text(directory / STATE_FILE, json.dumps(state, indent=2) + "\n")
        _wait_online(options.nodes, env, [link, *nodes])
    except BaseException:
        stop_tree([proc.pid for proc in reversed(starter.procs)], STOP_GRACE)
        for proc in starter.procs:  # stopped: collect their statuses (stop_tree reaps nothing)
            proc.wait()
        (directory / STATE_FILE).unlink(missing_ok=True)
        raise
    return state


def down(directory: Path) -> list[int]:
    """Stop every process that ``up`` recorded in ``directory`` (and their children).

    Returns the recorded PIDs that were still running. The state file is
    removed once they are all gone.
    """
    with _federation_lock(directory):
        return _stop(directory)


def _stop(directory: Path) -> list[int]:
    """:func:`down` once the directory is locked."""
    state = read_state(directory)
    pids = running(state)
    if pids:  # recorded in start order: the nodes stop before the SuperLink
        stop_tree(pids[::-1], STOP_GRACE)
    if any(alive(pid) for pid in pids):
        raise FederationError(f"processes {[p for p in pids if alive(p)]} did not stop")
    (directory / STATE_FILE).unlink()
    return pids


def usage_lines(state: dict[str, Any]) -> list[str]:
    """What to type next, after ``up``."""
    n = state["nodes"]
    return [
        f"federation up: SuperLink {state['superlink']} (TLS, node authentication), "
        f"{n} SuperNodes with their own {state['dataset']} shards",
        f"state: {Path(state['directory']) / STATE_FILE}; logs: {state['directory']}/logs/",
        "run:",
        f"  FLWR_HOME={state['flwr_home']} flwr run . {CONNECTION} --stream --run-config "
        f"\"num_clients={n} clients_per_round={n} dataset.name='{state['dataset']}' "
        f"model.name='mlp' simulation.assign_partitions=false\"",
        f"stop: fedmerge federation down {state['directory']}",
    ]
