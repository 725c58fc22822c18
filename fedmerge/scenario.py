"""Scenarios: typed, validated run configurations read from TOML."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedmerge.data import DATASET_NAMES, PARTITION_SCHEMES
from fedmerge.models import MODEL_NAMES
from fedmerge.topology import TopologyConfig

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "sims" / "scenarios"
STRATEGY_NAMES: tuple[str, ...] = (
    "fedavg",
    "fedprox",
    "ldawa",
    "aligned",
    "ot",
    "dimat",
    "dimat-wm",
    "gossip",
    "local",
)
#: Peer-side (decentralized) strategies: the server only relays models.
PEER_STRATEGIES: tuple[str, ...] = ("dimat", "dimat-wm", "gossip", "local")

#: Strategy options (keys of ``[strategy]``) and the strategies they apply to.
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "prox_mu": ("fedprox",),
    "ldawa_warmup_rounds": ("ldawa",),
    "ldawa_normalize": ("ldawa",),
    "ldawa_negative": ("ldawa",),
    "ldawa_bn": ("ldawa",),
    "ldawa_layer": ("ldawa",),
    "ldawa_sample_weighted": ("ldawa",),
    "align_method": ("aligned",),
    "proxy_samples": ("aligned", "ot"),
    "ot_solver": ("ot",),
    "ot_reg": ("ot",),
    "ot_cost": ("ot",),
    "ot_marginals": ("ot",),
    "merge_every": PEER_STRATEGIES[:3],
    "peer_init": PEER_STRATEGIES,
    "align_samples": ("dimat", "dimat-wm"),
    "align_similarity": ("dimat",),
    "reset_bn": ("aligned", "ot", "dimat", "dimat-wm", "gossip"),
}


class ConfigError(ValueError):
    """A scenario value that is not allowed; the message names key, value and range."""


@dataclass(frozen=True)
class DatasetSection:
    """``[dataset]``: which data set, and where its files are."""

    name: str = "fashion-mnist"
    root: str = ""
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    synthetic_users: int = 30
    mnist1d_samples: int = 5000


@dataclass(frozen=True)
class PartitionSection:
    """``[partition]``: how the training set is split (see PartitionConfig)."""

    scheme: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    shards_per_client: int = 2
    min_partition_size: int = 10


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: architecture and width."""

    name: str = "simple-cnn"
    width: int = 1
    hidden: tuple[int, ...] = (200, 200)
    #: Widths of the clients' models, cycled over partition ids (empty: all
    #: clients use ``width``); heterogeneous clients need strategy "ot".
    client_widths: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrainSection:
    """``[train]``: local SGD (see TrainConfig)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass(frozen=True)
class StrategySection:
    """``[strategy]``: server-side aggregation and client-side evaluation."""

    name: str = "fedavg"
    fraction_evaluate: float = 0.0
    prox_mu: float = 0.01
    ldawa_warmup_rounds: int = 0
    ldawa_normalize: str = "clients"
    ldawa_negative: str = "keep"
    ldawa_bn: str = "weighted"
    ldawa_layer: str = "tensor"
    ldawa_sample_weighted: bool = False
    align_method: str = "weight"
    proxy_samples: int = 0
    ot_solver: str = "emd"
    ot_reg: float = 0.1
    ot_cost: str = "weight"
    ot_marginals: str = "uniform"
    merge_every: int = 1
    peer_init: str = "independent"
    align_samples: int = 512
    align_similarity: str = "correlation"
    reset_bn: bool = True


@dataclass(frozen=True)
class SimulationSection:
    """``[simulation]``: Ray resources and cluster."""

    num_cpus_per_client: int = 1
    num_gpus_per_client: float = 0.0
    ray_address: str = ""
    ray_num_cpus: int = 0
    timeout: float = 600.0
    inject_failures: str = ""

    def failures(self) -> set[tuple[int, int]]:
        """Parse ``inject_failures`` into ``{(partition id, round)}``.

        ``"1@2,3@5"`` makes client 1 fail in round 2 and client 3 in round 5:
        the ClientApp raises, Flower returns an error reply (fault injection
        for tests and robustness studies).
        """
        out = set()
        for item in filter(None, (x.strip() for x in self.inject_failures.split(","))):
            pid, sep, rnd = item.partition("@")
            if not (sep and pid.isdigit() and rnd.isdigit()):
                raise ConfigError(
                    f"simulation.inject_failures: got {self.inject_failures!r}; "
                    f"allowed: comma-separated PARTITION@ROUND, e.g. '1@2,3@5'"
                )
            out.add((int(pid), int(rnd)))
        return out


@dataclass(frozen=True)
class Scenario:
    """One simulated run, fully resolved.

    Every field is validated on construction; :func:`load_scenario` builds it
    from TOML plus ``--set`` overrides.
    """

    name: str = "default"
    seed: int = 0
    rounds: int = 5
    num_clients: int = 10
    clients_per_round: int = 5
    device: str = "cpu"
    dataset: DatasetSection = field(default_factory=DatasetSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    simulation: SimulationSection = field(default_factory=SimulationSection)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (tuples as lists), the inverse of :func:`scenario_from_dict`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """Hash of everything that determines the results (16 hex digits).

        Where the run executes (``simulation.ray_address``,
        ``simulation.ray_num_cpus``) and how long it may wait
        (``simulation.timeout``) are left out: the same run on another
        cluster has the same digest (and resumes from the same checkpoint).
        Only values that differ from the defaults enter the hash, so adding a
        new option (with a default) to fedmerge keeps every existing digest.
        """
        ignored = {"simulation.ray_address", "simulation.ray_num_cpus", "simulation.timeout"}
        defaults = flatten(Scenario().to_dict())
        data = {
            k: v
            for k, v in flatten(self.to_dict()).items()
            if k not in ignored and v != defaults.get(k)
        }
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def topology_config(s: Scenario) -> TopologyConfig:
    """The scenario's ``[topology]`` table (validated when the scenario was built)."""
    return s.topology


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; allowed: {allowed}")


