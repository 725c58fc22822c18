"""A warm simulation process: Flower's ``flwr-simulation``, forked from a process that imported it.

Flower's SuperExec starts one ``flwr-simulation`` process per run, which
imports Flower, Ray and PyTorch (about 3 s of CPU here) before it asks the
SuperLink for its run. A :class:`sims.launch.Runtime` serves many runs, so it
pays those imports once:

- :func:`serve` (``python -m sims.warm_simulation serve SOCKET``) is started
  with the runtime. It binds a Unix socket, imports Flower's simulation
  runtime, Ray, PyTorch and NumPy (never fedmerge's own packages: every run
  loads the Flower App from its FAB, so a changed app is always fresh), and
  then forks one child per request. The child takes the requester's standard
  streams, environment, working directory and arguments, and runs Flower's
  own entry point, :func:`flwr.simulation.app.flwr_simulation`, unchanged.
- :func:`shim_main` is the ``flwr-simulation`` that the runtime puts first on
  its SuperLink's ``PATH`` (:func:`write_shim`). The SuperExec starts it as it
  would start Flower's; it hands its request to the warm process, relays
  SIGTERM and SIGINT to the child, and exits with the child's exit code. If no
  warm process answers, it runs Flower's own ``flwr-simulation`` in its place.

This module and :mod:`sims.processes` import only the standard library at
module level: the shim starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from sims.processes import reap_children

#: The environment variable that names the warm process's socket for the shim.
SOCKET_ENV = "FEDMERGE_WARM_SIMULATION"

#: What the warm process imports before it serves: Flower's simulation process's own imports.
PRELOAD = (
    "numpy",
    "torch",
    "ray",
    "flwr.simulation.app",
    "flwr.server.superlink.fleet.vce.backend.raybackend",
    "flwr.serverapp",
    "flwr.clientapp",
)

_HEADER = 8  # bytes of the request's length


def write_shim(bin_dir: Path) -> Path:
    """Write the ``flwr-simulation`` shim into ``bin_dir``; return its path.

    The shim runs this interpreter without ``site`` (standard library only)
    and imports this module from the directory that holds :mod:`sims`.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    shim = bin_dir / "flwr-simulation"
    shim.write_text(
        f"#!{sys.executable} -S\n"
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from sims.warm_simulation import shim_main\n"
        "sys.exit(shim_main())\n"
    )
    shim.chmod(0o755)
    return shim


# -- the shim: what the SuperExec starts -------------------------------------------


def shim_main() -> int:
    """Hand this ``flwr-simulation`` invocation to the warm process; return the exit code."""
    path = os.environ.get(SOCKET_ENV, "")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = json.dumps(
            {"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}
        ).encode()
        socket.send_fds(conn, [len(request).to_bytes(_HEADER, "big") + request], [0, 1, 2])
        replies = conn.makefile("rb")
        first = replies.readline()
    except OSError:
        first = b""
    if not first:  # no warm process: run Flower's own entry point in this process
        conn.close()
        real = Path(sys.executable).parent / "flwr-simulation"
        os.execv(str(real), [str(real), *sys.argv[1:]])
    pid = int(json.loads(first)["pid"])

    def relay(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    last = replies.readline()  # the child's exit code; empty if it was killed
    return int(json.loads(last)["exit"]) if last else 1


# -- the warm process ----------------------------------------------------------------


def serve(path: str) -> int:
    """Listen on ``path``, import :data:`PRELOAD`, then fork a simulation process per request."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # before the imports: requests wait in the backlog meanwhile
    listener.listen(64)
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener.settimeout(0.5)
    while True:
        reap_children()
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
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            _child(conn, request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        conn.close()


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
    return request, fds


def _child(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """Become the requester's ``flwr-simulation``: its streams, environment and arguments."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = list(request["argv"])
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        from flwr.simulation.app import flwr_simulation

        flwr_simulation()
        code = 0
    except SystemExit as exc:  # Flower ends its processes with sys.exit
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except (OSError, ValueError):
            pass
        os._exit(code)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: python -m sims.warm_simulation serve SOCKET")
    sys.exit(serve(sys.argv[2]))
