"""The one reader of run directories.

A run directory (written by ``fedmerge simulate`` or ``fedmerge compare``)
holds ``config.json`` (the resolved scenario), ``metrics.jsonl`` (one JSON
row per round, round 0 the initial model), ``summary.json`` (written when
the run completes) and, for runs of a sweep, ``timing.json`` (the wall time
of the ``simulate`` call that finished it). :func:`load_run` reads them into
a :class:`RunRecord`; :func:`parse_row` is the only parser of
``metrics.jsonl`` lines in ``sims/``. :func:`run_state` says whether a
scenario's run in a directory is finished, to resume or new, and
:func:`finished_summary` reads a finished one's summary (``fedmerge
compare`` skips such a run, ``simulate`` returns it as it is).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strategies.config import RunConfig

#: Accuracy that "rounds to target" refers to when neither a sweep nor the
#: command line sets one.
DEFAULT_TARGET = 0.7

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TIMING_FILE = "timing.json"
#: ``summary.json`` statuses of a finished run ("degraded": it lost or refused clients).
FINISHED_STATUSES: tuple[str, ...] = ("completed", "degraded")
SWEEP_FILE = "sweep.json"


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; an empty dict if it is missing, unreadable or no object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_state(scenario: RunConfig, run_dir: Path) -> str:
    """``"done"``, ``"resume"`` or ``"new"`` for ``scenario`` in ``run_dir``.

    ``done`` needs ``summary.json`` with status ``completed`` (or ``degraded``) and the
    scenario's digest, plus ``metrics.jsonl`` and ``model.safetensors``;
    ``resume`` needs ``checkpoint.json`` of the same digest.
    """
    digest = scenario.digest()
    summary = read_json(run_dir / SUMMARY_FILE)
    if (
        summary.get("status") in FINISHED_STATUSES
        and summary.get("digest") == digest
        and (run_dir / METRICS_FILE).is_file()
        and (run_dir / "model.safetensors").is_file()
    ):
        return "done"
    if read_json(run_dir / "checkpoint.json").get("digest") == digest:
        return "resume"
    return "new"


def finished_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``summary.json``, with ``wall_time`` from ``timing.json`` if it has none."""
    summary = read_json(run_dir / SUMMARY_FILE)
    summary.setdefault("wall_time", read_json(run_dir / TIMING_FILE).get("wall_time"))
    return summary


def parse_row(line: str) -> dict[str, Any]:
    """One ``metrics.jsonl`` line as a dict.

    Raises
    ------
    ValueError
        If ``line`` is not a JSON object.
    """
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError(f"metrics row: got {line.strip()!r}; allowed: a JSON object")
    return row


def parse_rows(text: str) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` text, blank lines skipped."""
    return [parse_row(line) for line in text.splitlines() if line.strip()]


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``run_dir/metrics.jsonl``, round 0 first."""
    return parse_rows((Path(run_dir) / METRICS_FILE).read_text())


@dataclass(frozen=True)
class RunRecord:
    """One finished run directory, read.

    Attributes
    ----------
    run_dir : Path
    config : dict
        ``config.json``: the resolved scenario, nested.
    rows : list of dict
        ``metrics.jsonl``, round 0 (the initial model) first.
    summary : dict
        ``summary.json``.
    timing : dict
        ``timing.json``; empty for a run outside a sweep.
    """

    run_dir: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    timing: dict[str, Any]

    @property
    def seed(self) -> int:
        """The scenario's seed."""
        return int(self.config["seed"])

    @property
    def wall_time(self) -> float:
        """Seconds of the run; NaN if unknown.

        That of the ``simulate`` call that finished it (``timing.json``, else
        ``summary.json``'s ``wall_time``), else the ServerApp's own time
        (``summary.json``'s ``serverapp_time``).
        """
        summary = self.summary
        wall = self.timing.get("wall_time", summary.get("wall_time", summary.get("serverapp_time")))
        return math.nan if wall is None else float(wall)


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a finished run directory.

    Raises
    ------
    ValueError
        If ``run_dir`` has no ``config.json``/``metrics.jsonl`` or has not completed.
    """
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, METRICS_FILE):
        if not (run_dir / name).is_file():
            raise ValueError(
                f"run_dir: {str(run_dir)!r} has no {name}; allowed: a run directory "
                f"written by fedmerge simulate or compare"
            )
    summary = read_json(run_dir / SUMMARY_FILE)
    if summary.get("status") not in FINISHED_STATUSES:
        raise ValueError(
            f"run_dir: {str(run_dir)!r} has not completed (no summary.json with status "
            f"completed); allowed: finished runs (resume it with the command that started "
            f"it: fedmerge simulate with the same --run-dir, or fedmerge compare)"
        )
    rows = read_rows(run_dir)
    timing = read_json(run_dir / TIMING_FILE)
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    return RunRecord(run_dir, config, rows, summary, timing)


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories of ``paths``; a sweep folder stands for the runs in it.

    A path without ``config.json`` whose subfolders hold run directories (as
    ``RUNS_ROOT/SWEEP_NAME/`` does) is replaced by those, in the order of its
    ``sweep.json`` when present, else by name. Other paths are kept as given.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            what = "does not exist" if not path.exists() else "is not a directory"
            raise ValueError(
                f"run_dir: {str(path)!r} {what}; allowed: a run directory, or a sweep folder "
                f"(RUNS_ROOT/SWEEP_NAME) for all its runs"
            )
        children = [] if (path / CONFIG_FILE).exists() else sorted(path.glob(f"*/{CONFIG_FILE}"))
        if not children and (path / SWEEP_FILE).is_file():
            raise ValueError(
                f"run_dir: {str(path)!r} is a sweep folder that holds no run yet; allowed: a "
                f"sweep folder with runs (fedmerge compare writes them), or a run directory"
            )
        if not children:
            out.append(path)
            continue
        order = [r["run_dir"] for r in read_json(path / SWEEP_FILE).get("runs", [])]
        rank = {name: i for i, name in enumerate(order)}
        dirs = [c.parent for c in children]
        out.extend(sorted(dirs, key=lambda d: (rank.get(d.name, len(rank)), d.name)))
    return out
