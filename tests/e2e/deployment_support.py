"""Helpers of the deployment tests: a SuperLink and SuperNode processes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmerge.data import load_dataset
from sims.processes import FLOWER_ENV, descendants, free_port, stat_fields, stop_tree
from sims.runtime import APP_DIR, stop_process, wait_healthy
from sims.warm import wait_listening, warm_environment


@dataclass
class Warm:
    """A warm process (:mod:`sims.warm`) and the environment of the processes it serves."""

    proc: subprocess.Popen
    env: dict[str, str]

    def stop_children(self) -> None:
        """Stop, by PID, every process forked from it and whatever those started."""
        below = descendants(self.proc.pid)
        children = [p for p in below if (stat_fields(p) or ["", ""])[1] == str(self.proc.pid)]
        stop_tree(children, 10.0)


@contextmanager
def warm_process() -> Iterator[Warm]:
    """A warm process that has imported Flower and PyTorch, for the deployment tests of a
    test process: a deployment's processes take their environment, working directory and
    arguments from their own request, so that deployments one after another can share it."""
    shims = Path(tempfile.mkdtemp(prefix="fmd-"))  # short: a socket path is limited
    env, warm_command = warm_environment(shims, {**os.environ, **FLOWER_ENV})
    warm = subprocess.Popen(
        warm_command, cwd=APP_DIR, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    wait_listening(env, warm, timeout=30)  # the first deployment's programs are forked too
    try:
        yield Warm(warm, env)
    finally:
        stop_process(warm)  # and whatever its children left
        shutil.rmtree(shims, ignore_errors=True)


@contextmanager
def deployment_of(
    tmp_path: Path, warm: Warm, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[dict[str, str], list[subprocess.Popen]]]:
    """A SuperLink (no simulation) and a way to add SuperNodes; all stopped by PID.

    Flower's programs (``flower-superlink``, ``flower-supernode``, their
    SuperExecs, ``flwr-serverapp``, ``flwr-clientapp`` and ``flwr``) and
    ``fedmerge supernode``'s ClientApp process are forked from ``warm``, which
    has imported Flower and PyTorch (:mod:`sims.warm`): each runs its own
    entry point, as a process of its own, without paying the imports again.
    At the end, everything forked from ``warm`` is stopped with the rest.
    The TLS test and ``fedmerge federation up`` start theirs cold.
    """
    env = {**warm.env, "FLWR_HOME": str(tmp_path / "home"), **(extra_env or {})}
    (tmp_path / "home").mkdir()
    port = free_port()
    env["SUPERLINK_PORT"] = str(port)
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n[superlink.deployment]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen] = []
    try:
        superlink = subprocess.Popen(
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        procs.append(superlink)
        wait_healthy(port, superlink, timeout=60)
        yield env, procs
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        warm.stop_children()


def supernode(
    env: dict[str, str], procs: list[subprocess.Popen], node_config: str, *, flower: bool = False
) -> subprocess.Popen:
    """A SuperNode: ``fedmerge supernode`` (Flower's SuperNode with one ClientApp process
    for all its messages), or with ``flower`` Flower's ``flower-supernode`` as it comes
    (a new ClientApp process for every message)."""
    command = ["flower-supernode"] if flower else [sys.executable, "-m", "sims.cli", "supernode"]
    proc = subprocess.Popen(
        [
            *command,
            "--insecure",
            "--superlink",
            f"127.0.0.1:{env['SUPERLINK_PORT']}",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
        ],
        cwd=APP_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    procs.append(proc)
    return proc


def supernodes(
    env: dict[str, str], procs: list[subprocess.Popen], n: int, *, flower: bool = False
) -> None:
    for pid in range(n):
        supernode(env, procs, f"partition-id={pid} num-partitions={n}", flower=flower)


def flwr_run(env: dict[str, str], app: Path, run_config: str) -> subprocess.CompletedProcess:
    """``flwr run APP --stream`` on the deployment's SuperLink (``app``: a staged copy)."""
    return subprocess.run(
        ["flwr", "run", str(app), "--stream", "--run-config", run_config],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip


def node_dirs(tmp_path: Path, n: int) -> list[Path]:
    """``n`` data directories cut from the digits training set, round-robin by sample."""
    data = load_dataset("digits")
    x, y = data.train_x.numpy(), data.train_y.numpy()
    dirs = []
    for p in range(n):
        d = tmp_path / f"node{p}"
        d.mkdir()
        np.savez(d / "data.npz", train_x=x[p::n], train_y=y[p::n])
        dirs.append(d)
    return dirs


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


#: Three nodes with their own digits arrays (:func:`node_dirs`); add ``simulation.timeout``.
OWN_DATA = (
    "num_clients=3 clients_per_round=3 strategy.name='fedavg' dataset.name='digits' "
    "model.name='mlp' simulation.assign_partitions=false "
)
