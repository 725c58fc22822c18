"""The run configuration: the kernel's own configs as sections, the strategy as name + Options.

One :class:`RunConfig` describes one run. Its sections are the kernel's
frozen dataclasses (:class:`~fedmerge.data.DatasetConfig`,
:class:`~fedmerge.data.PartitionConfig`, :class:`~fedmerge.models.ModelConfig`,
:class:`~fedmerge.training.TrainConfig`, :class:`~fedmerge.topology.TopologyConfig`,
:class:`~fedmerge.tasks.TaskConfig`) plus :class:`SimulationConfig` and
:class:`EvaluationConfig`; ``[strategy]``
is a name from the plugin registry and that plugin's own ``Options``. Validation happens once, here:
pydantic checks the types strictly (no ``"1"`` for ``1``, no ``true`` for
``1``, no ``inf`` or ``nan`` anywhere) and each dataclass checks its ranges in
``__post_init__``. Every error becomes one :class:`ConfigError` line naming
the dotted key, the value and what is allowed.

The same object travels to every ServerApp and ClientApp through Flower's
``context.run_config``: :func:`to_run_config` flattens it to dotted keys
(lists as JSON text, since Flower's run config holds scalars only) and
:func:`from_run_config` reads it back exactly.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic import field_validator as _field_validator
from pydantic_core import ErrorDetails

from fedmerge.data import DatasetConfig, PartitionConfig
from fedmerge.errors import ConfigError
from fedmerge.models import ModelConfig
from fedmerge.tasks import TaskConfig
from fedmerge.topology import TopologyConfig
from fedmerge.training import TrainConfig
from strategies.adversary import ADVERSARY_BEHAVIOURS
from strategies.plugins import Plugin, get_plugin, load_plugins, plugin_names

__all__ = [
    "EXECUTION_KEYS",
    "OUTPUT_KEY_PREFIX",
    "RUN_DIR_KEY",
    "ConfigError",
    "EvaluationConfig",
    "RunConfig",
    "SimulationConfig",
    "StrategyConfig",
    "declared_defaults",
    "flatten",
    "from_run_config",
    "run_config_from_dict",
    "set_dotted",
    "to_run_config",
]

#: Run-config keys that say where a run writes, not what it computes.
OUTPUT_KEY_PREFIX = "output."
#: The run directory (``fedmerge simulate`` sets it; empty: ``runs/NAME-TIMESTAMP``).
RUN_DIR_KEY = f"{OUTPUT_KEY_PREFIX}run-dir"

#: Keys of ``[simulation]`` that change where and how a run executes, not its numbers.
EXECUTION_KEYS: tuple[str, ...] = (
    "ray_address",
    "ray_num_cpus",
    "timeout",
    "assign_partitions",
    "max_nodes",
)

_STRICT = ConfigDict(
    frozen=True, extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True
)


@dataclass(frozen=True)
class SimulationConfig:
    """``[simulation]``: where and how the run executes.

    Attributes
    ----------
    num_cpus_per_client : int (default: 1)
        CPU cores reserved for each ClientApp (Ray resources; also torch's
        thread count in the client); >= 1.
    num_gpus_per_client : float (default: 0.0)
        GPUs reserved for each ClientApp (fractions share a GPU); >= 0.
    ray_address : str (default: "")
        Join this Ray cluster instead of starting one.
    ray_num_cpus : int (default: 0)
        CPUs of the Ray cluster started for the run (0: all cores).
    timeout : float (default: 600.0)
        Seconds to wait for nodes to register and for the replies of a round.
    inject_failures : str (default: "")
        Fault injection: ``"1@2,3@5"`` makes partition 1 fail in round 2 and
        partition 3 in round 5 (the ClientApp raises; the round goes on).
    assign_partitions : bool (default: True)
        The ServerApp names the partition in every message: clients are
        virtual, a simulation runs at most ``max_nodes`` SuperNodes whatever
        ``num_clients`` is, and no node is queried at start. ``False``: every
        node owns the partition of its node config (``partition-id``) and
        declares it when the run starts (deployment, where a node holds its
        own data).
    max_nodes : int (default: 64)
        The most SuperNodes a simulation starts when partitions are assigned;
        partition ``p`` always goes to node ``p mod nodes``. >= 1.
    adversary_fraction : float (default: 0.0)
        Share of the clients that are adversarial, drawn with the run seed
        (``round(fraction x num_clients)``, at least one for a fraction > 0;
        see :mod:`strategies.adversary`); in [0, 1].
    adversary_partitions : tuple of int (default: ())
        The adversarial partitions by id, instead of a fraction (not both).
    adversary_behaviour : str (default: "scale")
        What adversaries do to their training replies: ``"scale"``,
        ``"replace"``, ``"sign-flip"``, ``"label-flip"`` or
        ``"inflate-count"`` (see :class:`strategies.adversary.Adversary`).
    adversary_factor : float (default: 10.0)
        The factor of ``scale``, ``replace`` and ``inflate-count``; finite.
    """

    num_cpus_per_client: int = 1
    num_gpus_per_client: float = 0.0
    ray_address: str = ""
    ray_num_cpus: int = 0
    timeout: float = 600.0
    inject_failures: str = ""
    assign_partitions: bool = True
    max_nodes: int = 64
    adversary_fraction: float = 0.0
    adversary_partitions: tuple[int, ...] = ()
    adversary_behaviour: str = "scale"
    adversary_factor: float = 10.0

    def __post_init__(self) -> None:
        checks = (
            ("adversary_fraction", 0 <= self.adversary_fraction <= 1, "a number in [0, 1]"),
            (
                "adversary_partitions",
                all(p >= 0 for p in self.adversary_partitions),
                "a list of partition ids >= 0",
            ),
            (
                "adversary_behaviour",
                self.adversary_behaviour in ADVERSARY_BEHAVIOURS,
                ", ".join(ADVERSARY_BEHAVIOURS),
            ),
            ("adversary_factor", math.isfinite(self.adversary_factor), "a finite number"),
            ("max_nodes", self.max_nodes >= 1, "an integer >= 1"),
            ("num_cpus_per_client", self.num_cpus_per_client >= 1, ">= 1"),
            ("num_gpus_per_client", self.num_gpus_per_client >= 0, ">= 0"),
            ("ray_num_cpus", self.ray_num_cpus >= 0, ">= 0 (0: all cores)"),
            ("timeout", self.timeout > 0, "seconds > 0"),
        )
        for key, ok, allowed in checks:
            if not ok:
                value = _plain(getattr(self, key))
                raise ValueError(f"{key}: got {value!r}; allowed: {allowed}")
        if self.adversary_partitions and self.adversary_fraction > 0:
            raise ValueError(
                f"adversary_partitions: got {list(self.adversary_partitions)} with "
                f"adversary_fraction {self.adversary_fraction!r}; allowed: one of the two"
            )
        self.failures()

    @property
    def has_adversaries(self) -> bool:
        """Whether the run declares adversarial clients."""
        return bool(self.adversary_partitions) or self.adversary_fraction > 0

    def failures(self) -> frozenset[tuple[int, int]]:
        """``inject_failures`` as ``{(partition id, round)}``."""
        out = set()
        for item in filter(None, (x.strip() for x in self.inject_failures.split(","))):
            pid, sep, rnd = item.partition("@")
            if not (sep and pid.isascii() and pid.isdigit() and rnd.isascii() and rnd.isdigit()):
                raise ValueError(
                    f"inject_failures: got {self.inject_failures!r}; "
                    f"allowed: comma-separated PARTITION@ROUND, e.g. '1@2,3@5'"
                )
            out.add((int(pid), int(rnd)))
        return frozenset(out)


#: ``evaluation.server`` values.
SERVER_EVALUATIONS: tuple[str, ...] = ("test-set", "clients")


@dataclass(frozen=True)
class EvaluationConfig:
    """``[evaluation]``: how the server measures the global model of every round.

    Attributes
    ----------
    server : str (default: "test-set")
        ``"test-set"``: the server evaluates the global model on a held-out
        test set of its own: the test split of the scenario's data set, or the
        one in ``test_dir``. ``"clients"``: the server holds no data at all;
        a row's ``accuracy`` and ``loss`` are the sample-weighted means of
        the clients' own evaluation (``strategy.fraction_evaluate`` > 0 of
        them, each on its held-out set or, without one, its training data),
        round 0 included. Federated learning on private data, where nobody
        holds a shared test set.
    test_dir : str (default: "")
        With ``server = "test-set"``: a directory in a node's data layout
        (:mod:`strategies.node_data`) whose test split (or, without one, its
        training split) is the server's test set, instead of the scenario's
        data set.
    test_samples : int (default: 0)
        With ``server = "test-set"``: the server scores every model on this
        many samples of its test set, a draw seeded by ``seed`` alone (the
        same subset for every strategy of a seed, and every round); 0: the
        whole test set. Self-supervised tasks have ``task.test_samples``.
    """

    server: str = "test-set"
    test_dir: str = ""
    test_samples: int = 0

    def __post_init__(self) -> None:
        if self.server not in SERVER_EVALUATIONS:
            allowed = ", ".join(repr(v) for v in SERVER_EVALUATIONS)
            raise ValueError(f"server: got {self.server!r}; allowed: {allowed}")
        if self.test_dir and self.server != "test-set":
            raise ValueError(
                f"test_dir: got {self.test_dir!r} with server {self.server!r}; "
                "allowed: '' (the clients evaluate on their own data)"
            )
        if self.test_samples < 0:
            raise ValueError(
                f"test_samples: got {self.test_samples!r}; allowed: an integer >= 0 (0: all)"
            )
        if self.test_samples and self.server != "test-set":
            raise ValueError(
                f"test_samples: got {self.test_samples!r} with server {self.server!r}; "
                "allowed: 0 (the clients evaluate on their own data)"
            )

    @property
    def uses_dataset(self) -> bool:
        """Whether the server evaluates on the scenario's data set (the default)."""
        return self.server == "test-set" and not self.test_dir


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: a registered strategy and its plugin's options.

    Attributes
    ----------
    name : str
        A name of :func:`strategies.plugins.plugin_names`.
    options : object
        An instance of that plugin's ``Options`` dataclass.
    """

    name: str = "fedavg"
    options: Any = None

    def __post_init__(self) -> None:
        if self.options is None:
            object.__setattr__(self, "options", self.plugin.Options())
        if type(self.options) is not self.plugin.Options:
            raise TypeError(
                f"options: got {type(self.options).__name__}; "
                f"allowed: {self.plugin.Options.__qualname__} of strategy {self.name!r}"
            )

    @property
    def plugin(self) -> Plugin:
        """The registered plugin of :attr:`name`."""
        return get_plugin(self.name)

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **options}`` (tuples as lists)."""
        return {"name": self.name, **_plain(dataclasses.asdict(self.options))}


