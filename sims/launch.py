"""Run a scenario through Flower's simulation runtime (Ray backend).

The checks before a run (:func:`preflight`), the run config that ``flwr run``
gets, and :func:`simulate`, which carries a run out on a
:class:`sims.runtime.Runtime` of its own or on one that a
:func:`shared_runtimes` block shares.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from fedmerge.align import permutation_spec_for
from fedmerge.atomic import atomic_write_text
from fedmerge.data import DatasetBundle
from fedmerge.errors import one_line
from fedmerge.tasks import get_task
from fedmerge.topology import build_graph, mixing_matrix
from sims.checks import (
    check_run_dir,
    check_run_path,
    check_scenario,
    clear_run_dir,
    given_path,
    model_allocation_error,
    run_dir_lock,
)
from sims.errors import SimulationError
from sims.runs import finished_summary, run_state
from sims.runtime import APP_DIR, Runtime, head_cpus, new_runtime
from sims.scenario_files import load_scenario
from strategies.config import (
    RUN_DIR_KEY,
    ConfigError,
    RunConfig,
    declared_defaults,
    flatten,
    to_run_config,
)
from strategies.federation import Federation, federation
from strategies.node_data import data_spec, load_node_data


def scenario_data(fed: Federation) -> DatasetBundle:
    """``fed.data``; a loader's refusal, which names its own field (root), under ``dataset.``."""
    try:
        return fed.data
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"dataset.{exc}") from None


def _factory_error(config: RunConfig, what: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"model.factory: got {config.model.factory!r}, which {what} {type(exc).__name__}: "
        f"{one_line(exc, 160)}; allowed: a function that returns a torch.nn.Module for the "
        f"data set's inputs and classes (see 'Your own model' in the README)"
    )


def _check_factory_outputs(config: RunConfig, fed: Federation, model: torch.nn.Module) -> None:
    """A user's model must take a batch of the data's inputs and give one score per class.

    Otherwise the run would fail in its first round, after Flower and Ray
    started (a model of 3 outputs for 10 classes: "Target 6 is out of bounds").
    """
    batch = fed.example_input
    try:
        with torch.no_grad():
            out = model.eval()(batch)
    except Exception as exc:
        raise _factory_error(
            config, f"on a batch of shape {tuple(batch.shape)} raised", exc
        ) from None
    classes = fed.data.num_classes
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (len(batch), classes)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model.factory: got {config.model.factory!r}, whose model gives {got} for a "
            f"batch of shape {tuple(batch.shape)}; allowed: a model that gives "
            f"({len(batch)}, {classes}), one score per class of {config.dataset.name}"
        )
    if not any(True for _ in model.parameters()):
        raise ConfigError(
            f"model.factory: got {config.model.factory!r}, whose model has no parameters; "
            f"allowed: a model with something to train"
        )


def preflight(config: RunConfig) -> None:
    """Load data, partition it and build the model: fail before the SuperLink, Ray or a run starts.

    :func:`sims.checks.check_scenario` runs first (this machine's GPUs and
    CPUs, the Ray address, options that could never act).
    """
    check_scenario(config)
    fed = federation(config)
    data = scenario_data(fed)
    if config.evaluation.test_dir:  # the server's own test set, as the ServerApp loads it
        try:
            load_node_data(config.evaluation.test_dir, data_spec(config.dataset.name))
        except (ValueError, OSError) as exc:  # its message names the node's key, data-dir
            raise ConfigError(
                f"evaluation.test_dir: {str(exc).removeprefix('data-dir: ')}"
            ) from None
    empty = [i for i, p in enumerate(fed.partitions) if len(p) == 0]
    if empty:
        raise ConfigError(
            f"num_clients: {config.num_clients} leaves clients {empty[:5]} of the "
            f"{len(data.train_y)} samples without data; "
            f"allowed: fewer clients or another partition"
        )
    try:
        model = fed.initial_model()
    except ValueError as exc:  # a user's model factory that cannot build; the kernel names
        raise ConfigError(f"model.{exc}") from None  # its own field (factory, width, ...)
    except (MemoryError, RuntimeError) as exc:
        allocation = model_allocation_error(config, exc)
        if config.model.factory and allocation is exc:  # the user's code failed, not memory
            raise _factory_error(config, "raised", exc) from None
        raise allocation from None
    except Exception as exc:  # a user's factory failing is bad input; fedmerge's, a bug
        if not config.model.factory:
            raise
        raise _factory_error(config, "raised", exc) from None
    if config.model.factory and not config.task.self_supervised:
        _check_factory_outputs(config, fed, model)
    _check_other_networks(config, fed, model)
    plugin = config.strategy.plugin
    if plugin.aligns:  # a model that cannot be traced fails here, not in the ServerApp
        permutation_spec_for(model, fed.example_input)
    if plugin.peer:  # graph errors before any process starts
        try:
            graph = build_graph(config.topology, config.num_clients, seed=config.seed, round=1)
            mixing_matrix(graph, config.topology.mixing)  # checks an edge file's weights too
        except ValueError as exc:  # the kernel names the topology's own field
            raise ConfigError(f"topology.{exc}") from None


