"""The warm process: Flower's and Ray's Python processes, forked from one that imported them.

A run starts several Python processes, each of which imports Flower, Ray and
PyTorch (about 3 s of CPU each here) before it does anything: ``flwr run``,
which submits the run; Flower's SuperLink, its SuperExec and the
``flwr-simulation`` process that it starts for the run; and every Ray worker
that hosts a ClientApp actor. A :class:`sims.runtime.Runtime` serves many
runs, so it pays those imports once. A deployment on one machine can do the
same for its SuperLink, SuperNodes and their ServerApp and ClientApp
processes (the deployment tests do, see ``tests/e2e/deployment_support.py``):
every program of :data:`ENTRY_POINTS` found first on ``PATH`` as a shim is
forked.

- :func:`serve` (``python -m sims.warm serve SOCKET [APP]``) is started with
  the runtime. It binds a Unix socket, imports Flower, PyTorch and NumPy
  (:data:`PRELOAD`), and then forks one child per request. A runtime's warm
  process also imports the app that all its runs submit, the runtime's staged
  copy (:func:`import_app`); a warm process started without one (the
  deployment tests') never imports fedmerge's own packages, so that every
  deployed run loads the app from its FAB and a changed app is fresh.
  ``torch._dynamo``, which ``torch.optim`` imports (about 2.5 s of CPU
  here), is not among the imports: fedmerge trains with
  :mod:`fedmerge.optim`, and a plugin that builds a ``torch.optim``
  optimiser pays that import once in each process that uses it. Nor does it
  import Ray: Ray's C++ core reads a worker's job (``RAY_JOB_ID``) from
  the environment once, when Ray is imported, so a worker forked from a
  process that had imported Ray would have none. The child takes the
  requester's standard streams, environment, working directory and arguments,
  and runs the program the requester stands for, unchanged: Flower's own entry
  point (:data:`ENTRY_POINTS`), Ray's ``default_worker.py``, or ``fedmerge
  supernode``'s ClientApp process (:data:`WORKER`).
- :func:`shim_main` is what the runtime starts in their place
  (:func:`warm_environment`): Flower's console scripts first on the runtime's
  ``PATH``, and :data:`RAY_WORKER` as the Python executable of the
  run's Ray workers (Ray's ``py_executable``, set by :func:`ray_runtime_env`).
  A shim hands its request to the warm process, relays SIGTERM and SIGINT to
  the child, and exits with the child's exit code, or dies of the signal
  that killed the child (the warm process reaps it and says which); the
  child exits when its shim does. If no warm process answers, the shim runs
  the real program in its place.

This module and :mod:`sims.processes` import only the standard library at
module level: a shim starts in milliseconds.
"""

from __future__ import annotations

import errno
import faulthandler
import importlib
import io
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # a shim imports this module: nothing it does not need
    import subprocess

#: The environment variable that names the warm process's socket for the shims.
SOCKET_ENV = "FEDMERGE_WARM"

#: The environment variable that names the wake-up socket of a runtime's SuperExec
#: (:func:`wake_superexec`).
WAKE_ENV = "FEDMERGE_SUPEREXEC_WAKE"

#: Set, to a Ray namespace, in the environment of a shared runtime that started its
#: own Ray head: its runs' simulation engines keep their ClientApp actors for the
#: next run (:func:`sims.engine_wake.keep_actors`), and the head's stop ends them.
KEEP_ACTORS_ENV = "FEDMERGE_KEEP_ACTORS"

#: Seconds between a SuperExec's looks for a submitted run while none is coming.
IDLE_POLL = 2.0

#: Seconds after its start and after each wake-up during which it looks at Flower's
#: own interval (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 0.1 s in
#: :data:`sims.processes.FAST_TASK_POLL`).
AWAKE = 20.0

#: The shim of ``python -m sims.clientapp_worker`` (:func:`sims.node.worker_command`).
WORKER = "fedmerge-clientapp-worker"

