"""The warm process's socket has its name only once it listens.

``wait_listening`` and the shims look for the socket's name. A warm process
that bound the name first and listened a moment later refused whoever
connected in between: on a busy machine the requester can run before the warm
process's next system call, and a refused request (``prepare_drivers``, a
shim) runs without the warm process, or fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from sims.processes import stop_tree
from sims.warm import SOCKET_ENV, wait_listening, warm_environment
from tests.sims.warm_requests import ROOT

#: ``serve`` with nothing to import, and a warm process that the machine does not run for
#: a second between bind and listen.
SLOW_LISTEN = """
import socket, sys, time
from sims import warm
listen = socket.socket.listen
def slow(self, backlog):
    time.sleep(1.0)
    return listen(self, backlog)
socket.socket.listen = slow
warm.PRELOAD = ()
warm.serve(sys.argv[1])
"""


def test_the_socket_is_named_only_once_it_listens(tmp_path: Path) -> None:
    env, _ = warm_environment(tmp_path / "warm", dict(os.environ))
    sock = env[SOCKET_ENV]
    with (tmp_path / "warm.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_LISTEN, sock], cwd=ROOT, stdout=out, stderr=out
        )
    try:
        wait_listening(env, proc, timeout=30)
        assert proc.poll() is None, (tmp_path / "warm.log").read_text()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(sock)  # refused while the name exists but nothing listens
        assert sorted(p.name for p in Path(sock).parent.iterdir()) == ["bin", "warm.sock"]
    finally:
        stop_tree([proc.pid], 1.0)
        proc.wait()