def _validate(s: Scenario) -> None:
    _check(s.rounds >= 1, "rounds", s.rounds, "an integer >= 1")
    _check(s.num_clients >= 1, "num_clients", s.num_clients, "an integer >= 1")
    _check(
        1 <= s.clients_per_round <= s.num_clients,
        "clients_per_round",
        s.clients_per_round,
        f"1 to num_clients ({s.num_clients})",
    )
    _check(
        s.device == "cpu" or s.device.startswith("cuda"), "device", s.device, "'cpu' or 'cuda[:N]'"
    )
    _check(
        s.dataset.name in DATASET_NAMES, "dataset.name", s.dataset.name, ", ".join(DATASET_NAMES)
    )
    root = s.dataset.root
    _check(not root or Path(root).is_dir(), "dataset.root", root, "an existing directory")
    _check(
        s.dataset.synthetic_users >= 1, "dataset.synthetic_users", s.dataset.synthetic_users, ">= 1"
    )
    _check(
        s.dataset.mnist1d_samples >= 10,
        "dataset.mnist1d_samples",
        s.dataset.mnist1d_samples,
        ">= 10",
    )
    p = s.partition
    _check(
        p.scheme in PARTITION_SCHEMES, "partition.scheme", p.scheme, ", ".join(PARTITION_SCHEMES)
    )
    _check(p.alpha > 0, "partition.alpha", p.alpha, "a number > 0")
    _check(p.classes_per_client >= 1, "partition.classes_per_client", p.classes_per_client, ">= 1")
    _check(p.shards_per_client >= 1, "partition.shards_per_client", p.shards_per_client, ">= 1")
    _check(p.min_partition_size >= 0, "partition.min_partition_size", p.min_partition_size, ">= 0")
    _check(s.model.name in MODEL_NAMES, "model.name", s.model.name, ", ".join(MODEL_NAMES))
    _check(s.model.width >= 1, "model.width", s.model.width, "an integer >= 1")
    _check(
        all(w >= 1 for w in s.model.client_widths),
        "model.client_widths",
        list(s.model.client_widths),
        "a list of integers >= 1",
    )
    _check(
        not s.model.client_widths or s.strategy.name == "ot",
        "model.client_widths",
        list(s.model.client_widths),
        f"only with strategy 'ot', which fuses other widths (strategy is {s.strategy.name!r})",
    )
    _check(
        len(s.model.hidden) >= 1 and all(h >= 1 for h in s.model.hidden),
        "model.hidden",
        list(s.model.hidden),
        "a non-empty list of integers >= 1",
    )
    t = s.train
    _check(t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    _check(t.lr > 0, "train.lr", t.lr, "a number > 0")
    _check(0 <= t.momentum < 1, "train.momentum", t.momentum, "a number in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
    st = s.strategy
    _check(st.name in STRATEGY_NAMES, "strategy.name", st.name, ", ".join(STRATEGY_NAMES))
    _check(st.prox_mu >= 0, "strategy.prox_mu", st.prox_mu, "a number >= 0")
    defaults = StrategySection()
    for key, owners in STRATEGY_OPTIONS.items():
        value = getattr(st, key)
        _check(
            st.name in owners or value == getattr(defaults, key),
            f"strategy.{key}",
            value,
            f"only with strategy {' or '.join(repr(o) for o in owners)} (strategy is {st.name!r})",
        )
    _check(
        st.ldawa_warmup_rounds >= 0, "strategy.ldawa_warmup_rounds", st.ldawa_warmup_rounds, ">= 0"
    )
    _check(st.merge_every >= 1, "strategy.merge_every", st.merge_every, "an integer >= 1")
    _check(st.align_samples >= 1, "strategy.align_samples", st.align_samples, "an integer >= 1")
    _check(st.proxy_samples >= 0, "strategy.proxy_samples", st.proxy_samples, "an integer >= 0")
    _check(st.ot_reg > 0, "strategy.ot_reg", st.ot_reg, "a number > 0")
    needs_proxy = (st.name == "aligned" and st.align_method == "activation") or (
        st.name == "ot" and "activation" in (st.ot_cost, st.ot_marginals)
    )
    _check(
        st.proxy_samples > 0 or not needs_proxy,
        "strategy.proxy_samples",
        st.proxy_samples,
        "> 0 for activation-based alignment (the server's proxy data)",
    )
    for key, allowed in (
        ("align_method", ("weight", "activation")),
        ("ot_solver", ("emd", "sinkhorn")),
        ("ot_cost", ("weight", "activation")),
        ("ot_marginals", ("uniform", "activation")),
        ("peer_init", ("independent", "shared")),
        ("align_similarity", ("correlation", "cross-moment")),
        ("ldawa_normalize", ("clients", "weights")),
        ("ldawa_negative", ("keep", "clip", "abs")),
        ("ldawa_bn", ("weighted", "average")),
        ("ldawa_layer", ("tensor", "module")),
    ):
        _check(getattr(st, key) in allowed, f"strategy.{key}", getattr(st, key), ", ".join(allowed))
    _check(
        0 <= st.fraction_evaluate <= 1,
        "strategy.fraction_evaluate",
        st.fraction_evaluate,
        "a number in [0, 1]",
    )
    s.simulation.failures()
    sim = s.simulation
    _check(
        sim.num_cpus_per_client >= 1,
        "simulation.num_cpus_per_client",
        sim.num_cpus_per_client,
        ">= 1",
    )
    _check(
        sim.num_gpus_per_client >= 0,
        "simulation.num_gpus_per_client",
        sim.num_gpus_per_client,
        ">= 0",
    )
    _check(
        sim.ray_num_cpus >= 0, "simulation.ray_num_cpus", sim.ray_num_cpus, ">= 0 (0: all cores)"
    )
    _check(sim.timeout > 0, "simulation.timeout", sim.timeout, "seconds > 0")


_SECTION_TYPES = {
    "dataset": DatasetSection,
    "partition": PartitionSection,
    "model": ModelSection,
    "train": TrainSection,
    "strategy": StrategySection,
    "topology": TopologyConfig,
    "simulation": SimulationSection,
}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of ``default`` or raise ConfigError."""
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is tuple:
        ok = True
        if isinstance(value, str):  # "200,200" from flat run configs
            try:
                value = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                ok = False
        ok = ok and isinstance(value, list) and all(isinstance(v, int) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; allowed: a value of type {kind.__name__}")
    return value


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    """Build a Scenario from a nested dict; unknown keys are rejected."""
    top_defaults = {f.name: f.default for f in fields(Scenario) if f.name not in _SECTION_TYPES}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTION_TYPES:
            section = _SECTION_TYPES[key]
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: got {value!r}; allowed: a table [{key}]")
            defaults = {f.name: f.default for f in fields(section)}
            sub = {}
            for k, v in value.items():
                if k not in defaults:
                    raise ConfigError(
                        f"{key}.{k}: unknown key; allowed: {', '.join(sorted(defaults))}"
                    )
                sub[k] = _coerce(f"{key}.{k}", v, defaults[k])
            kwargs[key] = section(**sub)
        elif key in top_defaults:
            kwargs[key] = _coerce(key, value, top_defaults[key])
        else:
            allowed = sorted([*top_defaults, *_SECTION_TYPES])
            raise ConfigError(f"{key}: unknown key; allowed: {', '.join(allowed)}")
    return Scenario(**kwargs)


def _parse_value(text: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as TOML, else keep the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(data: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """A copy of nested ``data`` with the values of ``dotted`` keys set."""
    out = json.loads(json.dumps(data))
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a table")
        node[leaf] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, TOML values) to a nested dict."""
    dotted: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: got {item!r}; allowed: key=value, e.g. train.lr=0.05")
        dotted[key.strip()] = _parse_value(text.strip())
    return set_dotted(data, dotted)


def resolve_scenario_path(spec: str | None) -> Path:
    """Map ``None`` or a shipped scenario's name to its file; keep explicit paths."""
    if spec is None:
        return SCENARIO_DIR / "default.toml"
    path = Path(spec)
    if path.suffix != ".toml" and (SCENARIO_DIR / f"{spec}.toml").exists():
        return SCENARIO_DIR / f"{spec}.toml"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
        raise ConfigError(
            f"scenario: {spec!r} does not exist; allowed: a TOML file or one of {shipped}"
        )
    return path


def load_scenario(spec: str | None = None, overrides: list[str] | None = None) -> Scenario:
    """Read a scenario TOML, apply ``--set`` overrides, validate."""
    path = resolve_scenario_path(spec)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario: {str(path)!r} is not valid TOML ({exc})") from exc
    return scenario_from_dict(apply_overrides(data, overrides or []))


def flatten(data: dict[str, Any], prefix: str = "", *, join_lists: bool = True) -> dict[str, Any]:
    """Flatten a nested dict to dotted keys.

    Lists become comma-joined strings (Flower's run config holds no lists)
    unless ``join_lists`` is false.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}.", join_lists=join_lists))
        elif join_lists and isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten` for dotted keys."""
    return set_dotted({}, flat)
