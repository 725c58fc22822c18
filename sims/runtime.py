"""The processes a simulation runs on: a SuperLink, a Ray cluster and the warm process.

Standard library and :mod:`sims.warm` only, so that ``fedmerge simulate`` and
``fedmerge compare`` can start the warm process (:func:`prestarted_runtime`)
before they import PyTorch, the data sets and the scenario's modules: the
two import side by side, each on its own core. :mod:`sims.launch` turns a
scenario into the run that a :class:`Runtime` carries out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fedmerge.atomic import atomic_write_text
from fedmerge.run_end import END_OF_RUN
from sims import ray_head
from sims.errors import SimulationError
from sims.processes import (
    FAST_TASK_POLL,
    FLOWER_ENV,
    free_port,
    start_time,
    stop_marked,
    stop_run_tree,
    stop_tree,
)
from sims.runs import SUMMARY_FILE, parse_row, read_json
from sims.warm import (
    KEEP_ACTORS_ENV,
    WAKE_ENV,
    prepare_drivers,
    wait_listening,
    wake_superexec,
    warm_environment,
)

#: The Flower App: the repository root, whose pyproject.toml names the apps.
APP_DIR = Path(__file__).resolve().parent.parent

#: The packages the ServerApp and ClientApp import (see :func:`stage_app`).
APP_PACKAGES = ("fedmerge", "strategies")

#: The variable of a runtime's environment that names it: its FLWR_HOME, in a folder of
#: its own. Every process of the runtime starts with it (:func:`sims.processes.marked`).
MARKER = "FLWR_HOME"

#: Defaults of a runtime's environment that the user's own settings override. Ray
#: folds its workers' lines that differ only in numbers (a client's partition, round
#: and loss) into the first, and says how many it folded some seconds later, which a
#: short run does not last: one line of four calls in a 2-round run here, and no count.
RAY_LOG_DEFAULTS = {"RAY_DEDUP_LOGS": "0"}

#: Seconds that ``flwr run --stream`` gets, once a run has written its summary, to
#: show the rest of the ServerApp's log (:meth:`Runtime.run`): until the line
#: :data:`fedmerge.run_end.END_OF_RUN` for a run that completed, until ``flwr
#: run`` ends (Flower's traceback included) for one that failed.
LOG_CATCH_UP = 10.0

#: Seconds between two looks at ``flower.log`` while ``flwr run`` catches up.
LOG_LOOK_EVERY = 0.02


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


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once the SuperLink ``proc`` answers ``/health`` on ``port``; raise if it exits first.

    Raises
    ------
    SimulationError
        If ``proc`` exits, or ``timeout`` seconds pass without an answer.
    """
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


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """Stop a process we started and all its descendants, by PID.

    The SuperLink starts a SuperExec in a session of its own, which starts the
    simulation process; ``ray start`` starts Ray's daemons. The whole tree is
    collected before the first signal (:func:`sims.processes.stop_tree`):
    SIGTERM first, then SIGKILL for whatever is alive after ``grace`` seconds.
    A process that has already ended is only waited for: its PID may name
    another process by now, and what it started has lost it as a parent.
    """
    if proc is None:
        return
    if proc.poll() is None:
        stop_tree([proc.pid], grace)
    proc.wait()


def _ended(code: int | None) -> str:
    """How ``flwr run`` ended, for the log of a run that wrote no summary."""
    if code is None or code >= 0:
        return f"`flwr run` exited with code {code} before the run wrote summary.json"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"`flwr run` was killed by {name} before the run wrote summary.json"


