"""Run a scenario through Flower's simulation runtime (Ray backend)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any

from fedmerge.align import permutation_spec_for
from fedmerge.atomic import atomic_write_text
from fedmerge.topology import build_graph, mixing_matrix
from sims.checks import check_scenario, model_allocation_error
from sims.errors import SimulationError
from sims.processes import FLOWER_ENV, stop_tree
from sims.runs import parse_row
from sims.scenario_files import load_scenario
from sims.warm import warm_environment
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

#: The packages the ServerApp and ClientApp import (see :func:`stage_app`).
APP_PACKAGES = ("fedmerge", "strategies")


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


def stage_app(dest: Path) -> Path:
    """Copy the Flower App's own files (``pyproject.toml`` and :data:`APP_PACKAGES`) to ``dest``.

    ``flwr run DIR`` walks every file under ``DIR`` (the virtual environment,
    data caches and run directories included) before it filters them, which
    takes seconds in the repository root. The staged copy holds the
    few dozen files the apps need, so the same FAB builds in milliseconds.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(APP_DIR / "pyproject.toml", dest / "pyproject.toml")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in APP_PACKAGES:
        shutil.copytree(APP_DIR / package, dest / package, ignore=ignore, dirs_exist_ok=True)
    return dest


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


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """Stop a process we started and all its descendants, by PID.

    The SuperLink starts a SuperExec in a session of its own, which starts the
    simulation process; ``ray start`` starts Ray's daemons. The whole tree is
    collected before the first signal (:func:`sims.processes.stop_tree`):
    SIGTERM first, then SIGKILL for whatever is alive after ``grace`` seconds.
    """
    if proc is None:
        return
    stop_tree([proc.pid], grace)
    proc.wait()


@cache
def app_config_keys() -> frozenset[str]:
    """The run-config keys the Flower App (``APP_DIR/pyproject.toml``) declares."""
    data = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    return frozenset(flatten(data["tool"]["flwr"]["app"].get("config", {})))