class RunConfig(BaseModel):
    """One run, fully resolved and validated.

    Build it with :func:`run_config_from_dict` (TOML tables, ``--set``) or
    :func:`from_run_config` (Flower's flat run config); both raise
    :class:`ConfigError` with one line per bad value.

    Attributes
    ----------
    name : str (default: "default")
        Label of the run (run directories, reports).
    seed : int (default: 0)
        Seeds everything: initial weights, partitions, sampling, training.
    rounds : int (default: 5)
        Communication rounds; >= 1.
    num_clients : int (default: 10)
        Clients (partitions; peers for decentralized strategies); >= 1.
    clients_per_round : int (default: 5)
        Clients sampled for training each round; 1 to ``num_clients``.
    device : str (default: "cpu")
        ``"cpu"`` or ``"cuda[:N]"``.
    plugins : tuple of str (default: ())
        Modules (``package.module``) or files (``path/to/file.py``) imported
        before the strategy is looked up; they register strategy plugins.
    """

    model_config = _STRICT

    name: str = "default"
    seed: int = Field(default=0, ge=0)
    rounds: int = Field(default=5, ge=1)
    num_clients: int = Field(default=10, ge=1)
    clients_per_round: int = Field(default=5, ge=1)
    device: str = "cpu"
    plugins: tuple[str, ...] = ()
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @_field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ValueError(f"got {value!r}; allowed: 'cpu', 'cuda' or 'cuda:N'")
        return value

    @_field_validator("strategy", mode="plain", json_schema_input_type=dict[str, Any])
    @classmethod
    def _strategy(cls, value: Any) -> StrategyConfig:
        if isinstance(value, StrategyConfig):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"got {value!r}; allowed: a table [strategy]")
        data = dict(value)
        name = data.pop("name", StrategyConfig.name)
        if not isinstance(name, str) or name not in plugin_names():
            raise ValueError(f"name: got {name!r}; allowed: {', '.join(plugin_names())}")
        plugin = get_plugin(name)
        for key in [k for k in data if k not in _option_names(name)]:
            if _is_default_elsewhere(key, data[key]):
                del data[key]
        try:
            options = _options_model(plugin.Options).model_validate_json(
                json.dumps({"options": data})
            )
        except ValidationError as exc:
            raise ValueError(_describe(exc.errors()[0], skip=1, owner=plugin)) from None
        return StrategyConfig(name, options.options)  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round: got {self.clients_per_round}; "
                f"allowed: 1 to num_clients ({self.num_clients})"
            )
        sim = self.simulation
        outside = [p for p in sim.adversary_partitions if p >= self.num_clients]
        if outside:
            raise ValueError(
                f"simulation.adversary_partitions: got {list(sim.adversary_partitions)}; "
                f"allowed: partition ids 0 to {self.num_clients - 1}"
            )
        if sim.has_adversaries and self.strategy.plugin.peer:
            raise ValueError(
                f"simulation.adversary_behaviour: got adversaries with peer strategy "
                f"{self.strategy.name!r}; allowed: adversaries with server-side strategies only"
            )
        self._task_checks()
        self._evaluation_checks()
        try:
            self.strategy.plugin.check(self.strategy.options, self)
        except ValueError as exc:  # the plugin names its own option, or a key of the run
            top = str(exc).split(":", 1)[0].split(".", 1)[0]
            if top in type(self).model_fields and top != "strategy":
                raise
            raise ValueError(f"strategy.{exc}") from None
        return self

    def _task_checks(self) -> None:
        """Self-supervised tasks: only server-side strategies that never read labels."""
        task = self.task
        if not task.self_supervised:
            return
        name, options = self.strategy.name, self.strategy.options
        if self.strategy.plugin.peer or name in _LABELLED_STRATEGIES:
            raise ValueError(
                f"task.name: got {task.name!r} with strategy {name!r}; allowed: "
                f"'supervised' with {name!r} (self-supervised tasks run with the server-side "
                f"strategies that need neither labels nor a classifier)"
            )
        if getattr(options, "fraction_evaluate", 0.0) > 0:
            raise ValueError(
                f"strategy.fraction_evaluate: got {options.fraction_evaluate!r} with task "
                f"{task.name!r}; allowed: 0 (the server evaluates the encoder)"
            )
        if self.simulation.has_adversaries and self.simulation.adversary_behaviour == "label-flip":
            raise ValueError(
                f"simulation.adversary_behaviour: got 'label-flip' with task {task.name!r}; "
                "allowed: a behaviour that does not act on labels"
            )

    def _evaluation_checks(self) -> None:
        """A server without the scenario's data set: only what needs no data at the server."""
        ev = self.evaluation
        if ev.test_samples and self.task.self_supervised:
            raise ValueError(
                f"evaluation.test_samples: got {ev.test_samples!r} with task "
                f"{self.task.name!r}; allowed: 0 (set task.test_samples)"
            )
        if ev.uses_dataset:
            return
        key, value = (
            ("evaluation.server", ev.server)
            if ev.server != "test-set"
            else ("evaluation.test_dir", ev.test_dir)
        )
        name, options = self.strategy.name, self.strategy.options
        needs = None
        if self.strategy.plugin.peer:
            needs = "peer strategies (the server evaluates every peer)"
        elif name == "oneshot":
            needs = "one-shot fusion (its measures score the fused model)"
        elif self.task.self_supervised:
            needs = f"task {self.task.name!r} (the server scores the encoder with labels)"
        proxy = [k for k in _PROXY_OPTIONS if getattr(options, k, 0)]
        if proxy:
            needs = f"strategy.{proxy[0]} > 0 (proxy data held by the server)"
        if needs is not None:
            allowed = "'test-set'" if ev.server != "test-set" else "'' (the scenario's data set)"
            raise ValueError(f"{key}: got {value!r} with {needs}; allowed: {allowed}")
        if ev.server == "clients" and getattr(options, "fraction_evaluate", 0.0) == 0:
            raise ValueError(
                "evaluation.server: got 'clients' with strategy.fraction_evaluate 0; "
                "allowed: with fraction_evaluate > 0 (the clients that evaluate each round)"
            )

    @property
    def nodes(self) -> int:
        """SuperNodes a simulation of this run starts (``num_clients`` without assignment)."""
        sim = self.simulation
        return min(self.num_clients, sim.max_nodes) if sim.assign_partitions else self.num_clients

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (tuples as lists), the inverse of :func:`run_config_from_dict`."""
        out: dict[str, Any] = {}
        for key in type(self).model_fields:
            value = getattr(self, key)
            if isinstance(value, StrategyConfig):
                out[key] = value.to_dict()
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                out[key] = _plain(dataclasses.asdict(value))
            else:
                out[key] = _plain(value)
        return out

    def digest(self) -> str:
        """Hash of everything that determines the results (16 hex digits).

        Where and how the run executes (:data:`EXECUTION_KEYS` of
        ``[simulation]``: the Ray cluster, the timeout, how partitions reach
        nodes) is left out: the same run on another cluster has the same
        digest (and resumes from the same checkpoint).
        Only values that differ from the defaults enter the hash, so adding a
        new option (with a default) keeps every existing digest.
        """
        ignored = {f"simulation.{k}" for k in EXECUTION_KEYS}
        defaults = {**_defaults(self.strategy.name), "strategy.name": StrategyConfig.name}
        data = {
            k: v
            for k, v in flatten(self.to_dict()).items()
            if k not in ignored and v != defaults.get(k)
        }
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@cache
def _options_model(options: type) -> type[BaseModel]:
    return create_model(f"{options.__name__}Table", __config__=_STRICT, options=(options, ...))


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (the JSON/TOML shape)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@cache
def _defaults(strategy: str) -> dict[str, Any]:
    """Flat defaults of a run with ``strategy``."""
    return flatten(RunConfig(strategy=StrategyConfig(strategy)).to_dict())


# -- errors -------------------------------------------------------------------
_OWN_KEY = re.compile(r"^([A-Za-z_][\w.-]*): (.*)$", re.DOTALL)


def _fields_at(path: tuple[str | int, ...], owner: Plugin | None) -> list[str]:
    """Keys allowed in the table at ``path`` (for "unknown key" errors)."""
    cls: Any = owner.Options if owner is not None else RunConfig
    for part in path:
        hints = (
            cls.model_fields
            if isinstance(cls, type) and issubclass(cls, BaseModel)
            else {f.name: f for f in dataclasses.fields(cls)}
        )
        info = hints.get(str(part))
        cls = getattr(info, "annotation", None) or getattr(info, "type", None)
        if isinstance(cls, str):  # postponed annotations: resolve by field name
            cls = {"strategy": StrategyConfig}.get(str(part)) or _SECTION_TYPES.get(str(part))
    if cls is StrategyConfig:
        return ["name", "..."]
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return sorted(cls.model_fields)
    if dataclasses.is_dataclass(cls):
        return sorted(f.name for f in dataclasses.fields(cls))
    return []


def _describe(err: ErrorDetails, *, skip: int = 0, owner: Plugin | None = None) -> str:
    """One ``key: got X; allowed: Y`` line for a pydantic error."""
    path = tuple(err["loc"])[skip:]
    key = ".".join(str(p) for p in path)
    if not key.isprintable():  # a quoted TOML key with a line break: keep the message one line
        key = ascii(key)
    kind, msg = err["type"], err["msg"]
    if kind == "value_error":
        text = msg.removeprefix("Value error, ")
        own = _OWN_KEY.match(text)
        if own and " " not in own.group(1):  # a nested check named its own key
            if not key or own.group(1).startswith(f"{key}."):
                return text
            return f"{key}.{own.group(1)}: {own.group(2)}"
        return f"{key}: {text}" if key else text
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        owners = [n for n in plugin_names() if str(path[-1]) in _option_names(n)]
        if owner is not None and owners:
            return (
                f"{key}: got {err.get('input')!r}; allowed: only with strategy "
                f"{' or '.join(repr(n) for n in owners)} (strategy is {owner.name!r})"
            )
        return f"{key}: unknown key; allowed: {', '.join(_fields_at(path[:-1], owner))}"
    allowed = msg.removeprefix("Input should be ").removeprefix("Value should be ")
    if allowed == "an object":  # a section given a value: TOML's word for a section
        allowed = f"a table [{key}]" if len(path) == 1 else "a table"
    return f"{key}: got {err.get('input')!r}; allowed: {allowed}"


def _is_default_elsewhere(option: str, value: Any) -> bool:
    """Whether ``value`` is the default of ``option`` in the strategies that have it.

    Such a value is ignored under another strategy, so that a sweep may fix
    an option that only some of its strategies have at its default.
    """
    owners = [n for n in plugin_names() if option in _option_names(n)]
    return bool(owners) and all(
        _plain(getattr(get_plugin(n).Options(), option)) == value for n in owners
    )


def _option_names(strategy: str) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(get_plugin(strategy).Options))


#: The integers a run config can carry: Flower's run config holds 64-bit signed integers.
INT64_RANGE = (-(2**63), 2**63 - 1)


def _check_values(data: Any, key: str = "") -> None:
    """Refuse, with its dotted key, a value that Flower's run config cannot hold.

    An integer beyond 64 bits passes every range check that has no upper
    bound (a seed, rounds, epochs), and would fail only once Flower and Ray
    have started, inside ``flwr run``. A TOML date or time (``1979-05-27``)
    is no value of any key.
    """
    if isinstance(data, Mapping):
        for name, value in data.items():
            _check_values(value, f"{key}.{name}" if key else str(name))
    elif isinstance(data, list):
        for value in data:
            _check_values(value, key)
    elif isinstance(data, datetime.date | datetime.time):
        raise ConfigError(
            f"{key}: got {data.isoformat()}, a TOML date or time; allowed: a number, a "
            f"string (quoted), a boolean, a list or a table, as the key takes"
        )
    elif isinstance(data, int) and not isinstance(data, bool):
        low, high = INT64_RANGE
        if not low <= data <= high:
            raise ConfigError(
                f"{key}: got {data}; allowed: an integer from -2**63 to 2**63 - 1 (what "
                f"Flower's run config holds)"
            )


def _validate(data: Mapping[str, Any]) -> RunConfig:
    _check_values(data)
    load_plugins(_plugin_list(data.get("plugins", ())))
    try:
        return RunConfig.model_validate_json(json.dumps(data, allow_nan=True))
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None


def _plugin_list(value: Any) -> list[str]:
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"plugins: got {value!r}; allowed: a list of module names or files")
    return list(value)


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from nested tables (a scenario file); unknown keys are errors.

    Relative paths of Python files (``model.factory = "my_models.py:net"``,
    ``plugins = ["my_plugin.py"]``) are made absolute here, relative to the
    current directory, since Flower's processes run elsewhere.

    Raises
    ------
    ConfigError
        One line: the dotted key, the value and what is allowed.
    """
    return _validate(_absolute_paths(data))


