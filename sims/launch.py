"""Run a scenario through Flower's simulation runtime (Ray backend)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from fedmerge.align import permutation_spec_for
from fedmerge.atomic import atomic_write_text
from fedmerge.topology import build_graph, mixing_matrix
from sims.checks import check_scenario, model_allocation_error
from sims.runs import parse_row
from sims.scenario_files import load_scenario
from strategies.config import (
    RUN_DIR_KEY,
    ConfigError,
    RunConfig,
    declared_defaults,
    flatten,
    to_run_config,
)
from strategies.federation import federation

#: The Flower App: the repository root, whose pyproject.toml names the apps.
APP_DIR = Path(__file__).resolve().parent.parent

#: Environment every Flower process of a run gets (see README, "Environment").
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray >= 2.50 warns that it will stop overriding CUDA_VISIBLE_DEVICES for
    # actors with num_gpus=0; opt in to that future behaviour now.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class SimulationError(RuntimeError):
    """The Flower run did not complete; the message says where its log is."""


def preflight(config: RunConfig) -> None:
    """Load data, partition it and build the model: fail before any process starts.

    :func:`sims.checks.check_scenario` runs first (this machine's GPUs and
    CPUs, the Ray address, options that could never act).
    """
    check_scenario(config)
    fed = federation(config)
    try:
        data = fed.data
    except (ValueError, FileNotFoundError) as exc:  # the loader names its own field (root)
        raise ConfigError(f"dataset.{exc}") from None
    empty = [i for i, p in enumerate(fed.partitions) if len(p) == 0]
    if empty:
        raise ConfigError(
            f"num_clients: {config.num_clients} leaves clients {empty[:5]} of the "
            f"{len(data.train_y)} samples without data; "
            f"allowed: fewer clients or another partition"
        )
    try:
        model = fed.initial_model()
    except ValueError as exc:  # a user's model factory that cannot build; the kernel names
        raise ConfigError(f"model.{exc}") from None  # its own field (factory, width, ...)
    except (MemoryError, RuntimeError) as exc:
        raise model_allocation_error(config, exc) from None
    plugin = config.strategy.plugin
    if plugin.aligns:  # a model that cannot be traced fails here, not in the ServerApp
        permutation_spec_for(model, fed.example_input)
    if plugin.peer:  # graph errors before any process starts
        try:
            graph = build_graph(config.topology, config.num_clients, seed=config.seed, round=1)
            mixing_matrix(graph, config.topology.mixing)  # checks an edge file's weights too
        except ValueError as exc:  # the kernel names the topology's own field
            raise ConfigError(f"topology.{exc}") from None


def declared_run_config() -> dict[str, Any]:
    """The run config ``pyproject.toml`` declares: the default scenario plus every option.

    Flower accepts run-config overrides only for declared keys.
    """
    flat = to_run_config(load_scenario(None))
    own = {k: v for k, v in flat.items() if not k.startswith("strategy.") or k == "strategy.name"}
    return {**own, **dict(sorted(declared_defaults().items())), RUN_DIR_KEY: ""}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SimulationError(f"flower-superlink did not become healthy within {timeout:.0f} s")


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (read from /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """Stop a process we started and all its descendants, by PID.

    The SuperLink starts a SuperExec in a session of its own, which starts the
    simulation process and Ray; the whole tree is collected before the first
    signal so that nothing re-parented to init is missed. SIGTERM first, then
    SIGKILL for whatever is still alive after ``grace`` seconds.
    """
    if proc is None:
        return
    pids = [*_descendants(proc.pid), proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        proc.poll()
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


@cache
def app_config_keys() -> frozenset[str]:
    """The run-config keys the Flower App (``APP_DIR/pyproject.toml``) declares."""
    data = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    return frozenset(flatten(data["tool"]["flwr"]["app"].get("config", {})))


def run_config_toml(config: RunConfig, run_dir: Path) -> str:
    """``config`` as a flat TOML run config for ``flwr run --run-config``.

    Flower accepts only the keys that the app's ``pyproject.toml`` declares
    under ``[tool.flwr.app.config]``. An option of a strategy from a
    ``plugins`` module that is not declared there cannot travel: it must keep
    its default, which the apps then use.
    """
    declared = app_config_keys()
    defaults = to_run_config(RunConfig(strategy=type(config.strategy)(config.strategy.name)))
    flat: dict[str, Any] = {}
    for key, value in to_run_config(config).items():
        if key not in declared:
            if value != defaults.get(key):
                raise ConfigError(
                    f"{key}: got {value!r}; allowed: its default {defaults.get(key)!r}, since "
                    f"{APP_DIR / 'pyproject.toml'} does not declare it under "
                    f"[tool.flwr.app.config] (Flower's run config carries declared keys only)"
                )
            continue
        flat[key] = value
    flat[RUN_DIR_KEY] = str(run_dir.resolve())
    return "\n".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in flat.items()) + "\n"


def federation_config(scenario: RunConfig) -> str:
    """``--federation-config`` for the simulation runtime."""
    sim = scenario.simulation
    items = [
        f"num-supernodes={scenario.nodes}",
        'backend="ray"',
        f"client-resources-num-cpus={sim.num_cpus_per_client}",
        f"client-resources-num-gpus={sim.num_gpus_per_client}",
    ]
    if sim.ray_num_cpus and not sim.ray_address:
        items.append(f"init-args-num-cpus={sim.ray_num_cpus}")
    return " ".join(items)


def simulate(
    scenario: RunConfig,
    run_dir: Path,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` through ``flwr run`` against a SuperLink of its own.

    Starts ``flower-superlink --simulation`` on free loopback ports (its own
    ``FLWR_HOME`` and ``RAY_TMPDIR`` in a temp directory), submits the app
    with ``flwr run --stream``, follows ``metrics.jsonl`` (calling
    ``on_round`` for every new row), then stops the SuperLink and everything
    it started. Flower's output goes to ``run_dir/flower.log``.

    Returns
    -------
    dict
        ``summary.json`` plus ``wall_time`` (seconds, this call end to end).

    Raises
    ------
    SimulationError
        If the run did not write its summary (Flower can exit 0 on a crash).
    """
    t0 = time.perf_counter()
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fm-"))  # short: Ray's socket paths are length-limited
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(tmp / "flwr"), "RAY_TMPDIR": str(tmp / "r")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if scenario.simulation.ray_address:
        env["RAY_ADDRESS"] = scenario.simulation.ray_address
    port = _free_port()
    (tmp / "flwr").mkdir()
    (tmp / "r").mkdir()
    (tmp / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "fedmerge"\n\n[superlink.fedmerge]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    (run_dir / "run_config.toml").write_text(run_config_toml(scenario, run_dir))
    metrics = run_dir / "metrics.jsonl"
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    log_path = run_dir / "flower.log"
    superlink = client = None
    try:
        with log_path.open("wb") as log:
            superlink = subprocess.Popen(
                [
                    "flower-superlink", "--insecure", "--simulation",
                    "--isolation", "subprocess",
                    "--host", "127.0.0.1", "--port", str(port),
                ],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            _wait_healthy(port, superlink, timeout=60)
            client = subprocess.Popen(
                [
                    "flwr", "run", str(APP_DIR), "fedmerge", "--stream",
                    "--run-config", str(run_dir / "run_config.toml"),
                    "--federation-config", federation_config(scenario),
                ],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir,
                start_new_session=True,
            )  # fmt: skip
            seen = 0
            while True:
                done = client.poll() is not None or summary_path.exists()
                if metrics.exists():
                    rows = metrics.read_text().splitlines()
                    for line in rows[seen:]:
                        if line.strip() and on_round is not None:
                            on_round(parse_row(line))
                    seen = len(rows)
                if done:
                    break
                time.sleep(0.1)
            if client.poll() is None:
                try:
                    client.wait(timeout=1)  # the summary is written: the run is over
                except subprocess.TimeoutExpired:
                    pass
    finally:
        _stop(client, grace=2)
        # A finished run has nothing left to save: don't wait for Ray's slow
        # graceful shutdown. An interrupted one gets time to stop cleanly.
        _stop(superlink, grace=1.0 if summary_path.exists() else 10.0)
        shutil.rmtree(tmp, ignore_errors=True)
    if not summary_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise SimulationError(f"run did not complete; see {log_path}\n" + "\n".join(tail))
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    summary["wall_time"] = time.perf_counter() - t0
    atomic_write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