def _check_other_networks(config: RunConfig, fed: Federation, model: torch.nn.Module) -> None:
    """Build the networks beside the run's model that a client may build: fail here if they cannot.

    The widest of a strategy's ``client_widths``, and a task's networks of a
    client's own (BYOL's target and predictor). One that cannot be allocated
    is refused with its key (:func:`sims.checks.model_allocation_error`);
    before, it failed in the first client that built it.
    """
    widths = list(getattr(config.strategy.options, "client_widths", ()) or ())
    builds: list[tuple[str, str, Callable[[], object]]] = []
    widest = max(widths, default=0)
    if widest > config.model.width:
        builds.append(("strategy.client_widths", str(widths), lambda: fed.model_at_width(widest)))
    local = getattr(get_task(config.task.name), "local_networks", None)
    if local is not None:
        task = config.to_dict()["task"]
        got = ", ".join(f"{k}={v!r}" for k, v in task.items() if k.endswith(("_dim", "_hidden")))
        builds.append(("task", got, lambda: local(model, config.task, None, config.seed)))
    for key, got, build in builds:
        try:
            build()
        except (MemoryError, RuntimeError) as exc:
            raise model_allocation_error(config, exc, key, got) from None


def declared_run_config() -> dict[str, Any]:
    """The run config ``pyproject.toml`` declares: the default scenario plus every option.

    Flower accepts run-config overrides only for declared keys.
    """
    flat = to_run_config(load_scenario(None))
    own = {k: v for k, v in flat.items() if not k.startswith("strategy.") or k == "strategy.name"}
    return {**own, **dict(sorted(declared_defaults().items())), RUN_DIR_KEY: ""}


@cache
def app_config_keys() -> frozenset[str]:
    """The run-config keys the Flower App (``APP_DIR/pyproject.toml``) declares."""
    data = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    return frozenset(flatten(data["tool"]["flwr"]["app"].get("config", {})))


def run_config_toml(config: RunConfig, run_dir: Path | None) -> str:
    """``config`` as a flat TOML run config for ``flwr run --run-config``.

    ``run_dir`` becomes ``output.run-dir``; ``None`` leaves it out (the
    ServerApp then writes ``runs/NAME-TIMESTAMP``).

    Flower accepts only the keys that the app's ``pyproject.toml`` declares
    under ``[tool.flwr.app.config]``. An option of a strategy from a
    ``plugins`` module that is not declared there cannot travel: it must keep
    its default, which the apps then use.
    """
    declared = app_config_keys()
    defaults = to_run_config(RunConfig(strategy=type(config.strategy)(config.strategy.name)))
    flat: dict[str, Any] = {}
    for key, value in to_run_config(config).items():
        if key not in declared:
            if value != defaults.get(key):
                raise ConfigError(
                    f"{key}: got {value!r}; allowed: its default {defaults.get(key)!r}, since "
                    f"{APP_DIR / 'pyproject.toml'} does not declare it under "
                    f"[tool.flwr.app.config] (Flower's run config carries declared keys only)"
                )
            continue
        flat[key] = value
    if run_dir is not None:
        flat[RUN_DIR_KEY] = str(run_dir.resolve())
    return "\n".join(f"{_toml(k)} = {_toml(v)}" for k, v in flat.items()) + "\n"


def _toml(value: object) -> str:
    """A run config's key or value as TOML: JSON's literal, with what TOML escapes otherwise.

    Characters beyond U+FFFF stay as they are (JSON's ASCII escape would write them as
    two surrogates, which TOML refuses), and DEL, which JSON leaves, is escaped.
    """
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def federation_config(scenario: RunConfig) -> str:
    """``--federation-config`` for the simulation runtime."""
    sim = scenario.simulation
    items = [
        f"num-supernodes={scenario.nodes}",
        'backend="ray"',
        f"client-resources-num-cpus={sim.num_cpus_per_client}",
        f"client-resources-num-gpus={sim.num_gpus_per_client}",
    ]
    # Ray's size (simulation.ray_num_cpus) is set where the Runtime starts its head.
    return " ".join(items)