#: Ray's single-machine mode (meant for Windows and macOS) for the head a runtime starts and
#: every process of its runs. Otherwise Ray turns ``--node-ip-address 127.0.0.1`` into the
#: machine's network address and its GCS, raylet and client server listen on every
#: interface: anyone who reaches the machine could submit code to a cluster that asks for no
#: credentials. In this mode the node's address is 127.0.0.1 and they listen there only.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def log_caught_up(client: subprocess.Popen[bytes], log_path: Path, start: int) -> None:
    """Return once ``client``, the ``flwr run`` of a finished run, has shown the run's end.

    That is: once ``log_path``, from byte ``start`` on, holds the line
    :data:`fedmerge.run_end.END_OF_RUN` of a run whose ``summary.json`` (beside
    ``log_path``) does not say ``failed``, or once ``client`` has ended by itself
    (it does when Flower marks the run finished; a failed run's log ends with
    Flower's traceback, after that line). At the latest after
    :data:`LOG_CATCH_UP` seconds.
    """
    failed = read_json(log_path.parent / SUMMARY_FILE).get("status") == "failed"
    marker = END_OF_RUN.encode()
    deadline = time.monotonic() + LOG_CATCH_UP
    with log_path.open("rb") as log:
        log.seek(start)
        seen = b""
        while client.poll() is None and time.monotonic() < deadline:
            # the marker may be split between two reads: keep the last line's start
            seen = seen[seen.rfind(b"\n") + 1 :] + log.read()
            if not failed and marker in seen:
                return
            time.sleep(LOG_LOOK_EVERY)


def head_cpus(ray_num_cpus: int) -> int:
    """The CPUs of a Ray head started on this machine with ``simulation.ray_num_cpus`` (0: all)."""
    return ray_num_cpus or os.cpu_count() or 1


def _on_this_machine(ray_address: str) -> bool:
    """Whether a Ray cluster at ``ray_address`` (``""``: one the runtime starts) is local.

    Only then can Ray start workers through the warm process's shim, a file
    on this machine; a cluster at another address may have nodes elsewhere.
    """
    host = ray_address.rsplit(":", 1)[0].strip("[]")
    return not ray_address or host in ("localhost", "::1") or host.startswith("127.")


