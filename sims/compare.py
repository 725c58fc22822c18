"""Paired sweeps: expand a sweep file into scenarios, run each once, cache by digest.

A sweep file names a base scenario, fixed overrides and the axes to vary::

    name = "smoke"                 # default: the file's stem
    base = "default"               # shipped scenario name, or a TOML path
                                   # relative to the sweep file
    target_accuracy = 0.7          # for "rounds to target" in the report
    tensorboard = false            # write TensorBoard event files per run

    [set]                          # fixed overrides of the base scenario
    rounds = 2
    partition.scheme = "dirichlet"

    [[variants]]                   # zipped overrides: one entry per variant
    strategy.name = "fedavg"
    [[variants]]
    strategy.name = "fedprox"
    strategy.prox_mu = 0.1

    [axes]                         # every combination of these lists
    seed = [0, 1]
    num_clients = [10, 20]
    partition = [{scheme = "iid"}, {scheme = "pathological", classes_per_client = 2}]

An axis whose values are tables zips the keys of each table (as
``[[variants]]`` does, which is one more axis). Every combination of the axes
is validated before anything runs and
becomes one :class:`~strategies.config.RunConfig`; it runs through
:func:`sims.launch.simulate`, the path of ``fedmerge simulate``, in
``RUNS_ROOT/SWEEP_NAME/DIGEST/``. A finished run there is skipped, an
interrupted one resumes from its checkpoint.

Pairing holds by construction: partitions, initial weights and the client
sampling order derive from ``seed`` alone, never from the strategy.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.atomic import atomic_write_text
from sims.checks import (
    check_run_dir,
    check_scenario,
    clear_run_dir,
    given_path,
    run_dir_lock,
)
from sims.launch import preflight, shared_runtimes, simulate
from sims.plots import write_tensorboard
from sims.runs import DEFAULT_TARGET, TIMING_FILE, finished_summary, run_state
from sims.runtime import head_cpus
from sims.scenario_files import (
    apply_overrides,
    check_overrides,
    read_toml,
    resolve_scenario_path,
)
from strategies.config import ConfigError, RunConfig, flatten, run_config_from_dict, set_dotted

logger = logging.getLogger(__name__)

#: Keys a sweep file may hold at its top level.
SWEEP_KEYS: tuple[str, ...] = (
    "axes",
    "base",
    "description",
    "name",
    "set",
    "target_accuracy",
    "tensorboard",
    "variants",
)
#: The most runs one sweep may expand to. Every run starts its own clients for
#: seconds at least; a sweep of more is a mistake (or a job for several sweeps), and
#: expanding it would fill the memory before the first run.
MAX_RUNS = 10_000

#: What :func:`sims.launch.preflight` depends on.
_DATA_KEYS = ("dataset", "partition", "model", "num_clients", "seed", "device", "evaluation")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Sweep:
    """A parsed, validated sweep file.

    Attributes
    ----------
    name : str
        Folder of the sweep's runs under the runs root.
    path : Path
        The sweep file.
    base : dict
        The base scenario as a nested dict (before any override).
    fixed : dict of str to object
        ``[set]`` (then ``--set``) overrides, dotted keys.
    axes : dict of str to tuple of dict
        What varies: per axis (``"variants"`` first, then the ``[axes]``
        keys in file order) its options, each a dict of dotted overrides.
    target_accuracy : float (default: 0.7)
        Accuracy that "rounds to target" in the report refers to, in (0, 1].
    tensorboard : bool (default: False)
        Write TensorBoard event files for every run.
    description : str (default: "")
        Free text.
    """

    name: str
    path: Path
    base: dict[str, Any]
    fixed: dict[str, Any]
    axes: dict[str, tuple[dict[str, Any], ...]]
    target_accuracy: float = DEFAULT_TARGET
    tensorboard: bool = False
    description: str = ""


@dataclass(frozen=True)
class PlannedRun:
    """One combination of a sweep.

    Attributes
    ----------
    scenario : RunConfig
        The resolved scenario.
    run_dir : Path
        ``RUNS_ROOT/SWEEP_NAME/DIGEST``.
    values : dict of str to object
        What this combination sets beyond ``[set]`` (variant and axes), dotted keys.
    state : str
        ``"done"`` (finished, will be skipped), ``"resume"`` (interrupted,
        resumes from its checkpoint) or ``"new"``; ``--force`` makes every
        run ``"new"``.
    """

    scenario: RunConfig
    run_dir: Path
    values: dict[str, Any] = field(default_factory=dict)
    state: str = "new"

    @property
    def label(self) -> str:
        """``key=value`` pairs of :attr:`values`, for progress lines."""
        return " ".join(f"{k}={_show(v)}" for k, v in self.values.items()) or "base"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _scenario(where: str, data: dict[str, Any]) -> RunConfig:
    try:
        return run_config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _base_path(spec: Any, sweep_path: Path, where: str) -> Path:
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{where}: base: got {spec!r}; allowed: a scenario name or TOML path")
    local = sweep_path.parent / spec
    if local.is_file():
        return local
    try:
        return resolve_scenario_path(spec)
    except ConfigError as exc:
        shipped = str(exc).rpartition("one of ")[2]
        raise ConfigError(
            f"{where}: base: got {spec!r}; allowed: a scenario TOML relative to the sweep "
            f"file or a shipped scenario ({shipped})"
        ) from None


def _axis(
    where: str, key: str, values: Any, prefix: str | None = None
) -> tuple[dict[str, Any], ...]:
    """An axis as a tuple of override dicts (dotted keys; tables under ``prefix``)."""
    prefix = key if prefix is None else prefix
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {key}: got {values!r}; allowed: a non-empty list of values")
    out: list[dict[str, Any]] = []
    for value in values:
        if isinstance(value, dict):  # zipped: {name = "fedprox", prox_mu = 0.1}
            if not value:
                raise ConfigError(f"{where}: {key}: got {{}}; allowed: a table of overrides")
            override = flatten(value, f"{prefix}." if prefix else "")
        else:
            override = {key: value}
        if override in out:
            raise ConfigError(
                f"{where}: {key}: {value!r} is listed twice; allowed: distinct values"
            )
        out.append(override)
    return tuple(out)


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in values.items()) or "base"


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file.

    Parameters
    ----------
    path : str or Path
        The sweep TOML.
    overrides : list of str, optional
        Extra fixed overrides, ``key=value`` as for ``fedmerge simulate --set``,
        applied after ``[set]``; they may not name a key that a variant or an
        axis varies.

    Returns
    -------
    Sweep
        Every key checked against the scenario's fields, every single value
        checked on the base scenario; :func:`expand` checks the combinations.

    Raises
    ------
    ConfigError
        With the file, the table, the key, the bad value and what is allowed.
    """
    check_overrides(overrides or [])
    path = given_path(path, "sweep")
    where = path.name
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"sweep: {str(path)!r} {what}; allowed: a sweep TOML file")
    raw = read_toml(path, "sweep")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: {unknown[0]}: unknown sweep key; allowed: {', '.join(SWEEP_KEYS)} "
            f"(scenario keys go in the tables set, axes or variants)"
        )
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{where}: name: got {name!r}; allowed: letters, digits, '.', '_', '-' (a folder name)"
        )
    target = raw.get("target_accuracy", DEFAULT_TARGET)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ConfigError(f"{where}: target_accuracy: got {target!r}; allowed: a number in (0, 1]")
    tensorboard = raw.get("tensorboard", False)
    if not isinstance(tensorboard, bool):
        raise ConfigError(f"{where}: tensorboard: got {tensorboard!r}; allowed: true or false")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description: got {description!r}; allowed: a string")

    base_file = _base_path(raw.get("base", "default"), path, where)
    base = read_toml(base_file, f"{where}: base")
    _scenario(f"{where}, base {base_file.name}", base)

    for table in ("set", "axes"):
        if not isinstance(raw.get(table, {}), dict):
            raise ConfigError(f"{where}: {table}: got {raw[table]!r}; allowed: a TOML table")
    in_file = flatten(raw.get("set", {}))
    _scenario(f"{where}, set", set_dotted(base, in_file))
    fixed = {**in_file, **flatten(apply_overrides({}, overrides or []))}
    fixed_data = set_dotted(base, fixed)
    _scenario("--set", fixed_data)  # the command line's own, once the file's [set] is fine

    axes: dict[str, tuple[dict[str, Any], ...]] = {}
    raw_variants = raw.get("variants", [])
    if raw_variants:
        if not isinstance(raw_variants, list) or not all(isinstance(v, dict) for v in raw_variants):
            raise ConfigError(
                f"{where}: variants: got {raw_variants!r}; allowed: an array of tables of overrides"
            )
        axes["variants"] = _axis(where, "variants", raw_variants, prefix="")
    for key, values in flatten(raw.get("axes", {})).items():
        axes[key] = _axis(f"{where}, axes", key, values)
    combinations = math.prod(len(options) for options in axes.values())
    if combinations > MAX_RUNS:
        sizes = " x ".join(f"{len(options)} {axis}" for axis, options in axes.items())
        raise ConfigError(
            f"{where}: got {combinations:,} combinations ({sizes}); allowed: at most "
            f"{MAX_RUNS:,} runs in one sweep (split it into several)"
        )

    owner: dict[str, str] = {}  # key -> the axis that varies it, as written in the file
    for axis, options in axes.items():
        axis_name = "variants" if axis == "variants" else f"axes.{axis}"
        tag = f"{where}, variants" if axis == "variants" else f"{where}, axes"
        for option in options:
            for key in option:
                if owner.setdefault(key, axis_name) != axis_name:
                    raise ConfigError(
                        f"{tag}: {key}: also varied by {owner[key]}; allowed: vary a key in "
                        f"one axis (zip related keys in one axis of tables)"
                    )
            _scenario(f"{tag} ({_label(option)})", set_dotted(fixed_data, option))
    for key in fixed:
        if key in owner:
            source = "set" if key in flatten(raw.get("set", {})) else "--set"
            raise ConfigError(
                f"{where}, {source}: {key}: also varied by {owner[key]}; "
                f"allowed: fix a key or vary it, not both"
            )
    return Sweep(
        name=name,
        path=path,
        base=base,
        fixed=fixed,
        axes=axes,
        target_accuracy=float(target),
        tensorboard=tensorboard,
        description=description,
    )