def runtime_key(scenario: RunConfig, slot: int = 0, slots: int = 1) -> tuple[str, int, int]:
    """The runtime a run of ``scenario`` goes on: Ray address, Ray CPUs (0: all cores), slot.

    Runs that go at the same time (``slots`` of them) on a Ray head that this
    machine starts each get a runtime of their own, whose head has a
    ``slots``-th of the CPUs: Flower sizes a run's pool of ClientApp actors
    from the whole cluster, so two runs on one head could each get part of
    their pool placed and wait for the rest until the round times out.
    """
    sim = scenario.simulation
    if slots > 1 and not sim.ray_address:
        return ("", max(1, head_cpus(sim.ray_num_cpus) // slots), slot)
    return (sim.ray_address, sim.ray_num_cpus, 0)


@dataclass
class _Shared:
    """The runtimes of a :func:`shared_runtimes` block, by Ray address, CPU count and slot."""

    log: Path
    runtimes: dict[tuple[str, int, int], Runtime] = field(default_factory=dict)
    #: The keys of the runtimes started for runs that go ``slots > 1`` at a time.
    slotted: set[tuple[str, int, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


_shared: _Shared | None = None


@contextmanager
def shared_runtimes(log: Path | None = None) -> Iterator[None]:
    """Within this block, runs share one :class:`Runtime` per Ray address and CPU count.

    The first run that needs a runtime starts it; the end of the block stops
    them all. A run that fails closes its runtime (the next run starts a fresh
    one), so that nothing it left behind holds Ray's resources. ``log``
    receives the runtimes' own output (default: a temporary file, deleted).
    Nested in another block, it shares that block's runtimes; at its end it
    stops only those that its runs started to go several at a time
    (``slots > 1``, as ``fedmerge compare --parallel`` does).
    """
    global _shared
    if _shared is not None:  # nested: the outer block owns the runtimes, ...
        outer = _shared
        before = set(outer.runtimes)
        finished = False
        try:
            yield
            finished = True
        finally:
            # ... but those started here for runs that went several at a time, each
            # with a share of the CPUs, end here: no run outside asks for that share.
            with outer.lock:
                ours = [k for k in outer.runtimes if k in outer.slotted and k not in before]
                slot_runtimes = [outer.runtimes.pop(k) for k in ours]
                outer.slotted.difference_update(ours)
            for runtime in slot_runtimes:
                runtime.close(grace=0.0 if finished else 1.0)
        return
    own_log = log is None
    if log is None:
        fd, name = tempfile.mkstemp(prefix="fm-runtime-", suffix=".log")
        os.close(fd)
        log = Path(name)
    _shared = _Shared(log)
    finished = False
    try:
        yield
        finished = True  # every run of the block has returned
    finally:
        runtimes, _shared = list(_shared.runtimes.values()), None
        for runtime in runtimes:
            runtime.close(grace=0.0 if finished else 1.0)
        if own_log:
            log.unlink(missing_ok=True)


def simulate(
    scenario: RunConfig,
    run_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    slot: int = 0,
    slots: int = 1,
) -> dict[str, Any]:
    """Run ``scenario`` through ``flwr run`` on a :class:`Runtime`.

    Outside :func:`shared_runtimes`, the run gets a runtime of its own (a
    SuperLink, and a Ray head unless ``simulation.ray_address`` names one),
    stopped with everything it started when the run ends. Inside, it shares
    the block's runtime for its Ray address and CPU count. Follows
    ``metrics.jsonl``, calling ``on_round`` for every new row. Flower's output
    goes to ``run_dir/flower.log``.

    Parameters
    ----------
    scenario : RunConfig
        What to run (:func:`sims.scenario_files.load_scenario`).
    run_dir : str or path-like
        The run directory: created if missing. A run of ``scenario`` there
        resumes after its last checkpoint; a finished one is not run again
        (its summary is returned, as ``fedmerge compare`` skips it).
    force : bool (default: False)
        Delete what fedmerge wrote into ``run_dir`` (its run, finished or not,
        of this scenario or another) and run from scratch, as ``fedmerge
        simulate --force`` does; other files there are kept.
    on_round : callable, optional
        Called with every row of ``metrics.jsonl`` as the run writes it.
    slot, slots : int (default: 0, 1)
        This run is slot ``slot`` of ``slots`` runs that go at the same time
        (``fedmerge compare --parallel``): see :func:`runtime_key`.

    Returns
    -------
    dict
        ``summary.json`` plus ``wall_time`` (seconds, this call end to end).

    Raises
    ------
    ConfigError
        Before anything starts or is written, as ``fedmerge simulate`` checks:
        if ``run_dir`` cannot be a directory, is in use by another writer
        (:func:`sims.checks.run_dir_lock`, held until the run ends), or holds
        another scenario's run or a checkpoint that cannot be resumed
        (:func:`sims.checks.check_run_dir`).
    SimulationError
        If the run did not write its summary (Flower can exit 0 on a crash).
    """
    t0 = time.perf_counter()
    if not isinstance(scenario, RunConfig):
        raise TypeError(
            f"scenario: got {type(scenario).__name__}; allowed: a RunConfig "
            f"(sims.scenario_files.load_scenario)"
        )
    path = given_path(run_dir, "run_dir").resolve()
    check_run_path(path)
    with run_dir_lock(path):
        # as plan_sweep decides: a finished run (its summary names this scenario) is
        # returned without reading its checkpoint; anything else is checked first
        if force:
            clear_run_dir(path)
        elif run_state(scenario, path) == "done":
            return finished_summary(path)
        check_run_dir(path, scenario)
        return _run_checked(scenario, path, t0, on_round, slot, slots)


def _run_checked(
    scenario: RunConfig,
    run_dir: Path,
    t0: float,
    on_round: Callable[[dict[str, Any]], None] | None,
    slot: int,
    slots: int,
) -> dict[str, Any]:
    """:func:`simulate` once the run directory is locked and checked; ``t0``: when it was called."""
    log_path = run_dir / "flower.log"
    log_path.write_bytes(b"")
    key = runtime_key(scenario, slot, slots)
    run_config, fed_config = run_config_toml(scenario, run_dir), federation_config(scenario)
    ended: str | None = ""  # how the run did not complete; None once run() says it did
    if _shared is None:
        runtime = new_runtime()
        runtime.start(key[0], key[1], log=log_path)
        try:
            ended = runtime.run(run_dir, run_config, fed_config, on_round)
        finally:
            # A finished run has nothing left to save (its summary is the last file it
            # writes): its processes are killed at once, without Ray's slow graceful
            # shutdown. An interrupted one gets time to stop cleanly.
            runtime.close(grace=0.0 if (run_dir / "summary.json").exists() else 10.0)
    else:
        shared = _shared
        with shared.lock:
            if key not in shared.runtimes:
                fresh = new_runtime()
                fresh.start(key[0], key[1], log=shared.log, shared=True)
                shared.runtimes[key] = fresh
                if slots > 1:
                    shared.slotted.add(key)
            runtime = shared.runtimes[key]
        try:
            ended = runtime.run(run_dir, run_config, fed_config, on_round)
        finally:
            if ended is not None:
                with shared.lock:
                    if shared.runtimes.get(key) is runtime:
                        del shared.runtimes[key]
                        runtime.failed_run = run_dir  # the first of its runs to fail
                runtime.close(grace=10.0)
    summary_path = run_dir / "summary.json"
    if ended is not None:
        first = runtime.failed_run
        if first is not None and first != run_dir:
            # Stopping the runtime for the run that failed first ended this one.
            raise SimulationError(
                f"run stopped: the run in {first} failed and stopped the runtime that both "
                f"ran on; see {first / 'flower.log'}"
            )
        # the runtime's own output (Ray's, the warm process's) joins the log as the
        # runtime closes: how `flwr run` ended is put last, where it is found
        lines = log_path.read_text(errors="replace").splitlines()
        tail = [line for line in lines if line != ended][-15:] + ([ended] if ended else [])
        head = f"run did not complete; see {log_path}"
        if _shared is not None:
            # A shared runtime's own output (the simulation process's: Flower's engine
            # failing to start its actors, say) went to the block's log, which may be a
            # temporary file: its last lines come with the error.
            try:
                ours = _shared.log.read_text(errors="replace").splitlines()[-10:]
            except OSError:  # nothing was written to it
                ours = []
            if ours:
                head += f" and the runtime's log {_shared.log}, which ends:\n" + "\n".join(ours)
                head += "\nand the run's log ends:"
        raise SimulationError(head + "\n" + "\n".join(tail))
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    if summary.get("status") == "failed":  # the ServerApp stopped and said why
        raise SimulationError(f"run failed ({summary.get('stage')}): {summary.get('error')}")
    summary["wall_time"] = time.perf_counter() - t0
    atomic_write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
