"""A finished run's ``flwr run`` is stopped once its log has caught up, not before.

``sims.runtime.log_caught_up`` follows a real process that writes a run's
log as ``flwr run --stream`` would: some lines, the ServerApp's last line
(``fedmerge.run_end.END_OF_RUN``) a moment later, then more if nobody stops
it. ``sims.log_stream.install`` shortens Flower's own intervals.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmerge.run_end import END_OF_RUN
from sims import runtime
from sims.runtime import stop_process

#: Prints LINES (one argument each, "SLEEP:seconds" pauses) to the log file, flushing each.
WRITER = """
import sys, time
with open(sys.argv[1], "a") as log:
    for item in sys.argv[2:]:
        if item.startswith("SLEEP:"):
            time.sleep(float(item[6:]))
        else:
            log.write(item + "\\n")
            log.flush()
"""


def _follow(
    tmp_path: Path, status: str, *items: str, earlier: str = "an earlier run's line"
) -> tuple[str, int | None]:
    """Run the writer on ``flower.log`` beside a summary of ``status``; what the log holds then.

    The log holds the line ``earlier`` before. Returns the log's text once
    :func:`sims.runtime.log_caught_up` returned, and the writer's exit code at
    that moment (``None``: still running).
    """
    (tmp_path / "summary.json").write_text(json.dumps({"status": status}))
    log = tmp_path / "flower.log"
    log.write_text(f"{earlier}\n")
    start = log.stat().st_size
    client = subprocess.Popen([sys.executable, "-c", WRITER, str(log), *items])
    try:
        runtime.log_caught_up(client, log, start)
        code = client.poll()
        return log.read_text(), code
    finally:
        stop_process(client, grace=0)


def test_a_completed_run_is_followed_until_its_last_line(tmp_path: Path) -> None:
    text, code = _follow(
        tmp_path,
        "completed",
        "round 2: accuracy 0.7",
        "SLEEP:0.4",
        f"{END_OF_RUN} {tmp_path / 'summary.json'}",
        "SLEEP:60",
        "the simulation process's shutdown",
    )
    # the line 0.4 s later was waited for; the writer, still running, was left to be stopped
    end = f"{END_OF_RUN} {tmp_path}/summary.json"
    assert text.splitlines()[1:] == ["round 2: accuracy 0.7", end]
    assert code is None


def test_the_marker_of_an_earlier_run_does_not_count(tmp_path: Path) -> None:
    earlier = f"{END_OF_RUN} an earlier run"
    text, code = _follow(
        tmp_path, "completed", "SLEEP:0.3", f"{END_OF_RUN} this run", "SLEEP:60", earlier=earlier
    )
    assert text.splitlines() == [earlier, f"{END_OF_RUN} this run"]
    assert code is None


def test_a_failed_run_is_followed_until_flwr_run_ends(tmp_path: Path) -> None:
    """Flower's traceback comes after the ServerApp's last line."""
    text, code = _follow(
        tmp_path,
        "failed",
        f"{END_OF_RUN} {tmp_path / 'summary.json'}",
        "SLEEP:0.3",
        "Traceback (most recent call last):",
        "ValueError: what the ServerApp raised",
    )
    assert text.splitlines()[-1] == "ValueError: what the ServerApp raised"
    assert code == 0


def test_a_log_that_never_ends_is_given_up_after_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "LOG_CATCH_UP", 0.5)
    text, code = _follow(tmp_path, "completed", "round 1: accuracy 0.5", "SLEEP:60", "never")
    assert text.splitlines()[1:] == ["round 1: accuracy 0.5"]
    assert code is None


def test_install_shortens_flowers_upload_and_stream_intervals() -> None:
    """In a fresh interpreter: Flower's own values before, the short ones after."""
    probe = (
        "from flwr.supercore import logger as up\n"
        "from flwr.superlink.servicer.control import control_handlers as down\n"
        "before = (up.LOG_UPLOAD_INTERVAL, down.LOG_STREAM_INTERVAL)\n"
        "from sims import log_stream\n"
        "log_stream.install()\n"
        "print(before, (up.LOG_UPLOAD_INTERVAL, down.LOG_STREAM_INTERVAL))\n"
    )
    argv = [sys.executable, "-c", probe]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=runtime.APP_DIR)
    assert out.stdout.strip() == "(0.2, 0.5) (0.05, 0.05)"