#: The programs that the warm process serves: shim name -> (module, function).
#: Flower's console scripts, and :data:`WORKER`.
ENTRY_POINTS = {
    "flwr": ("flwr.cli.app", "app"),
    "flwr-simulation": ("flwr.simulation.app", "flwr_simulation"),
    "flower-superexec": ("flwr.supercore.cli", "flower_superexec"),
    "flower-superlink": ("flwr.superlink.cli", "flower_superlink"),
    "flower-supernode": ("flwr.supernode.cli", "flower_supernode"),
    "flwr-serverapp": ("flwr.superlink.cli", "flwr_serverapp"),
    "flwr-clientapp": ("flwr.supernode.cli", "flwr_clientapp"),
    # fedmerge's own: the long-lived ClientApp process of `fedmerge supernode`
    WORKER: ("sims.clientapp_worker", "main"),
}

#: The shim that Ray starts as a worker's Python: ``fedmerge-ray-worker default_worker.py ARGS``.
RAY_WORKER = "fedmerge-ray-worker"
#: The script of Ray's workers, as the raylet starts them (its own programs have others).
RAY_WORKER_SCRIPT = "default_worker.py"

#: The program that is a Ray driver: a simulated run's ServerApp process (``flwr-simulation``).
DRIVER = "flwr-simulation"

#: The request (:func:`prepare_drivers`) that has the warm process start its drivers'
#: process: a child that imports :data:`DRIVER_PRELOAD` with the drivers' environment.
PREPARE_DRIVERS = "fedmerge-prepare-drivers"

#: What the drivers' process imports on top of :data:`PRELOAD`: Ray, and what Flower's
#: simulation and Ray's ``init`` and ``shutdown`` import on the way.
DRIVER_PRELOAD = (
    "ray",
    "ray.dag",
    "ray._common.pydantic_compat",
    "flwr.server.superlink.fleet.vce.backend.raybackend",
)

#: What the warm process imports before it serves: its children's own imports, Ray's aside.
PRELOAD = (
    "numpy",
    "torch",
    "flwr.cli.app",
    "flwr.simulation.app",
    "flwr.serverapp",
    "flwr.clientapp",
    "flwr.supercore.cli",
    "flwr.superlink.cli",
    "flwr.supernode.cli",
)

_HEADER = 8  # bytes of the request's length

#: Seconds between two looks for exited children in the warm and drivers' processes
#: (:func:`_reap`): a shim whose program was killed learns it that much later at most.
#: An idle warm process spends about 4 ms of CPU a second on them here.
REAP_EVERY = 0.05


def write_shims(root: Path) -> tuple[Path, Path]:
    """Write the shims into ``root/bin``; return that directory and the warm process's socket.

    Each shim runs this interpreter without ``site`` (standard library only)
    and imports this module from the directory that holds :mod:`sims`.
    """
    sock = root / "warm.sock"
    bin_dir = shim_dir(sock)
    bin_dir.mkdir(parents=True, exist_ok=True)
    source = Path(__file__).resolve().parent.parent
    for name in (*ENTRY_POINTS, RAY_WORKER):
        shim = bin_dir / name
        shim.write_text(
            f"#!{sys.executable} -S\n"
            "import sys\n"
            f"sys.path.insert(0, {str(source)!r})\n"
            "from sims.warm import shim_main\n"
            "sys.exit(shim_main())\n"
        )
        shim.chmod(0o755)
    return bin_dir, sock


def warm_environment(
    root: Path, env: Mapping[str, str], app: Path | None = None
) -> tuple[dict[str, str], list[str]]:
    """Write the shims into ``root``; ``env`` set up for them, and the warm process's command.

    The environment has the shims (then this interpreter's scripts) first on
    ``PATH`` and the socket in :data:`SOCKET_ENV`; the command
    (``python -m sims.warm serve SOCKET [APP]``) starts the warm process that
    serves the processes given that environment. ``app``: the Flower App that
    every run it serves submits, unchanged (see :func:`import_app`).
    """
    bin_dir, sock = write_shims(root)
    path = [str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]
    shimmed = {**env, "PATH": os.pathsep.join(path), SOCKET_ENV: str(sock)}
    command = [sys.executable, "-m", "sims.warm", "serve", str(sock)]
    return shimmed, command + ([str(app)] if app is not None else [])