def expand(sweep: Sweep) -> list[tuple[dict[str, Any], RunConfig]]:
    """Every combination of a sweep, validated, seeds outermost.

    Returns
    -------
    list of (dict, RunConfig)
        The combination's own values (dotted keys, in axis order) and its
        resolved scenario, in run order: the ``seed`` axis varies slowest, so
        that all runs of the first seed (a complete paired set) come first.

    Raises
    ------
    ConfigError
        If a combination is invalid (e.g. ``clients_per_round`` above one of
        the ``num_clients`` values) or two combinations resolve to the same
        scenario.
    """
    fixed_data = set_dotted(sweep.base, sweep.fixed)
    names = sorted(sweep.axes, key=lambda k: k != "seed")  # stable: seed first
    out: list[tuple[dict[str, Any], RunConfig]] = []
    digests: dict[str, str] = {}
    for combo in itertools.product(*(sweep.axes[k] for k in names)):
        values: dict[str, Any] = {}
        for name in sweep.axes:  # file order, for labels
            values.update(combo[names.index(name)])
        label = _label(values)
        scenario = _scenario(
            f"{sweep.path.name}, combination ({label})", set_dotted(fixed_data, values)
        )
        digest = scenario.digest()
        if digest in digests:
            raise ConfigError(
                f"{sweep.path.name}: combinations ({digests[digest]}) and ({label}) are the "
                f"same scenario (digest {digest}); allowed: distinct combinations"
            )
        digests[digest] = label
        out.append((values, scenario))
    return out