class Runtime:
    """A SuperLink and a Ray cluster that serve one run or many, and a watchdog for both.

    It starts in two steps. Constructing it starts the warm process (every
    ``flwr run``, the SuperLink, its simulation processes and, when the Ray
    cluster is on this machine, the runs' Ray workers are forked from it once
    it has imported Flower and PyTorch; see :mod:`sims.warm`) and a watchdog
    process: nothing here depends on the scenario. :meth:`start` then starts
    the rest: ``ray start --head`` (``ray_num_cpus`` CPUs, 0 for all cores,
    on 127.0.0.1 only: :data:`LOOPBACK_RAY`) unless ``ray_address`` names a
    cluster to join, and
    ``flower-superlink --simulation`` on a free loopback port, with its own
    ``FLWR_HOME`` in a temporary directory. Every run's simulation process
    joins that Ray cluster, so Ray starts once per runtime rather than once
    per run. The watchdog stops them all, and every ``flwr run`` still going,
    if the process that started them dies without stopping them (SIGKILL, OOM).
    """

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="fm-"))  # short: Ray's socket paths are limited
        # `flwr`, the SuperLink, its SuperExec and the simulation processes are
        # found first on PATH as the warm process's shims.
        self.app = stage_app(self.tmp / "app")  # once: every run of this runtime submits it
        self.env, warm_command = warm_environment(
            self.tmp,
            {
                **RAY_LOG_DEFAULTS,
                **os.environ,
                **FLOWER_ENV,
                **FAST_TASK_POLL,
                MARKER: str(self.tmp / "flwr"),
            },
            app=self.app,
        )
        # Its SuperExec looks for submitted runs often only when run() says one comes.
        self.env[WAKE_ENV] = str(self.tmp / "superexec.wake")
        self.port = free_port()
        self.log: Path | None = None
        # what spawn() started and has not seen end: PID -> start time (sims.processes)
        self._guarded: dict[int, int | None] = {}
        # set by close(), under _lock: a run of a shared runtime may end after another
        # run's failure closed it, and must not write into the folder close() removes
        self._closed = False
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
            [
                sys.executable, "-m", "sims.processes", str(os.getpid()), str(self.tmp / "guard"),
                f"{MARKER}={self.env[MARKER]}",
            ],
            cwd=APP_DIR, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            # Its own output (nothing, unless an import fails) joins the runtime's
            # log when the runtime closes.
            with (self.tmp / "warm.log").open("ab") as out:
                self.warm = self.spawn(warm_command, out, cwd=APP_DIR)
        except BaseException:
            self.close()
            raise

    def start(
        self, ray_address: str, ray_num_cpus: int, log: Path, *, shared: bool = False
    ) -> None:
        """Start the Ray head (unless ``ray_address`` names one) and the SuperLink.

        Returns once the SuperLink answers. Their output goes to ``log``
        (appended). A ``shared`` runtime, one that may serve more than one
        run, has its runs' simulation processes, Ray drivers with the SuperLink's
        environment, forked from a child of the warm process that has imported
        Ray (:func:`sims.warm.prepare_drivers`): each later run saves that
        import. For a single run it would only move the same import elsewhere.
        """
        self.log = log
        # a SuperLink shim or prepare request sent before the warm process listens runs cold
        if self.warm is not None:
            wait_listening(self.env, self.warm, timeout=10.0)
        if _on_this_machine(ray_address) and "RAY_RUNTIME_ENV_HOOK" not in self.env:
            # Ray starts the runs' workers through the warm process too.
            self.env["RAY_RUNTIME_ENV_HOOK"] = "sims.warm.ray_runtime_env"
        try:
            with log.open("ab") as out:
                if ray_address:
                    self.env["RAY_ADDRESS"] = ray_address
                else:
                    ray_port = free_port()
                    self.env["RAY_ADDRESS"] = f"127.0.0.1:{ray_port}"
                    self.env.update(LOOPBACK_RAY)
                    self.env.update(ray_head.HEAD_ENV)
                    if shared:  # the next run takes over the actors; the head's stop ends them
                        self.env[KEEP_ACTORS_ENV] = f"fedmerge-{ray_port}"
                    # its output joins the runtime's log when the runtime closes; a
                    # head that stops early says why in :meth:`_check_ray`'s error
                    with (self.tmp / "ray.log").open("ab") as ray_out:
                        self.ray = self.spawn(
                            ray_head.head_command(
                                self.tmp / "bin", ray_port, head_cpus(ray_num_cpus), self.tmp / "r"
                            ),
                            ray_out,
                            cwd=APP_DIR,
                        )
                # The SuperLink is forked from the warm process too (its shim is
                # first on the runtime's PATH); it inherits RAY_ADDRESS for the
                # simulation processes that its SuperExec starts.
                superlink = shutil.which("flower-superlink", path=self.env["PATH"])
                self.superlink = self.spawn(
                    [
                        superlink or "flower-superlink",
                        "--insecure", "--simulation",
                        "--isolation", "subprocess",
                        "--host", "127.0.0.1", "--port", str(self.port),
                    ],
                    out,
                )  # fmt: skip
            if shared:
                prepare_drivers(self.env)
            # The first run is submitted as soon as the SuperLink answers, while
            # the Ray head may still be starting: its simulation process imports
            # the app first, and Ray's driver waits for the head's raylet when it
            # connects (see :meth:`run` for a head that dies).
            wait_healthy(self.port, self.superlink, timeout=60)
        except BaseException:
            self.close()
            raise

    def _check_ray(self) -> None:
        """Raise if the Ray head this runtime started has exited."""
        if self.ray is not None and self.ray.poll() is not None:
            raise SimulationError(
                f"ray start exited with code {self.ray.returncode}"
                + ray_head.last_words(self.tmp / "ray.log")
            )

    def spawn(
        self, argv: list[str], out: IO[bytes], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a session of its own, guarded by the watchdog."""
        proc = subprocess.Popen(
            argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, start_new_session=True,
        )  # fmt: skip
        with self._lock:
            self._guarded[proc.pid] = start_time(proc.pid)
            self._write_guard()
        return proc

    def _write_guard(self) -> None:
        """The watchdog's list: each process's PID and start time, one per line.

        A process without a start time had ended before :meth:`spawn` looked.
        """
        if self._closed:  # its folder is gone, or going (close)
            return
        lines = [f"{pid} {start}\n" for pid, start in self._guarded.items() if start is not None]
        atomic_write_text(self.tmp / "guard", "".join(lines))

    def _stop_spawned(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        """Stop ``proc`` (from :meth:`spawn`) and its tree (:func:`stop_process`), then forget it.

        A sweep's runtime starts a ``flwr run`` per run: once reaped, each
        leaves the watchdog's list, whose PIDs the kernel gives to later
        processes.
        """
        stop_process(proc, grace)
        with self._lock:
            self._guarded.pop(proc.pid, None)
            self._write_guard()

    def run(
        self,
        run_dir: Path,
        run_config: str,
        federation_config: str,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> str | None:
        """Submit a run with ``flwr run --stream``; follow it until its summary exists.

        ``run_config`` is the run's flat TOML run config (written to
        ``run_dir/run_config.toml``), ``federation_config`` its
        ``--federation-config``. Flower's output for the run goes to
        ``run_dir/flower.log``; ``on_round`` gets every row of
        ``run_dir/metrics.jsonl``.

        ``flwr run`` shows the ServerApp's log a little late (Flower uploads
        and streams it in batches, see :mod:`sims.log_stream`). Once the
        summary exists, it gets up to :data:`LOG_CATCH_UP` seconds to show the
        rest (:func:`log_caught_up`), so that ``flower.log`` is whole when this
        returns.

        Returns
        -------
        str or None
            ``None`` once the run has written ``summary.json``; otherwise the
            line, also written to ``flower.log``, that says how ``flwr run``
            ended first.
        """
        atomic_write_text(run_dir / "run_config.toml", run_config)
        metrics = run_dir / "metrics.jsonl"
        summary_path = run_dir / SUMMARY_FILE
        summary_path.unlink(missing_ok=True)
        log_path = run_dir / "flower.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        client = None
        ended = None
        try:
            with log_path.open("ab") as log:
                client = self.spawn(
                    [
                        "flwr", "run", str(self.app), "fedmerge", "--stream",
                        "--run-config", str(run_dir / "run_config.toml"),
                        "--federation-config", federation_config,
                    ],
                    log,
                    cwd=run_dir,
                )  # fmt: skip
                wake_superexec(self.env[WAKE_ENV])
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
                if not summary_path.exists():
                    ended = f"fedmerge: {_ended(client.returncode)}"
                    log.write(f"{ended}\n".encode())
        finally:
            # Once the summary is written the run is over, but for the last lines
            # of its log: `flwr run` stops once it has shown them, rather than
            # following the simulation process's shutdown for about 3 s more. The
            # runtime lets the simulation process finish on its own.
            if client is not None:
                try:
                    if summary_path.exists():
                        log_caught_up(client, log_path, start)
                finally:
                    self._stop_spawned(client, grace=2)
        return None if summary_path.exists() else ended

    def close(self, grace: float = 1.0) -> None:
        """Stop the SuperLink, the Ray head this runtime started, and the watchdog.

        The trees of the SuperLink, Ray and the warm process (with any
        simulation process or Ray worker still finishing) are signalled together, so
        that their grace periods overlap; a run's ServerApp is killed first
        (:func:`sims.processes.stop_run_tree`).
        """
        procs = [p for p in (self.superlink, self.ray, self.warm) if p is not None]
        with self._lock:
            self._closed = True
        # a child not yet reaped (poll() is None) still owns its PID
        stop_run_tree([p.pid for p in procs if p.poll() is None], grace)
        for proc in procs:
            proc.wait()
        # what left the trees: a process whose parent was gone before it was stopped
        stop_marked(MARKER, self.env[MARKER], grace)
        stop_process(self.watchdog, grace=1.0)
        own_logs = (self.tmp / "ray.log", self.tmp / "warm.log")
        said = b"".join(p.read_bytes() for p in own_logs if p.exists())
        if self.log is not None and said:
            with self.log.open("ab") as out:
                out.write(said)
        shutil.rmtree(self.tmp, ignore_errors=True)


#: The runtime that :func:`prestarted_runtime` started, until a run takes it.
_prestarted: Runtime | None = None
_prestarted_lock = threading.Lock()


@contextmanager
def prestarted_runtime() -> Iterator[None]:
    """Start a :class:`Runtime`'s warm process now; the first run of this block takes it.

    A command wraps in this what it does before its first run (its imports, the
    checks of its input), so that the warm process imports Flower and PyTorch
    meanwhile. A runtime that no run took (bad input, nothing to run) is
    stopped when the block ends.
    """
    global _prestarted
    with _prestarted_lock:
        _prestarted = Runtime()
    try:
        yield
    finally:
        with _prestarted_lock:
            unused, _prestarted = _prestarted, None
        if unused is not None:
            unused.close(grace=0.0)


def new_runtime() -> Runtime:
    """The runtime :func:`prestarted_runtime` started, if no run has taken it; else a new one."""
    global _prestarted
    with _prestarted_lock:
        runtime, _prestarted = _prestarted, None
    return runtime if runtime is not None else Runtime()
