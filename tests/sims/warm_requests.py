"""A real warm process for the tests of ``sims.warm``, and requests to it as a shim sends them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from sims.warm import _HEADER, SOCKET_ENV, shim_dir, wait_listening, warm_environment

ROOT = Path(__file__).resolve().parents[2]


#: ``python -m sims.warm serve SOCKET [APP]`` without its imports (``PRELOAD`` emptied): ready
#: at once, for tests of what the warm process does rather than of what it has imported.
BARE_WARM = "import sys; from sims import warm; warm.PRELOAD = (); warm.serve(*sys.argv[1:])"


def start_warm(
    root: Path, log: Path, app: Path | None = None, *, bare: bool = False
) -> tuple[dict[str, str], subprocess.Popen[bytes]]:
    """Start ``python -m sims.warm serve`` (shims under ``root``, output to ``log``), listening.

    ``bare``: without its imports (:data:`BARE_WARM`).
    """
    env, command = warm_environment(root, dict(os.environ), app=app)
    if bare:
        command = [sys.executable, "-c", BARE_WARM, *command[4:]]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)
    wait_listening(env, proc, timeout=30)
    return env, proc


def ask(
    env: dict[str, str], name: str, args: list[str], streams: list[int]
) -> tuple[socket.socket, int]:
    """Ask the warm process of ``env`` for program ``name`` with ``args``, as its shim would.

    ``streams``: the child's standard input, output and error. Returns the
    connection (the child ends when it closes) and the child's PID.
    """
    argv = [str(shim_dir(Path(env[SOCKET_ENV])) / name), *args]
    body = json.dumps({"name": name, "argv": argv, "env": env, "cwd": str(ROOT)}).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(env[SOCKET_ENV])
    socket.send_fds(conn, [len(body).to_bytes(_HEADER, "big") + body], streams)
    conn.settimeout(120)
    first = conn.makefile("rb").readline()
    return conn, int(json.loads(first)["pid"])