def shim(name: str) -> Path | None:
    """The shim of program ``name`` (:data:`ENTRY_POINTS`) when a warm process serves here.

    That is when :data:`SOCKET_ENV` names a warm process's socket (a
    :class:`sims.runtime.Runtime`'s processes, the deployment tests'); ``None``
    otherwise, and for a program the warm process does not serve.
    """
    sock = os.environ.get(SOCKET_ENV, "")
    if not sock or name not in ENTRY_POINTS:
        return None
    path = shim_dir(Path(sock)) / name
    return path if path.is_file() else None


def wait_listening(env: Mapping[str, str], warm: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until ``warm``, the warm process of ``env``, listens (it does before its imports).

    A shim or request that finds no socket runs its program cold. Returns
    early if ``warm`` exits; after ``timeout`` seconds the shims run cold.
    """
    sock = Path(env[SOCKET_ENV])
    deadline = time.monotonic() + timeout
    while not sock.exists() and warm.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def shim_dir(sock: Path) -> Path:
    """Where the shims of the warm process listening on ``sock`` are: beside it."""
    return sock.with_name("bin")


def _real_argv(name: str, argv: list[str]) -> list[str]:
    """What the shim ``name`` invoked with ``argv`` stands for, as a cold start would exec it.

    Ray's worker shim stands for ``python default_worker.py ARGS``; Flower's
    shims for the console script of the same name beside this interpreter.
    """
    if name == RAY_WORKER:
        return [sys.executable, *argv[1:]]
    if name == WORKER:
        return [sys.executable, "-m", ENTRY_POINTS[WORKER][0], *argv[1:]]
    return [str(Path(sys.executable).parent / name), *argv[1:]]


def ray_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's ``RAY_RUNTIME_ENV_HOOK``: start this job's workers through the warm process.

    A :class:`sims.runtime.Runtime` whose Ray cluster is on this machine names
    this function in ``RAY_RUNTIME_ENV_HOOK`` for its processes. It adds the :data:`RAY_WORKER` shim
    as the workers' ``py_executable`` and the socket to their environment;
    whatever else the job asked for (Flower sets ``PYTHONPATH``) stays.
    """
    env = dict(runtime_env or {})
    path = os.environ.get(SOCKET_ENV, "")
    if not path or "py_executable" in env:
        return env
    env["py_executable"] = str(shim_dir(Path(path)) / RAY_WORKER)
    env["env_vars"] = {**env.get("env_vars", {}), SOCKET_ENV: path}
    return env


# -- the shims: what Flower and Ray start --------------------------------------------


def shim_main() -> int:
    """Hand this invocation to the warm process; return the child's exit code."""
    name = Path(sys.argv[0]).name
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.environ.get(SOCKET_ENV, ""))
        request = json.dumps(
            {"name": name, "argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}
        ).encode()
        socket.send_fds(conn, [len(request).to_bytes(_HEADER, "big") + request], [0, 1, 2])
        replies = conn.makefile("rb")
        first = replies.readline()
    except OSError:
        first = b""
    if not first:  # no warm process: run the real program in this process
        conn.close()
        real = _real_argv(name, sys.argv)
        os.execv(real[0], real)
    pid = int(json.loads(first)["pid"])

    def relay(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    last = replies.readline()  # the child's exit code (from the warm process if it was killed)
    code = int(json.loads(last)["exit"]) if last else 1
    if code < 0:  # killed by signal -code: end the same way, as the program itself would have
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # their handling cannot change
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # a signal whose default is not to end the process
    return code


# -- the warm process ----------------------------------------------------------------


def serve(path: str, app: str | None = None) -> int:
    """Listen on ``path``, import :data:`PRELOAD`, then fork a child per request.

    With ``app``, :func:`import_app` once the first child is forked: a
    runtime's first request is its SuperLink, which starts meanwhile.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound and listening before the imports: requests wait in the backlog meanwhile.
    # The socket is bound under a temporary name and renamed once it listens (a
    # rename is atomic): a client that connected between bind and listen would be
    # refused, and one that finds the name (wait_listening, a shim) must be able to
    # connect. As bind would, it refuses a name that exists.
    if os.path.lexists(path):
        raise FileExistsError(errno.EADDRINUSE, "a socket or file has this name", path)
    temporary = str(Path(path).with_name("warm.new"))
    if os.path.lexists(temporary):
        os.unlink(temporary)
    listener.bind(temporary)
    listener.listen(64)
    os.rename(temporary, path)
    # What a fresh interpreter has on sys.path after its script's directory and
    # PYTHONPATH: every child puts its own in front (see _child).
    own = set(os.environ.get("PYTHONPATH", "").split(os.pathsep))
    base = [p for p in sys.path[1:] if p not in own]
    fresh = list(warnings.filters)
    for module in PRELOAD:
        importlib.import_module(module)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener.settimeout(REAP_EVERY)
    drivers: _Drivers | None = None
    waiting: dict[int, socket.socket] = {}  # child's PID -> its connection (_fork_child)
    while True:
        _reap(waiting)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        if request["name"] == PREPARE_DRIVERS:
            _close(conn, fds)
            if drivers is None or not drivers.serves(request["env"]):
                if drivers is not None:
                    drivers.close()
                drivers = _Drivers(request["env"], listener, waiting, base, fresh, app)
            continue
        if (
            request["name"] == DRIVER
            and drivers is not None
            and drivers.serves(request["env"])
            and drivers.hand_over(conn, request, fds)
        ):
            _close(conn, fds)
        else:
            _fork_child(conn, request, fds, base, fresh, listener, waiting)
        if app is not None:
            import_app(app)
            app = None


def _fork_child(
    conn: socket.socket,
    request: dict[str, Any],
    fds: list[int],
    base: list[str],
    fresh: list[Any],
    server: socket.socket,
    waiting: dict[int, socket.socket],
) -> None:
    """Fork a child that becomes the requested program (:func:`_child`).

    The child closes this process's sockets: ``server``, the one it takes
    requests from, and its other children's connections (``waiting``). This
    process closes its copies of the request's streams and keeps the
    connection in ``waiting`` until it reaps the child (:func:`_reap`).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for sock in (server, *waiting.values()):
            sock.close()
        _child(conn, request, fds, base, fresh)  # never returns
    for fd in fds:
        os.close(fd)
    waiting[pid] = conn


def _reap(waiting: dict[int, socket.socket], block: bool = False) -> None:
    """Collect exited children; tell each one's requester how it ended, then close.

    A child that exits sends its exit code itself (:func:`_child`); one that
    dies of a signal (SIGKILL from the kernel's out-of-memory killer, a
    crash) or replaced itself (``exec``) cannot, so this process sends it:
    ``{"exit": -SIGNAL}`` or the code, which the shim turns into its own end
    (:func:`shim_main`). A requester that has the child's own line already
    reads no further. ``block``: wait until no child is left.
    """
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            line = json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n"
            try:
                conn.sendall(line)
            except OSError:  # the requester is gone (it had the child's own line)
                pass
            conn.close()


def import_app(app: str) -> None:
    """Import the ServerApp's and ClientApp's modules of the Flower App in directory ``app``.

    A :class:`sims.runtime.Runtime` stages its app once, and every run it
    serves submits that copy as its FAB. Flower's ``load_app`` takes a module
    that is already imported as it is, so the simulation processes and Ray
    workers forked afterwards start with the same code imported (about 0.25 s
    of CPU each here). The modules come from ``app`` itself, found first on
    ``sys.path`` while they import. If an import fails, the traceback goes to
    this process's output, the app's packages are forgotten again, and each
    run imports its FAB as if nothing had been imported.
    """
    root = Path(app)
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    sys.path.insert(0, str(root))
    try:
        for ref in app_components(root):
            importlib.import_module(ref.partition(":")[0])
    except Exception:
        traceback.print_exc()
        for name in [m for m in sys.modules if m.partition(".")[0] in packages]:
            del sys.modules[name]
    finally:
        sys.path.remove(str(root))


def app_components(app: Path) -> list[str]:
    """The Flower App's components in ``app/pyproject.toml``: ``module:attribute`` references."""
    import tomllib  # here, not with the module: every shim imports sims.warm

    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    return list(pyproject["tool"]["flwr"]["app"]["components"].values())


def _close(conn: socket.socket, fds: list[int]) -> None:
    """Close this process's copies of a request's connection and streams (a child has its own)."""
    for fd in fds:
        os.close(fd)
    conn.close()


class _Drivers:
    """The drivers' process: a child of the warm process with Ray imported, forking drivers.

    The warm process itself never imports Ray (see :mod:`sims.warm`), but a
    driver (``flwr-simulation``, which imports Ray and connects to the
    cluster as its driver) can be forked from a process that has. Ray reads
    its settings from the environment when it is imported, so this process
    imports :data:`DRIVER_PRELOAD` with the environment the drivers will
    have (:func:`prepare_drivers`), and serves only requests that come with
    that same environment; the warm process forks every other one itself.
    Once the warm process is done with it (its end of the socket pair
    closes), it waits for its children and exits.
    """

    def __init__(
        self,
        env: dict[str, str],
        server: socket.socket,
        waiting: Mapping[int, socket.socket],
        base: list[str],
        fresh: list[Any],
        app: str | None,
    ) -> None:
        self.env = env
        # one request per message, whole, with its connection and streams
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            for sock in (server, *waiting.values()):  # the warm process's: not this child's
                sock.close()
            self.sock.close()
            code = 1
            try:
                code = _serve_drivers(theirs, env, base, fresh, app)
            except SystemExit as exc:  # SIGTERM, as the warm process gets it
                code = exc.code if isinstance(exc.code, int) else 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        theirs.close()

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a driver with ``env`` may be forked here (Ray was imported with it)."""
        return env == self.env

    def hand_over(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> bool:
        """Pass a request (its connection and streams) on; ``False`` if this process is gone."""
        try:
            socket.send_fds(self.sock, [json.dumps(request).encode()], [conn.fileno(), *fds])
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Let this drivers' process end once its drivers have (see the class)."""
        self.sock.close()


def _serve_drivers(
    sock: socket.socket, env: dict[str, str], base: list[str], fresh: list[Any], app: str | None
) -> int:
    """The drivers' process (:class:`_Drivers`): import Ray with ``env``, fork per request.

    ``app``: the warm process's app, if it has not imported it yet (:func:`import_app`).
    """
    set_title(f"{sys.executable} -m sims.warm drivers")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.environ.clear()
    os.environ.update(env)
    for module in DRIVER_PRELOAD:
        importlib.import_module(module)
    if app is not None:
        import_app(app)
    waiting: dict[int, socket.socket] = {}  # driver's PID -> its connection (_fork_child)
    while True:
        _reap(waiting)
        ready, _, _ = select.select([sock], [], [], REAP_EVERY)
        if not ready:
            continue
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 4)
        if not data:  # the warm process is done with this one: its drivers may finish
            _reap(waiting, block=True)
            return 0
        conn = socket.socket(fileno=fds[0])
        _fork_child(conn, json.loads(data), fds[1:], base, fresh, sock, waiting)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Read one request: its length, the JSON, and the requester's three standard streams."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request carries three file descriptors")
    while len(data) < _HEADER:
        data += conn.recv(1 << 16)
    size = int.from_bytes(data[:_HEADER], "big")
    body = data[_HEADER:]
    while len(body) < size:
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ValueError("truncated request")
        body += chunk
    request: dict[str, Any] = json.loads(body)
    if request.get("name") not in (*ENTRY_POINTS, RAY_WORKER, PREPARE_DRIVERS):
        raise ValueError(f"no such program: {request.get('name')!r}")
    return request, fds


def _child(
    conn: socket.socket,
    request: dict[str, Any],
    fds: list[int],
    base: list[str],
    fresh: list[Any],
) -> None:
    """Become the requester's program: its streams, environment, arguments and ``sys.path``.

    An import may widen which warnings show, for the whole process: Flower's
    Ray transport shows every DeprecationWarning once. A program started cold
    shows only those of what it imports itself, so the child gets a fresh
    interpreter's filters (``fresh``) plus the ignores the imports added.
    """
    added = [f for f in warnings.filters if f not in fresh and f[0] == "ignore"]
    cast(list[Any], warnings.filters)[:] = added + fresh  # a list, typed as a Sequence
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        # as a fresh interpreter with this environment: a fatal signal's stack on stderr
        if os.environ.get("PYTHONFAULTHANDLER"):
            faulthandler.enable()
        else:
            faulthandler.disable()
        os.chdir(request["cwd"])
        name = request["name"]
        argv = _real_argv(name, request["argv"])
        if name == RAY_WORKER:
            argv = argv[1:]  # `python [-u] SCRIPT ARGS`: the script is argv[0]
            if argv[:1] == ["-u"]:  # as unbuffered as a fork can be: a flush per line
                argv = argv[1:]
                for stream in (sys.stdout, sys.stderr):
                    cast(io.TextIOWrapper, stream).reconfigure(line_buffering=True)
        title = " ".join(argv)  # what `ps` shows: the program's command line
        if name == WORKER:
            # `python -m MODULE ARGS`: the working directory comes first on sys.path
            argv, script_dir = argv[2:], os.getcwd()
        else:
            script_dir = str(Path(argv[0]).parent)
        pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [script_dir, *pythonpath, *base]
        sys.argv = argv
        set_title(title)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        # The shim holds the other end: once it is gone (killed), so is this process.
        threading.Thread(target=_exit_with, args=(conn,), daemon=True).start()
        # A program that replaces itself (exec, as sims.clientapp_worker does when
        # the app changes) keeps the connection open: its shim waits for the new
        # image to end, whose exit the warm process reports (_reap).
        os.set_inheritable(conn.fileno(), True)
        if name == RAY_WORKER:
            import runpy

            # a worker (not one of the head's own programs) may be kept for later runs
            if os.environ.get(KEEP_ACTORS_ENV) and Path(argv[0]).name == RAY_WORKER_SCRIPT:
                watch = threading.Thread(target=_exit_with_parent, args=(os.getppid(),))
                watch.daemon = True
                watch.start()

            # Ray's own setproctitle looks for the command line beside the
            # environment, which this process has replaced: titles such as
            # `ray::ClientAppActor` go through set_title instead.
            vars(importlib.import_module("ray._raylet"))["setproctitle"] = set_title
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        else:
            if name == "flower-superexec" and os.environ.get(WAKE_ENV):
                _wake_on_request(os.environ[WAKE_ENV])
            if name == DRIVER:  # its engine hands messages to the actors once they are stored
                importlib.import_module("sims.engine_wake").install()
            if name in (DRIVER, "flower-superlink"):  # its log reaches `flwr run` sooner
                importlib.import_module("sims.log_stream").install()
            module, function = ENTRY_POINTS[name]
            result = getattr(importlib.import_module(module), function)()
            code = result if isinstance(result, int) else 0
    except SystemExit as exc:  # Flower and Ray end their processes with sys.exit
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            # as the exit status of `os._exit(code)`: a negative code here means a signal
            conn.sendall(json.dumps({"exit": code % 256}).encode() + b"\n")
        except (OSError, ValueError):
            pass
        os._exit(code)


def prepare_drivers(env: Mapping[str, str]) -> None:
    """Have the warm process of ``env`` (:data:`SOCKET_ENV`) prepare for drivers run with ``env``.

    A runtime calls this once it has set the environment of its SuperLink,
    which its simulation processes inherit: the warm process starts a child
    that imports Ray with that environment, and forks every later
    ``flwr-simulation`` of the same environment from it (:class:`_Drivers`).
    The request waits in the socket's backlog while the warm process is still
    importing; nothing happens if no warm process listens.
    """
    body = json.dumps({"name": PREPARE_DRIVERS, "env": dict(env)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn, open(os.devnull) as null:
        try:
            conn.connect(env.get(SOCKET_ENV, ""))
            socket.send_fds(conn, [len(body).to_bytes(_HEADER, "big") + body], [null.fileno()] * 3)
        except OSError:
            pass


def wake_superexec(path: str) -> None:
    """Tell the SuperExec listening on ``path`` (:data:`WAKE_ENV`) that a run is being submitted.

    Nothing happens when no SuperExec listens there (it polls at Flower's
    interval then, as it does when started cold).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(b"run", path)
        except OSError:
            pass


class _WakeableTime:
    """The ``time`` module as the SuperExec loop sees it: a ``sleep`` that a wake-up cuts short."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # Awake from the start: a runtime submits its first run as soon as the
        # SuperLink answers, maybe before this SuperExec has bound its socket.
        self._awake_until = time.monotonic() + AWAKE

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` while awake, else :data:`IDLE_POLL`; a wake-up ends it at once."""
        awake = time.monotonic() < self._awake_until
        ready, _, _ = select.select([self._sock], [], [], seconds if awake else IDLE_POLL)
        if ready:
            while True:
                try:
                    self._sock.recv(64)
                except BlockingIOError:
                    break
            self._awake_until = time.monotonic() + AWAKE

    def rest(self) -> None:
        """Poll at :data:`IDLE_POLL` until the next wake-up: the run that was coming has started."""
        self._awake_until = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _wake_on_request(path: str) -> None:
    """Let this SuperExec look for submitted runs often only when told that one is coming.

    Flower's SuperExec asks the SuperLink for a run every
    ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds, and each request costs the
    SuperLink several milliseconds of CPU: at 0.1 s, an idle runtime kept about
    a tenth of a core busy. Here the SuperExec asks every :data:`IDLE_POLL`
    seconds, at once when :func:`wake_superexec` is called (a runtime does
    that as it submits a run), and at Flower's interval for :data:`AWAKE`
    seconds after that, and after its own start, or until it has launched a
    run (the one it was told of: a runtime submits its next run, with a
    wake-up of its own, once that one has ended). Its loop
    (``run_superexec``, flwr 1.42) sleeps through the module-level ``time``
    and reports each launch to ``_handle_launch_result``; if ``time`` is not
    there, it polls as it would cold, and without the latter it stays awake
    for the whole :data:`AWAKE`.
    """
    module = importlib.import_module("flwr.supercore.superexec.run_superexec")
    if getattr(module, "time", None) is not time:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    clock = _WakeableTime(sock)
    vars(module)["time"] = clock
    handle = getattr(module, "_handle_launch_result", None)
    if callable(handle):

        def handled(result: Any, task: Any) -> None:
            handle(result, task)
            if getattr(result, "status", None) == "accepted":  # a StrEnum in flwr 1.42
                clock.rest()

        vars(module)["_handle_launch_result"] = handled


def set_title(title: str) -> None:
    """Write ``title`` over this process's command line and name, as ``ps`` and ``top`` show them.

    A forked child keeps the warm process's command line (``/proc/self/cmdline``)
    and name (``/proc/self/comm``); this puts its own program's there. The
    command line is cut to the length of the warm process's; the name is the
    first word's file name, cut to 15 bytes, as the kernel names a program it
    starts and Ray's own ``setproctitle`` names a worker (``ray::ClientAppA``)
    (Linux only).
    """
    import ctypes

    # The name first: whoever finds the process by its new command line finds its new
    # name too. /proc/self is the process, whichever of its threads asks (Ray names a
    # worker from the thread that runs its task); prctl would name that thread only.
    Path("/proc/self/comm").write_bytes(Path(title.split(" ", 1)[0]).name.encode()[:15])
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    start, end = int(stat[45]), int(stat[46])  # arg_start, arg_end: fields 48 and 49
    data = title.encode()[: end - start - 1]
    ctypes.memmove(start, data + bytes(end - start - len(data)), end - start)


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    """End this process once ``parent`` (the warm process) is no longer its parent.

    An actor that a shared runtime keeps for its next run
    (:data:`KEEP_ACTORS_ENV`) would otherwise hold its CPUs
    after the warm process is gone, when the next run's simulation process
    starts without it (its shim's fallback) and creates actors of its own.
    """
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _exit_with(conn: socket.socket) -> None:
    """Block until the shim closes its end of ``conn``; then end this process."""
    try:
        while conn.recv(1 << 10):
            pass
    except OSError:
        pass
    os._exit(1)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "serve":
        sys.exit("usage: python -m sims.warm serve SOCKET [APP]")
    sys.exit(serve(*sys.argv[2:]))
