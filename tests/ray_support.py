"""A local Ray head started as a runtime starts one (:mod:`sims.ray_head`), for tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from sims.processes import FLOWER_ENV, free_port
from sims.ray_head import HEAD_ENV, head_command, last_words

ROOT = Path(__file__).resolve().parent.parent


def start_ray_head(
    tmp: Path, num_cpus: int, timeout: float = 90.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a Ray head under ``tmp`` (GPUs left out); return it once its GCS port listens.

    Its raylet registers later: :func:`sims.engine_wake.wait_for_raylet`
    waits for that. Its output goes to ``tmp/ray.log``.
    """
    port = free_port()
    env = {**os.environ, **FLOWER_ENV, **HEAD_ENV, "RAY_TMPDIR": str(tmp)}
    said = tmp / "ray.log"
    with said.open("ab") as out:
        proc = subprocess.Popen(
            head_command(tmp / "bin", port, num_cpus, tmp, num_gpus=0),
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with code {proc.returncode}{last_words(said)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.05)
    stop_ray_head(proc, tmp, started_within=0.0)
    raise RuntimeError(f"the Ray head's GCS did not listen within {timeout:g} s{last_words(said)}")


def stop_ray_head(proc: subprocess.Popen[bytes], tmp: Path, started_within: float = 60.0) -> None:
    """Stop ``ray start`` and its daemons (its session) by its PID; remove ``tmp``.

    ``ray start`` handles SIGTERM only once it has started everything (it
    says "Ray runtime started."); stopped before, it waits half a minute for
    its GCS. So it first gets up to ``started_within`` seconds to say so.
    """
    deadline = time.monotonic() + started_within
    while (
        proc.poll() is None
        and time.monotonic() < deadline
        and b"Ray runtime started." not in (tmp / "ray.log").read_bytes()
    ):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)