def _count_rows(run_dir: Path) -> int:
    """The rows already in ``run_dir/metrics.jsonl`` (0 if there is none)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.strip())


def plan_sweep(sweep: Sweep, runs_root: str | Path, *, force: bool = False) -> list[PlannedRun]:
    """Expand ``sweep``, check that every run can start, and find what is cached.

    Loads each combination's data, partitions and model (as ``fedmerge
    simulate`` does before starting Flower), so that a combination that leaves
    a client without data fails here, before any run starts. Writes nothing.
    """
    if not isinstance(sweep, Sweep):
        raise TypeError(f"sweep: got {type(sweep).__name__}; allowed: a Sweep (load_sweep)")
    root = given_path(runs_root, "runs_root") / sweep.name
    runs = []
    checked: set[str] = set()
    for values, scenario in expand(sweep):
        d = scenario.to_dict()
        data_key = json.dumps([d[k] for k in _DATA_KEYS], sort_keys=True)
        if data_key not in checked:  # the strategy does not change data or model
            preflight(scenario)
            checked.add(data_key)
        else:  # what preflight checks beyond data and model
            check_scenario(scenario)
        run_dir = root / scenario.digest()
        state = "new" if force else run_state(scenario, run_dir)
        if state == "resume":  # a damaged checkpoint fails here, not after Flower started
            check_run_dir(run_dir, scenario)
        runs.append(PlannedRun(scenario, run_dir, values, state))
    return runs


def write_manifest(sweep: Sweep, runs: list[PlannedRun], runs_root: str | Path) -> Path:
    """Write ``RUNS_ROOT/SWEEP_NAME/sweep.json``: the sweep's runs and their values."""
    path = Path(runs_root) / sweep.name / "sweep.json"
    manifest = {
        "name": sweep.name,
        "file": str(sweep.path.resolve()),
        "description": sweep.description,
        "target_accuracy": sweep.target_accuracy,
        "runs": [
            {"digest": r.scenario.digest(), "run_dir": r.run_dir.name, "values": r.values}
            for r in runs
        ],
    }
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def runs_at_a_time(runs: list[PlannedRun], parallel: int, force: bool = False) -> int:
    """How many of ``runs`` go at a time for ``--parallel parallel``.

    Runs that go at the same time get a runtime each, with a share of the
    CPUs of the Ray head that the sweep starts (:func:`sims.launch.runtime_key`):
    at most as many as the head's CPUs (``simulation.ray_num_cpus``, 0 for all
    cores) over a client's (``simulation.num_cpus_per_client``), for every run
    still to go, and no more than there are runs to go (at least one). Runs on a
    cluster of the user's (``simulation.ray_address``) go one at a time: Flower
    sizes each run's actor pool to the whole cluster, so two runs there could
    each hold part of theirs and wait for the rest.
    """
    todo = [run for run in runs if force or run.state != "done"]
    fits = max(1, min(parallel, len(todo)))
    for run in todo:
        sim = run.scenario.simulation
        if sim.ray_address:
            return 1
        fits = min(fits, max(1, head_cpus(sim.ray_num_cpus) // sim.num_cpus_per_client))
    return fits


def run_sweep(
    runs: list[PlannedRun],
    *,
    force: bool = False,
    tensorboard: bool = False,
    on_start: Callable[[int, PlannedRun], None] | None = None,
    on_round: Callable[[PlannedRun, dict[str, Any]], None] | None = None,
    on_end: Callable[[int, PlannedRun, dict[str, Any]], None] | None = None,
    parallel: int = 1,
    runtime_log: Path | None = None,
) -> list[dict[str, Any]]:
    """Run every planned run that is not ``"done"``, on one Flower and Ray runtime.

    The runs share a SuperLink and a Ray cluster (see
    :func:`sims.launch.shared_runtimes`): Flower and Ray start once per sweep,
    not once per run. Up to ``parallel`` runs go at a time; each run's numbers
    do not depend on which runs share the cluster with it.

    Parameters
    ----------
    runs : list of PlannedRun
        From :func:`plan_sweep`.
    force : bool (default: False)
        Empty each run directory before running it (even finished ones).
        Each run holds ``RUN_DIR/.lock`` while it runs
        (:func:`sims.checks.run_dir_lock`).
    tensorboard : bool (default: False)
        Write ``RUN_DIR/tensorboard/`` for every run (also cached ones).
    on_start, on_round, on_end : callable, optional
        Called with ``(index, run)`` before a run starts (not for cached
        runs), with ``(run, metrics_row)`` for every row of its
        ``metrics.jsonl``, and with ``(index, run, summary)`` when a run is
        finished or found cached. With ``parallel > 1`` they are called from
        worker threads.
    parallel : int (default: 1)
        How many runs go at a time, at most (:func:`runs_at_a_time`). Each
        of them goes on a runtime of its own (a slot), with a share of the
        CPUs of the Ray head the sweep starts.
    runtime_log : Path, optional
        Where the SuperLink's and Ray's own output goes.

    Returns
    -------
    list of dict
        ``summary.json`` of every run, in order, plus ``wall_time``
        (seconds; that of the call that finished the run).

    Raises
    ------
    sims.launch.SimulationError
        If a run fails; the runs finished before it stay cached.
    """
    # Set by the first metrics row that a run writes in this sweep. A resumed
    # run's rows from before its interruption are replayed to ``on_round``
    # first: they say nothing about this sweep's install of the app.
    installed = threading.Event()

    def row_callback(run: PlannedRun) -> Callable[[dict[str, Any]], None]:
        old_rows = _count_rows(run.run_dir)
        seen = 0

        def row_seen(row: dict[str, Any]) -> None:
            nonlocal seen
            seen += 1
            if seen > old_rows:
                installed.set()
            if on_round is not None:
                on_round(run, row)

        return row_seen

    def one(i: int, run: PlannedRun) -> dict[str, Any]:
        if run.state == "done" and not force:
            summary = finished_summary(run.run_dir)
        else:
            if on_start is not None:
                on_start(i, run)
            t0 = time.perf_counter()
            with run_dir_lock(run.run_dir):
                if force:
                    clear_run_dir(run.run_dir, everything=True)
                slot = free_slots.get()
                try:
                    summary = simulate(
                        run.scenario,
                        run.run_dir,
                        on_round=row_callback(run),
                        slot=slot,
                        slots=parallel,
                    )
                finally:
                    free_slots.put(slot)
            timing = {
                "wall_time": summary.get("wall_time", time.perf_counter() - t0),
                "resumed": run.state == "resume",
            }
            atomic_write_text(run.run_dir / TIMING_FILE, json.dumps(timing, indent=2) + "\n")
        if tensorboard and not (run.run_dir / "tensorboard").is_dir():
            write_tensorboard(run.run_dir)
        if on_end is not None:
            on_end(i, run, summary)
        return summary

    parallel = runs_at_a_time(runs, parallel, force)
    free_slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(parallel):
        free_slots.put(slot)
    with shared_runtimes(runtime_log):
        if parallel <= 1:
            return [one(i, run) for i, run in enumerate(runs)]
        pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="run")
        futures: dict[int, Future[dict[str, Any]]] = {}
        try:
            # Flower installs the app into FLWR_HOME on a run's first start and
            # takes a half-copied install of a concurrent run for a finished one
            # (flwr.cli.install.install_from_fab checks only that the directory
            # exists). So the first run that starts goes alone until its first
            # metrics row (its install is complete by then) or its end.
            first = next((i for i, r in enumerate(runs) if force or r.state != "done"), None)
            if first is not None:
                futures[first] = pool.submit(one, first, runs[first])
                while not installed.wait(0.2) and not futures[first].done():
                    pass
                if futures[first].done() and futures[first].exception() is not None:
                    futures[first].result()  # failed before its first row: start nothing new
            for i, run in enumerate(runs):
                if i not in futures:
                    futures[i] = pool.submit(one, i, run)
            # The first run to fail is the one reported: a failed run stops the
            # runtime, which then ends the runs beside it too.
            for future in as_completed(futures.values()):
                future.result()
            summaries = [futures[i].result() for i in range(len(runs))]
        except BaseException:
            # A failed run or Ctrl-C: start nothing new. Leaving this block stops
            # the runtimes, which ends the runs still going (they resume later).
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return summaries
