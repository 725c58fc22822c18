"""Tests of sims.scenario_files and strategies.config: loading, overrides, validation."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sims.scenario_files import (
    SCENARIO_DIR,
    apply_overrides,
    load_scenario,
    read_toml,
    resolve_scenario_path,
)
from strategies.config import (
    ConfigError,
    RunConfig,
    flatten,
    run_config_from_dict,
    set_dotted,
    to_run_config,
)
from strategies.plugins.fedavg import ServerOptions

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOML = REPO / "sims" / "scenarios" / "default.toml"


def naive_flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested tables; written independently of strategies.config."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub_key, sub_value in naive_flatten(value).items():
                out[f"{prefix}{key}.{sub_key}"] = sub_value
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- loading


def test_load_default_scenario_matches_its_toml() -> None:
    s = load_scenario()
    assert isinstance(s, RunConfig)
    raw = tomllib.loads(DEFAULT_TOML.read_text())
    resolved = naive_flatten(s.to_dict())
    for key, value in naive_flatten(raw).items():
        assert resolved[key] == value, key
    assert s.dataset.name == "fashion-mnist"
    assert s.partition.scheme == "dirichlet" and s.partition.alpha == 0.5
    assert s.model.name == "simple-cnn"
    # keys the file leaves out take the dataclass defaults
    assert s.model.hidden == (200, 200)
    assert s.strategy.name == "fedavg"
    assert s.strategy.options == ServerOptions(fraction_evaluate=0.0)
    assert load_scenario("default") == s
    assert load_scenario(str(DEFAULT_TOML)) == s


def test_shipped_names_and_paths_resolve_to_files(tmp_path: Path) -> None:
    assert resolve_scenario_path(None) == SCENARIO_DIR / "default.toml"
    assert resolve_scenario_path("default") == SCENARIO_DIR / "default.toml"
    own = tmp_path / "own.toml"
    own.write_text('name = "own"\n')
    assert resolve_scenario_path(str(own)) == own
    assert read_toml(own) == {"name": "own"}


def test_overrides_of_nested_keys_are_typed() -> None:
    s = load_scenario(
        None,
        [
            "train.lr=0.05",
            "rounds=3",
            "dataset.name=digits",  # not TOML: kept as a string
            'model.name="mlp"',
            "model.hidden=[64, 32]",
            "train.momentum=0",  # an int where a float is expected
            "partition.alpha=1e-1",
            "simulation.ray_address=",  # empty string
        ],
    )
    assert s.train.lr == 0.05 and isinstance(s.train.lr, float)
    assert s.rounds == 3 and isinstance(s.rounds, int)
    assert s.dataset.name == "digits"
    assert s.model.name == "mlp"
    assert s.model.hidden == (64, 32)
    assert s.train.momentum == 0.0 and isinstance(s.train.momentum, float)
    assert s.partition.alpha == pytest.approx(0.1)
    assert s.simulation.ray_address == ""
    # untouched keys keep the file's values
    assert s.num_clients == 10 and s.train.batch_size == 32


def test_apply_overrides_sets_dotted_keys_on_a_copy() -> None:
    data = {"rounds": 5, "train": {"lr": 0.1}}
    out = apply_overrides(data, ["train.lr=0.5", "strategy.name=ldawa", "model.hidden=[3, 2]"])
    assert out == {
        "rounds": 5,
        "train": {"lr": 0.5},
        "strategy": {"name": "ldawa"},
        "model": {"hidden": [3, 2]},
    }
    assert data == {"rounds": 5, "train": {"lr": 0.1}}  # the input is left alone


def test_strategy_options_from_overrides() -> None:
    s = load_scenario(
        None, ["strategy.name='ldawa'", "strategy.normalize='weights'", "strategy.warmup_rounds=2"]
    )
    assert s.strategy.name == "ldawa"
    assert s.strategy.options.normalize == "weights"
    assert s.strategy.options.warmup_rounds == 2


def test_comma_joined_lists_are_refused() -> None:
    # Lists are TOML arrays in files and JSON text in Flower's run config;
    # the comma-joined string of fedmerge 1.x is gone.
    with pytest.raises(ConfigError) as info:
        load_scenario(None, ['model.hidden="16,8,4"'])
    assert str(info.value) == "model.hidden: got '16,8,4'; allowed: a valid array"


def test_override_into_a_section_the_file_lacks(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text('name = "tiny"\n')
    s = load_scenario(str(path), ["strategy.fraction_evaluate=0.5"])
    assert s.name == "tiny" and s.strategy.options.fraction_evaluate == 0.5
    assert s.partition.scheme == "iid"  # dataclass default


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("foo=1", "foo"),
        ("train.foo=1", "train.foo"),
        ("dataset.rooot=/tmp", "dataset.rooot"),
        ("bar.baz=1", "bar"),
        ("strategy.ldawa_normalize='weights'", "strategy.ldawa_normalize"),  # renamed: normalize
    ],
)
def test_unknown_keys_are_rejected(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(None, [override])
    message = str(info.value)
    assert message.startswith(f"{key}: unknown key; allowed: ")


def test_unknown_key_in_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: unknown key") as info:
        load_scenario(str(path))
    assert "lr" in str(info.value).split("allowed:")[1]  # lists what is allowed


def test_option_of_another_strategy_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(None, ["strategy.prox_mu=0.5"])
    assert str(info.value) == (
        "strategy.prox_mu: got 0.5; allowed: only with strategy 'fedprox' (strategy is 'fedavg')"
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rounds=abc", "rounds: got 'abc'; allowed: a valid integer"),
        ("rounds=2.5", "rounds: got 2.5; allowed: a valid integer"),
        ("rounds=true", "rounds: got True; allowed: a valid integer"),
        ("rounds='x'", "rounds: got 'x'; allowed: a valid integer"),
        ("train.lr=fast", "train.lr: got 'fast'; allowed: a valid number"),
        ("train.lr=true", "train.lr: got True; allowed: a valid number"),
        ("model.hidden=[1.5, 2]", "model.hidden.0: got 1.5; allowed: a valid integer"),
        ('model.hidden="a,b"', "model.hidden: got 'a,b'; allowed: a valid array"),
        ("dataset.name=3", "dataset.name: got 3; allowed: a valid string"),
        ("train=3", "train: got 3; allowed: a table [train]"),
        ("train.lr.x=1", "train.lr.x: got 1; allowed: keys of tables only, and train.lr is 0.01,"),
    ],
)
def test_type_errors_name_key_and_value(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(None, [override])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_type_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"^rounds: "):
        load_scenario(None, ["rounds=abc"])


def test_clients_per_round_above_num_clients() -> None:
    with pytest.raises(ConfigError, match=r"^clients_per_round: got 11") as info:
        load_scenario(None, ["clients_per_round=11"])
    assert "10" in str(info.value)
    ok = load_scenario(None, ["num_clients=20", "clients_per_round=11"])
    assert ok.clients_per_round == 11


@pytest.mark.parametrize(
    ("override", "key", "bad"),
    [
        ("rounds=0", "rounds", "got 0;"),
        ("partition.alpha=0", "partition.alpha", "got 0.0;"),
        ("partition.alpha=-2", "partition.alpha", "got -2.0;"),
        ("partition.scheme=random", "partition.scheme", "got 'random';"),
        ("train.momentum=1.0", "train.momentum", "got 1.0;"),
        ("strategy.name=scaffold", "strategy.name", "got 'scaffold';"),
        ("strategy.fraction_evaluate=1.5", "strategy.fraction_evaluate", "got 1.5;"),
        ("model.hidden=[]", "model.hidden", "got ();"),
        ("model.hidden=[8, 0]", "model.hidden", "got (8, 0);"),
        ("device=tpu", "device", "got 'tpu';"),
        ("dataset.root=/nonexistent/fm", "dataset.root", "got '/nonexistent/fm';"),
        ("train.lr=inf", "train.lr", "got inf;"),
    ],
)
def test_range_errors_name_key_and_value(override: str, key: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: ") as info:
        load_scenario(None, [override])
    assert bad in str(info.value)
    assert "allowed:" in str(info.value)


def test_malformed_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"^--set: got 'train\.lr'; allowed: key=value"):
        load_scenario(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"^--set: "):
        load_scenario(None, ["=3"])


def test_malformed_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[train\nlr = 0.1\n')
    with pytest.raises(ConfigError, match=r"^scenario:") as info:
        load_scenario(str(path))
    assert str(path) in str(info.value) and "TOML" in str(info.value)


def test_missing_scenario_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^scenario:") as info:
        load_scenario(str(tmp_path / "nope.toml"))
    assert "default" in str(info.value)  # lists the shipped scenarios


# --------------------------------------------------------------------------- dotted keys


def test_flatten_and_set_dotted_hand_worked() -> None:
    nested = {"a": 1, "b": {"c": "x", "d": {"e": 2.5}}, "f": [1, 2, 3]}
    assert flatten(nested) == {"a": 1, "b.c": "x", "b.d.e": 2.5, "f": [1, 2, 3]}
    flat = {"a": 1, "b.c": "x", "b.d.e": 2.5}
    assert set_dotted({}, flat) == {"a": 1, "b": {"c": "x", "d": {"e": 2.5}}}
    with pytest.raises(
        ConfigError, match=r"^a\.b: got 2; allowed: keys of tables only, and a is 1, not a table$"
    ):
        set_dotted({"a": 1}, {"a.b": 2})


def test_flatten_round_trip_of_a_scenario() -> None:
    s = load_scenario(None, ['model.name="mlp"', "model.hidden=[32, 16, 8]", "dataset.name=digits"])
    flat = flatten(s.to_dict())
    assert all(not isinstance(v, (dict, tuple)) for v in flat.values())
    assert flat["model.hidden"] == [32, 16, 8]
    back = run_config_from_dict(set_dotted({}, flat))
    assert back == s
    assert back.digest() == s.digest()


def test_digest_changes_with_config() -> None:
    a = load_scenario()
    assert a.digest() == load_scenario().digest()
    assert a.digest() != load_scenario(None, ["seed=1"]).digest()
    assert a.digest() != load_scenario(None, ["train.lr=0.02"]).digest()
    assert re.fullmatch(r"[0-9a-f]{16}", a.digest())


def test_pyproject_run_config_holds_the_default_scenario() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    embedded = naive_flatten(pyproject["tool"]["flwr"]["app"]["config"])
    expected = {
        key: "[" + ", ".join(str(v) for v in value) + "]" if isinstance(value, list) else value
        for key, value in naive_flatten(load_scenario().to_dict()).items()
    }
    assert expected == to_run_config(load_scenario())
    missing = sorted(expected.keys() - embedded.keys())
    assert not missing, f"missing from pyproject: {missing}"
    for key, value in expected.items():
        assert embedded[key] == value, key
        assert type(embedded[key]) is type(value), f"{key}: {embedded[key]!r} vs {value!r}"
    # the rest: where the run writes, and options of the other built-in strategies
    extra = embedded.keys() - expected.keys()
    assert "output.run-dir" in extra and embedded["output.run-dir"] == ""
    assert all(k.startswith(("output.", "strategy.")) for k in extra), sorted(extra)


@pytest.mark.parametrize("overrides", ["rounds=2", [{"rounds": 2}], ["rounds=2", 3]])
def test_overrides_that_are_not_a_list_of_strings_are_one_line(overrides: object) -> None:
    """From Python: one string (its letters would each be an override) or a dict is a slip."""
    with pytest.raises(ConfigError) as err:
        load_scenario("default", overrides)  # type: ignore[arg-type]
    assert str(err.value) == (
        f"overrides: got {overrides!r}; allowed: a list of 'key=value' strings, as --set "
        "takes them (e.g. ['rounds=3'])"
    )


def test_a_file_that_starts_with_a_byte_order_mark_reads_as_without(tmp_path: Path) -> None:
    """Notepad writes one; tomllib refused it as 'Invalid statement (at line 1, column 1)'."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbfrounds = 3\n")
    assert load_scenario(str(path)).rounds == 3
