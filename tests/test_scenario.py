"""Tests of fedmerge.scenario: loading, overrides, validation, flattening."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedmerge.scenario import (
    ConfigError,
    Scenario,
    flatten,
    load_scenario,
    scenario_from_dict,
    unflatten,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOML = REPO / "sims" / "scenarios" / "default.toml"


def naive_flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested tables; written independently of fedmerge.scenario."""
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
    assert isinstance(s, Scenario)
    raw = tomllib.loads(DEFAULT_TOML.read_text())
    resolved = naive_flatten(s.to_dict())
    for key, value in naive_flatten(raw).items():
        assert resolved[key] == value, key
    assert s.dataset.name == "fashion-mnist"
    assert s.partition.scheme == "dirichlet" and s.partition.alpha == 0.5
    assert s.model.name == "simple-cnn"
    # keys the file leaves out take the dataclass defaults
    assert s.model.hidden == (200, 200)
    assert s.strategy.prox_mu == 0.01
    assert load_scenario("default") == s
    assert load_scenario(str(DEFAULT_TOML)) == s


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


def test_hidden_from_comma_joined_string() -> None:
    s = load_scenario(None, ['model.hidden="16,8,4"'])
    assert s.model.hidden == (16, 8, 4)


def test_override_into_a_section_the_file_lacks(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text('name = "tiny"\n')
    s = load_scenario(str(path), ["strategy.fraction_evaluate=0.5"])
    assert s.name == "tiny" and s.strategy.fraction_evaluate == 0.5
    assert s.partition.scheme == "iid"  # dataclass default


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("foo=1", "foo"),
        ("train.foo=1", "train.foo"),
        ("dataset.rooot=/tmp", "dataset.rooot"),
        ("bar.baz=1", "bar"),
    ],
)
def test_unknown_keys_are_rejected(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(None, [override])
    message = str(info.value)
    assert message.startswith(f"{key}:")
    assert "unknown key" in message


def test_unknown_key_in_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: unknown key") as info:
        load_scenario(str(path))
    assert "lr" in str(info.value)  # lists what is allowed


@pytest.mark.parametrize(
    ("override", "key", "bad"),
    [
        ("rounds=abc", "rounds", "'abc'"),
        ("rounds=2.5", "rounds", "2.5"),
        ("rounds=true", "rounds", "True"),
        ("train.lr=fast", "train.lr", "'fast'"),
        ("train.lr=true", "train.lr", "True"),
        ("model.hidden=[1.5, 2]", "model.hidden", "1.5"),
        ('model.hidden="a,b"', "model.hidden", "'a,b'"),
        ("dataset.name=3", "dataset.name", "3"),
        ("train=3", "train", "3"),
    ],
)
def test_type_errors_name_key_and_value(override: str, key: str, bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(None, [override])
    message = str(info.value)
    assert message.startswith(f"{key}:")
    assert bad in message


def test_type_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"rounds"):
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
        ("model.hidden=[]", "model.hidden", "got [];"),
        ("model.hidden=[8, 0]", "model.hidden", "got [8, 0];"),
        ("device=tpu", "device", "got 'tpu';"),
        ("dataset.root=/nonexistent/fm", "dataset.root", "got '/nonexistent/fm';"),
    ],
)
def test_range_errors_name_key_and_value(override: str, key: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: ") as info:
        load_scenario(None, [override])
    assert bad in str(info.value)
    assert "allowed:" in str(info.value)


def test_malformed_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"--set"):
        load_scenario(None, ["train.lr"])


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


# --------------------------------------------------------------------------- flatten


def test_flatten_hand_worked() -> None:
    nested = {"a": 1, "b": {"c": "x", "d": {"e": 2.5}}, "f": [1, 2, 3]}
    assert flatten(nested) == {"a": 1, "b.c": "x", "b.d.e": 2.5, "f": "1,2,3"}
    flat = {"a": 1, "b.c": "x", "b.d.e": 2.5}
    assert unflatten(flat) == {"a": 1, "b": {"c": "x", "d": {"e": 2.5}}}


def test_flatten_unflatten_round_trip_of_a_scenario() -> None:
    s = load_scenario(None, ["model.hidden=[32, 16, 8]", "dataset.name=digits"])
    flat = flatten(s.to_dict())
    assert all(not isinstance(v, (dict, list, tuple)) for v in flat.values())
    assert flat["model.hidden"] == "32,16,8"
    back = scenario_from_dict(unflatten(flat))
    assert back == s
    assert back.digest() == s.digest()


def test_digest_changes_with_config() -> None:
    a = load_scenario()
    assert a.digest() == load_scenario().digest()
    assert a.digest() != load_scenario(None, ["seed=1"]).digest()
    assert len(a.digest()) == 16


def test_pyproject_run_config_equals_flattened_default() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    embedded = naive_flatten(pyproject["tool"]["flwr"]["app"]["config"])
    expected = {}
    for key, value in naive_flatten(load_scenario().to_dict()).items():
        expected[key] = ",".join(str(v) for v in value) if isinstance(value, list) else value
    expected["output.run-dir"] = ""
    assert embedded.keys() == expected.keys(), (
        f"missing from pyproject: {sorted(expected.keys() - embedded.keys())}; "
        f"extra in pyproject: {sorted(embedded.keys() - expected.keys())}"
    )
    for key, value in expected.items():
        assert embedded[key] == value, key
        assert type(embedded[key]) is type(value), f"{key}: {embedded[key]!r} vs {value!r}"