def _absolute_paths(data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(data)
    model = out.get("model")
    factory = model.get("factory") if isinstance(model, Mapping) else None
    if isinstance(factory, str) and ".py:" in factory:
        file, _, function = factory.rpartition(":")
        out["model"] = {**model, "factory": f"{Path(file).resolve()}:{function}"}  # type: ignore[dict-item]
    plugins = out.get("plugins")
    if isinstance(plugins, list):
        out["plugins"] = [
            str(Path(p).resolve()) if isinstance(p, str) and p.endswith(".py") else p
            for p in plugins
        ]
    return out


# -- dotted keys ----------------------------------------------------------------
def set_dotted(data: Mapping[str, Any], dotted: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of nested ``data`` with the values of ``dotted`` keys set."""
    out: dict[str, Any] = json.loads(json.dumps(data, allow_nan=True))
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents, 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                above = ".".join(parents[:depth])
                raise ConfigError(
                    f"{key}: got {value!r}; allowed: keys of tables only, "
                    f"and {above} is {node!r}, not a table"
                )
        node[leaf] = value
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys (lists kept)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- Flower's run config ------------------------------------------------------------
def to_run_config(config: RunConfig) -> dict[str, bool | int | float | str]:
    """``config`` as Flower's flat run config: dotted keys, lists as JSON text."""
    return {
        k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(config.to_dict()).items()
    }


def from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Read a :class:`RunConfig` back from Flower's ``context.run_config``.

    The run config holds every key that ``pyproject.toml`` declares, so the
    ``strategy.*`` keys of every built-in strategy arrive; those that are not
    options of the chosen strategy must keep their defaults (as in scenario
    files). Lists arrive as JSON text. ``output.*`` keys are left out.
    """
    flat = {k: v for k, v in run_config.items() if not k.startswith(OUTPUT_KEY_PREFIX)}
    load_plugins(_decode("plugins", flat.get("plugins", "[]")))
    lists = {k for k, v in flatten(RunConfig().to_dict()).items() if isinstance(v, list)}
    for name in plugin_names():
        lists |= {k for k, v in _defaults(name).items() if isinstance(v, list)}
    decoded = {k: _decode(k, v) if k in lists else v for k, v in flat.items()}
    return _validate(set_dotted({}, decoded))


def _decode(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ConfigError(f"{key}: got {value!r}; allowed: a list, e.g. '[200, 200]'") from None


@cache
def declared_defaults() -> dict[str, Any]:
    """Every key Flower's run config declares, with its default (``pyproject.toml``'s table).

    The embedded default scenario's values, plus the default options of every
    built-in strategy under ``strategy.*`` (lists as JSON text).
    """
    from strategies.plugins import builtin_plugin_names

    out: dict[str, Any] = {}
    for name in builtin_plugin_names():
        for key, value in flatten({"strategy": StrategyConfig(name).to_dict()}).items():
            if key != "strategy.name":
                out.setdefault(key, json.dumps(value) if isinstance(value, list) else value)
    return out


#: Server-side strategies that read labels or score a classifier: Fisher information on the
#: clients, one-shot fusion's measures (test loss and accuracy of the fused and client models).
_LABELLED_STRATEGIES: frozenset[str] = frozenset({"fisher", "oneshot"})

#: Strategy options that make the server draw proxy data from the scenario's data set.
_PROXY_OPTIONS: tuple[str, ...] = ("proxy_samples", "zip_samples")

#: Section name -> type, for messages about nested keys.
_SECTION_TYPES: dict[str, type] = {
    "task": TaskConfig,
    "dataset": DatasetConfig,
    "partition": PartitionConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "topology": TopologyConfig,
    "simulation": SimulationConfig,
    "evaluation": EvaluationConfig,
}
