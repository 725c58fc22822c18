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
:func:`read_sweep_manifest` reads a sweep folder's ``sweep.json``.

What ``fedmerge report`` reads is checked where it is read: a damaged file
is a :class:`ValueError` whose one line names the file (its line, its key),
what it holds and what is allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fedmerge.errors import one_line
from fedmerge.run_end import FINISHED_STATUSES

if TYPE_CHECKING:
    from strategies.config import RunConfig

#: Accuracy that "rounds to target" refers to when neither a sweep nor the
#: command line sets one.
DEFAULT_TARGET = 0.7

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TIMING_FILE = "timing.json"
SWEEP_FILE = "sweep.json"


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; an empty dict if it is missing, unreadable or no object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _shown(value: Any, limit: int = 60) -> str:
    """``value`` as JSON for a message, cut to ``limit`` characters (:func:`one_line`)."""
    return one_line(json.dumps(value), limit)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a JSON number (``bool`` is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_number_or_null(value: Any) -> bool:
    return value is None or is_number(value)


def _is_target(value: Any) -> bool:
    return value is None or (is_number(value) and 0 < value <= 1)


class Expect(NamedTuple):
    """What one key of a JSON object must hold.

    Attributes
    ----------
    test : callable
        True for an allowed value.
    allowed : str
        The allowed values, in words, for the message.
    required : bool (default: True)
        Whether the key must be there.
    """

    test: Callable[[Any], bool]
    allowed: str
    required: bool = True


#: Keys of ``config.json`` that a report reads (a run's seed; the sections it groups by).
CONFIG_KEYS: dict[str, Expect] = {
    "seed": Expect(_is_integer, "an integer"),
    **{
        section: Expect(_is_object, "a JSON object (a section of the scenario)", required=False)
        for section in ("strategy", "simulation", "task", "evaluation")
    },
}

#: Keys of every ``metrics.jsonl`` row that a report reads.
ROW_KEYS: dict[str, Expect] = {
    "round": Expect(lambda v: _is_integer(v) and v >= 0, "an integer >= 0"),
    "accuracy": Expect(_is_number_or_null, "a number, or null (not evaluated)"),
    "bytes_down": Expect(is_number, "a number"),
    "bytes_up": Expect(is_number, "a number"),
}

#: Keys of ``summary.json`` and ``timing.json`` that a run's wall time is read from.
TIME_KEYS: dict[str, Expect] = {
    key: Expect(_is_number_or_null, "a number of seconds, or null", required=False)
    for key in ("wall_time", "serverapp_time")
}

#: Keys of ``sweep.json`` that a report reads (``runs``' entries: :data:`SWEEP_RUN_KEYS`).
SWEEP_KEYS: dict[str, Expect] = {
    "runs": Expect(_is_list, "a list of JSON objects, one per run", required=False),
    "target_accuracy": Expect(_is_target, "a number in (0, 1], or null", required=False),
}
SWEEP_RUN_KEYS: dict[str, Expect] = {
    "run_dir": Expect(lambda v: isinstance(v, str), "the name of the run's folder"),
}


def check_keys(where: str, data: dict[str, Any], expected: Mapping[str, Expect]) -> None:
    """Check the keys ``expected`` of ``data``; other keys are left alone.

    Raises
    ------
    ValueError
        ``WHERE: KEY: got VALUE; allowed: ...`` for the first key that is
        missing (and required) or holds a value that is not allowed.
    """
    for key, expect in expected.items():
        if key not in data:
            if expect.required:
                raise ValueError(f"{where}: {key}: got no such key; allowed: {expect.allowed}")
        elif not expect.test(data[key]):
            raise ValueError(f"{where}: {key}: got {_shown(data[key])}; allowed: {expect.allowed}")


def read_object(path: Path, expected: Mapping[str, Expect] | None = None) -> dict[str, Any]:
    """The JSON object in ``path``, its keys ``expected`` checked (:func:`check_keys`).

    Unlike :func:`read_json`, for files that must be there and be whole.

    Raises
    ------
    ValueError
        If ``path`` is not UTF-8 JSON, holds something other than an object,
        or a key fails its check; the message names the file.
    OSError
        If ``path`` cannot be read.
    """
    text = path.read_bytes()
    try:
        data = json.loads(text)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ValueError(
            f"{path}: got {_shown(text.decode(errors='replace'))}, which is not JSON ({exc}); "
            f"allowed: a JSON object, as fedmerge writes it"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: got {_shown(data)}; allowed: a JSON object")
    check_keys(str(path), data, expected or {})
    return data


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


def read_rows(
    run_dir: str | Path, expected: Mapping[str, Expect] | None = None
) -> list[dict[str, Any]]:
    """Rows of ``run_dir/metrics.jsonl``, round 0 first, blank lines skipped.

    Parameters
    ----------
    run_dir : path
    expected : dict of str to Expect, optional
        Keys to check in every row (:func:`check_keys`), e.g. :data:`ROW_KEYS`.

    Raises
    ------
    ValueError
        If a line is not a JSON object, or a row fails the check of
        ``expected``; the message names the file and line.
    """
    path = Path(run_dir) / METRICS_FILE
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_bytes().decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = parse_row(line)
        except ValueError:  # not JSON, or JSON but no object
            raise ValueError(
                f"{where}: got {_shown(line.strip())}; allowed: a JSON object, one per round"
            ) from None
        check_keys(where, row, expected or {})
        rows.append(row)
    return rows


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
        If ``run_dir`` has no ``config.json``/``metrics.jsonl``, has not
        completed, or a file holds what a report cannot read (the message
        names the file and key).
    """
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, METRICS_FILE):
        if not (run_dir / name).is_file():
            raise ValueError(
                f"run_dir: {str(run_dir)!r} has no {name}; allowed: a run directory "
                f"written by fedmerge simulate or compare"
            )
    summary = read_json(run_dir / SUMMARY_FILE)  # a damaged one is an unfinished run
    if summary.get("status") not in FINISHED_STATUSES:
        raise ValueError(
            f"run_dir: {str(run_dir)!r} has not completed (no summary.json with status "
            f"completed); allowed: finished runs (resume it with the command that started "
            f"it: fedmerge simulate with the same --run-dir, or fedmerge compare)"
        )
    check_keys(str(run_dir / SUMMARY_FILE), summary, TIME_KEYS)
    rows = read_rows(run_dir, ROW_KEYS)
    if not rows:
        raise ValueError(
            f"{run_dir / METRICS_FILE}: got no rows; allowed: one JSON object per round, "
            f"round 0 (the initial model) first"
        )
    timing = read_json(run_dir / TIMING_FILE)
    check_keys(str(run_dir / TIMING_FILE), timing, TIME_KEYS)
    config = read_object(run_dir / CONFIG_FILE, CONFIG_KEYS)
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
        manifest = path / SWEEP_FILE
        order = read_sweep_manifest(manifest).run_dirs if manifest.is_file() else []
        rank = {name: i for i, name in enumerate(order)}
        dirs = [c.parent for c in children]
        out.extend(sorted(dirs, key=lambda d: (rank.get(d.name, len(rank)), d.name)))
    return out


@dataclass(frozen=True)
class SweepManifest:
    """What a report reads of a sweep folder's ``sweep.json`` (``fedmerge compare`` writes it).

    Attributes
    ----------
    path : Path
    run_dirs : list of str
        The runs' folder names, in the sweep's order.
    target_accuracy : float or None
        The sweep's accuracy for "rounds to target"; None if it sets none.
    """

    path: Path
    run_dirs: list[str]
    target_accuracy: float | None


def read_sweep_manifest(path: Path) -> SweepManifest:
    """Read and check the ``sweep.json`` at ``path``.

    Raises
    ------
    ValueError
        If it is not a JSON object, ``runs`` is not a list of objects with a
        ``run_dir`` name, or ``target_accuracy`` is not a number in (0, 1];
        the message names the file and key.
    OSError
        If it cannot be read.
    """
    data = read_object(path, SWEEP_KEYS)
    run_dirs: list[str] = []
    for i, entry in enumerate(data.get("runs", [])):
        where = f"{path}: runs[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(
                f"{where}: got {_shown(entry)}; allowed: a JSON object with the run's run_dir"
            )
        check_keys(where, entry, SWEEP_RUN_KEYS)
        run_dirs.append(entry["run_dir"])
    target = data.get("target_accuracy")
    return SweepManifest(path, run_dirs, None if target is None else float(target))
