"""Deployment helpers of the CLI: the status of a deployed run.

``flwr run --stream`` exits 0 whatever the ServerApp did; ``summary.json``
says what happened (see :mod:`strategies.deployment`). :func:`run_status`
turns it into one line and an exit code, for ``fedmerge status RUN_DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sims.runs import SUMMARY_FILE, read_json

#: Exit codes of ``fedmerge status`` by ``summary.json`` status.
STATUS_EXIT: dict[str, int] = {"completed": 0, "degraded": 3, "failed": 1}
#: Exit code when there is no readable summary (a run still going, or killed).
NO_SUMMARY_EXIT = 4


def status_line(summary: dict[str, Any]) -> str:
    """One line that says how a run ended, from its ``summary.json``."""
    status = summary.get("status")
    if status == "failed":
        return f"failed ({summary.get('stage')}): {summary.get('error')}"
    if status == "degraded":
        lost = summary.get("lost") or []
        first = f"; first: round {lost[0]['round']}, {lost[0]['reason']}" if lost else ""
        return (
            f"degraded: lost partitions {summary.get('lost_partitions', [])} "
            f"({len(lost)} skipped replies, {summary.get('failures', 0)} failures, "
            f"{summary.get('missing', 0)} missing, {summary.get('refused', 0)} refused){first}"
        )
    return (
        f"{status}: final accuracy {summary.get('final_accuracy')}, {summary.get('rounds')} rounds"
    )


def run_status(run_dir: str | Path) -> tuple[str, int]:
    """The status line of ``run_dir`` and the exit code of ``fedmerge status``."""
    summary = read_json(Path(run_dir) / SUMMARY_FILE)
    status = summary.get("status")
    if status not in STATUS_EXIT:
        return f"{run_dir}: no summary.json (the run is going on, or was killed)", NO_SUMMARY_EXIT
    return status_line(summary), STATUS_EXIT[str(status)]