def run_config_toml(config: RunConfig, run_dir: Path | None) -> str:
    """``config`` as a flat TOML run config for ``flwr run --run-config``.

    ``run_dir`` becomes ``output.run-dir``; ``None`` leaves it out (the
    ServerApp then writes ``runs/NAME-TIMESTAMP``).

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
    if run_dir is not None:
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
    # Ray's size (simulation.ray_num_cpus) is set where the Runtime starts its head.
    return " ".join(items)


def _on_this_machine(ray_address: str) -> bool:
    """Whether a Ray cluster at ``ray_address`` (``""``: one the runtime starts) is local.

    Only then can Ray start workers through the warm process's shim, a file
    on this machine; a cluster at another address may have nodes elsewhere.
    """
    host = ray_address.rsplit(":", 1)[0].strip("[]")
    return not ray_address or host in ("localhost", "::1") or host.startswith("127.")


class Runtime:
    """A SuperLink and a Ray cluster that serve one run or many, and a watchdog for both.

    ``flower-superlink --simulation`` listens on a free loopback port, with its
    own ``FLWR_HOME`` in a temporary directory. Unless ``ray_address`` names
    a cluster to join, ``ray start --head`` starts one on this machine
    (``ray_num_cpus`` CPUs, 0 for all cores) that every run's simulation
    process joins, so Ray starts once per runtime rather than once per run.
    Each run's ``flwr run``, its simulation process and, when the Ray cluster
    is on this machine, its Ray workers are forked from a warm process that
    has imported Flower and PyTorch once (:mod:`sims.warm`).
    A watchdog process stops them all, and every ``flwr run`` still going, if
    the process that started them dies without stopping them (SIGKILL, OOM).

    Parameters
    ----------
    ray_address : str
        ``host:port`` of a running Ray cluster, or ``""`` to start one.
    ray_num_cpus : int
        CPUs of the Ray cluster this runtime starts (0: all cores).
    log : Path
        Where the SuperLink's and Ray's output goes (appended).
    """

    def __init__(self, ray_address: str, ray_num_cpus: int, log: Path) -> None:
        self.key = (ray_address, ray_num_cpus)
        self.tmp = Path(tempfile.mkdtemp(prefix="fm-"))  # short: Ray's socket paths are limited
        # `flwr`, the SuperLink's SuperExec and the simulation process it starts
        # are found first on PATH as the warm process's shims.
        self.env, warm_command = warm_environment(
            self.tmp, {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.tmp / "flwr")}
        )
        if _on_this_machine(ray_address) and "RAY_RUNTIME_ENV_HOOK" not in self.env:
            # Ray starts the runs' workers through the warm process too.
            self.env["RAY_RUNTIME_ENV_HOOK"] = "sims.warm.ray_runtime_env"
        self.port = _free_port()
        self.log = log
        self.app = stage_app(self.tmp / "app")  # once: every run of this runtime submits it
        self._guarded: list[int] = []
        self.failed_run: Path | None = None  # set by the first of its runs that fails
        self._lock = threading.Lock()
        self.ray: subprocess.Popen[bytes] | None = None
        self.superlink: subprocess.Popen[bytes] | None = None
        self.warm: subprocess.Popen[bytes] | None = None
        (self.tmp / "flwr").mkdir()
        (self.tmp / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "fedmerge"\n\n[superlink.fedmerge]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "sims.processes", str(os.getpid()), str(self.tmp / "guard")],
            cwd=APP_DIR, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            with log.open("ab") as out:
                # The warm process, Ray and the SuperLink start side by
                # side: the SuperLink needs the other two only when the first
                # run's simulation process starts.
                self.warm = self.spawn(warm_command, out, cwd=APP_DIR)
                if ray_address:
                    self.env["RAY_ADDRESS"] = ray_address
                else:
                    ray_port = _free_port()
                    self.env["RAY_ADDRESS"] = f"127.0.0.1:{ray_port}"
                    self.ray = self.spawn(
                        [
                            "ray", "start", "--head", "--block",
                            "--node-ip-address", "127.0.0.1", "--port", str(ray_port),
                            "--num-cpus", str(ray_num_cpus or os.cpu_count() or 1),
                            "--include-dashboard", "false", "--disable-usage-stats",
                            # the autoscaler's monitor: nothing here autoscales
                            "--no-monitor",
                            "--temp-dir", str(self.tmp / "r"),
                        ],
                        out,
                    )  # fmt: skip
                # The SuperLink itself starts cold, beside the warm process's imports.
                self.superlink = self.spawn(
                    [
                        str(Path(sys.executable).parent / "flower-superlink"),
                        "--insecure", "--simulation",
                        "--isolation", "subprocess",
                        "--host", "127.0.0.1", "--port", str(self.port),
                    ],
                    out,
                )  # fmt: skip
            # The first run is submitted as soon as the SuperLink answers, while
            # the Ray head may still be starting: its simulation process imports
            # Flower, PyTorch and the app first, and Ray's driver waits for the
            # head's raylet when it connects (see :meth:`run` for a head that dies).
            _wait_healthy(self.port, self.superlink, timeout=60)
        except BaseException:
            self.close()
            raise

    def _check_ray(self) -> None:
        """Raise if the Ray head this runtime started has exited."""
        if self.ray is not None and self.ray.poll() is not None:
            raise SimulationError(f"ray start exited with code {self.ray.returncode}")

    def spawn(
        self, argv: list[str], out: IO[bytes], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a session of its own, guarded by the watchdog."""
        proc = subprocess.Popen(
            argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, start_new_session=True,
        )  # fmt: skip
        with self._lock:
            self._guarded.append(proc.pid)
            atomic_write_text(self.tmp / "guard", "\n".join(map(str, self._guarded)) + "\n")
        return proc

    def run(
        self,
        scenario: RunConfig,
        run_dir: Path,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> bool:
        """Submit ``scenario`` with ``flwr run --stream``; follow it until its summary exists.

        Flower's output for the run goes to ``run_dir/flower.log``. Returns
        whether the run wrote ``summary.json``.
        """
        (run_dir / "run_config.toml").write_text(run_config_toml(scenario, run_dir))
        metrics = run_dir / "metrics.jsonl"
        summary_path = run_dir / "summary.json"
        summary_path.unlink(missing_ok=True)
        client = None
        try:
            with (run_dir / "flower.log").open("ab") as log:
                client = self.spawn(
                    [
                        "flwr", "run", str(self.app), "fedmerge", "--stream",
                        "--run-config", str(run_dir / "run_config.toml"),
                        "--federation-config", federation_config(scenario),
                    ],
                    log,
                    cwd=run_dir,
                )  # fmt: skip
                seen = 0
                while True:
                    self._check_ray()
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
        finally:
            # Once the summary is written the run is over: `flwr run` would only
            # stream the simulation process's shutdown for about 3 s more. It is
            # stopped at once; the runtime lets the simulation process finish on
            # its own while the next run starts.
            _stop(client, grace=2)
        return summary_path.exists()

    def close(self, grace: float = 1.0) -> None:
        """Stop the SuperLink, the Ray head this runtime started, and the watchdog.

        The trees of the SuperLink, Ray and the warm process (with any
        simulation process or Ray worker still finishing) are signalled together, so
        that their grace periods overlap.
        """
        procs = [p for p in (self.superlink, self.ray, self.warm) if p is not None]
        stop_tree([p.pid for p in procs], grace)
        for proc in procs:
            proc.wait()
        _stop(self.watchdog, grace=1.0)
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class _Shared:
    """The runtimes of a :func:`shared_runtimes` block, by Ray address and CPU count."""

    log: Path
    runtimes: dict[tuple[str, int], Runtime] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_shared: _Shared | None = None


@contextmanager
def shared_runtimes(log: Path | None = None) -> Iterator[None]:
    """Within this block, runs share one :class:`Runtime` per Ray address and CPU count.

    The first run that needs a runtime starts it; the end of the block stops
    them all. A run that fails closes its runtime (the next run starts a fresh
    one), so that nothing it left behind holds Ray's resources. ``log``
    receives the runtimes' own output (default: a temporary file, deleted).
    """
    global _shared
    if _shared is not None:  # nested: the outer block owns the runtimes
        yield
        return
    own_log = log is None
    if log is None:
        fd, name = tempfile.mkstemp(prefix="fm-runtime-", suffix=".log")
        os.close(fd)
        log = Path(name)
    _shared = _Shared(log)
    finished = False
    try:
        yield
        finished = True  # every run of the block has returned
    finally:
        runtimes, _shared = list(_shared.runtimes.values()), None
        for runtime in runtimes:
            runtime.close(grace=0.0 if finished else 1.0)
        if own_log:
            log.unlink(missing_ok=True)


def simulate(
    scenario: RunConfig,
    run_dir: Path,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` through ``flwr run`` on a :class:`Runtime`.

    Outside :func:`shared_runtimes`, the run gets a runtime of its own (a
    SuperLink, and a Ray head unless ``simulation.ray_address`` names one),
    stopped with everything it started when the run ends. Inside, it shares
    the block's runtime for its Ray address and CPU count. Follows
    ``metrics.jsonl``, calling ``on_round`` for every new row. Flower's output
    goes to ``run_dir/flower.log``.

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
    log_path = run_dir / "flower.log"
    log_path.write_bytes(b"")
    key = (scenario.simulation.ray_address, scenario.simulation.ray_num_cpus)
    if _shared is None:
        runtime = Runtime(*key, log=log_path)
        try:
            ok = runtime.run(scenario, run_dir, on_round)
        finally:
            # A finished run has nothing left to save (its summary is the last file it
            # writes): its processes are killed at once, without Ray's slow graceful
            # shutdown. An interrupted one gets time to stop cleanly.
            runtime.close(grace=0.0 if (run_dir / "summary.json").exists() else 10.0)
    else:
        shared = _shared
        with shared.lock:
            if key not in shared.runtimes:
                shared.runtimes[key] = Runtime(*key, log=shared.log)
            runtime = shared.runtimes[key]
        ok = False
        try:
            ok = runtime.run(scenario, run_dir, on_round)
        finally:
            if not ok:
                with shared.lock:
                    if shared.runtimes.get(key) is runtime:
                        del shared.runtimes[key]
                        runtime.failed_run = run_dir  # the first of its runs to fail
                runtime.close(grace=10.0)
    summary_path = run_dir / "summary.json"
    if not ok:
        first = runtime.failed_run
        if first is not None and first != run_dir:
            # Stopping the runtime for the run that failed first ended this one.
            raise SimulationError(
                f"run stopped: the run in {first} failed and stopped the runtime that both "
                f"ran on; see {first / 'flower.log'}"
            )
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise SimulationError(f"run did not complete; see {log_path}\n" + "\n".join(tail))
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    if summary.get("status") == "failed":  # the ServerApp stopped and said why
        raise SimulationError(f"run failed ({summary.get('stage')}): {summary.get('error')}")
    summary["wall_time"] = time.perf_counter() - t0
    atomic_write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
