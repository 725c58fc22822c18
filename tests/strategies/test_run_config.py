"""The run configuration: one validation, exact round trips through Flower's run config."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from sims.compare import expand, load_sweep
from sims.launch import declared_run_config, run_config_toml
from sims.scenario_files import SCENARIO_DIR, load_scenario, shipped_scenarios
from strategies.config import (
    ConfigError,
    RunConfig,
    StrategyConfig,
    flatten,
    from_run_config,
    run_config_from_dict,
    to_run_config,
)
from strategies.plugins import builtin_plugin_names

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "sims" / "sweeps").glob("*.toml"))


def _every_shipped_config() -> list[RunConfig]:
    configs = [load_scenario(name) for name in shipped_scenarios()]
    for sweep in SWEEPS:
        configs += [config for _, config in expand(load_sweep(sweep))]
    return configs


def test_every_shipped_scenario_and_sweep_run_survives_flowers_run_config() -> None:
    configs = _every_shipped_config()
    assert len(configs) > len(SWEEPS)
    for config in configs:
        flat = to_run_config(config)
        assert all(isinstance(v, bool | int | float | str) for v in flat.values())
        back = from_run_config(flat)
        assert back == config
        assert back.to_dict() == config.to_dict()
        assert back.digest() == config.digest()


def test_every_strategy_with_every_option_changed_survives_the_round_trip() -> None:
    changed = {
        bool: lambda v: not v,
        int: lambda v: v + 2,
        float: lambda v: v / 2 if v else 0.5,
        str: None,
        tuple: lambda v: (3, 1),
    }
    for name in builtin_plugin_names():
        options = StrategyConfig(name).to_dict()
        for key, value in options.items():
            if key == "name" or isinstance(value, str):
                continue
            data = {
                "num_clients": 6,
                "strategy": {
                    "name": name,
                    key: changed[type(value) if not isinstance(value, list) else tuple](value),
                },
            }
            try:
                config = run_config_from_dict(data)
            except ConfigError:
                continue  # a combination the options refuse on their own
            assert from_run_config(to_run_config(config)) == config, (name, key)


def test_lists_keep_their_type_and_order() -> None:
    config = load_scenario(None, ["model.name='mlp'", "model.hidden=[300, 100, 7]"])
    flat = to_run_config(config)
    assert flat["model.hidden"] == "[300, 100, 7]"
    assert from_run_config(flat).model.hidden == (300, 100, 7)


def test_pyproject_declares_exactly_what_the_run_config_holds() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = flatten(pyproject["tool"]["flwr"]["app"]["config"])
    assert declared == declared_run_config(), "run scripts/sync_flwr_config.py"
    for config in _every_shipped_config():
        written = tomllib.loads(run_config_toml(config, ROOT / "runs" / "x"))
        assert set(written) <= set(declared)


@pytest.mark.parametrize("odd", ["emoji-\U0001f642", "umlaut-\u00fc", "del-\x7f", 'quote-"-\\'])
def test_a_run_directory_of_any_characters_reads_back_from_the_toml(
    tmp_path: Path, odd: str
) -> None:
    """JSON's ASCII escapes wrote U+1F642 as two surrogates, which TOML refuses."""
    run_dir = tmp_path / odd
    written = tomllib.loads(run_config_toml(load_scenario(None), run_dir))
    assert written["output.run-dir"] == str(run_dir.resolve())


def test_the_embedded_default_reads_back_from_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flat = flatten(pyproject["tool"]["flwr"]["app"]["config"])
    assert from_run_config(flat) == load_scenario(None)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["partition.alpha=0"], "partition.alpha: got 0.0; allowed:"),
        (["train.lr=inf"], "train.lr: got inf; allowed: a finite number"),
        (["train.lr=nan"], "train.lr: got nan; allowed: a finite number"),
        (["train.epochs=true"], "train.epochs: got True; allowed: a valid integer"),
        (["train.epochs='3'"], "train.epochs: got '3'; allowed: a valid integer"),
        (["rounds=0"], "rounds: got 0; allowed: greater than or equal to 1"),
        (["clients_per_round=11"], "clients_per_round: got 11; allowed: 1 to num_clients (10)"),
        (["device='tpu'"], "device: got 'tpu'"),
        (["strategy.name='nope'"], "strategy.name: got 'nope'; allowed: aligned, dimat,"),
        (["strategy.normalize='weights'"],
         "strategy.normalize: got 'weights'; allowed: only with strategy 'ldawa' (strategy is "
         "'fedavg')"),
        (
            ["strategy.colour='red'"],
            "strategy.colour: unknown key; allowed: clip_norm, clip_to_median, fraction_evaluate",
        ),
        (["strategy.name='ldawa'", "strategy.normalize='all'"],
         "strategy.normalize: got 'all'; allowed: clients, weights"),
        (["strategy.name='ot'", "strategy.reg=-1.0"],
         "strategy.reg: got -1.0; allowed: a number > 0"),
        (["strategy.name='aligned'", "strategy.method='activation'"],
         "strategy.proxy_samples: got 0; allowed: > 0 with method 'activation'"),
        (["strategy.name='ot'", "strategy.client_widths=[1, 0]"],
         "strategy.client_widths: got [1, 0]; allowed: a list of integers >= 1"),
        (["strategy.name='dimat'", "strategy.merge_every=0"],
         "strategy.merge_every: got 0; allowed: an integer >= 1"),
        (["learning_rate=0.1"], "learning_rate: unknown key; allowed:"),
        (["train.lrr=0.1"],
         "train.lrr: unknown key; allowed: batch_size, epochs, independent_init, lr,"),
        (["topology.name='mesh'"], "topology.name: got 'mesh'"),
        (["simulation.timeout=0"], "simulation.timeout: got 0.0; allowed: seconds > 0"),
        (["simulation.inject_failures='x'"], "simulation.inject_failures: got 'x'"),
        (["model.hidden=[200, 'x']"], "model.hidden.1: got 'x'; allowed: a valid integer"),
        (["plugins=['no.such.module']"], "plugins: got 'no.such.module'"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_naming_key_value_and_allowed(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_an_option_of_another_strategy_in_flowers_run_config_must_keep_its_default() -> None:
    flat = to_run_config(load_scenario(None))
    flat["strategy.normalize"] = "clients"  # ldawa's default: what pyproject.toml declares
    assert from_run_config(flat) == load_scenario(None)
    flat["strategy.normalize"] = "weights"
    with pytest.raises(ConfigError, match=r"strategy.normalize: got 'weights'; allowed: only "
                       r"with strategy 'ldawa' \(strategy is 'fedavg'\)"):  # fmt: skip
        from_run_config(flat)


def test_digest_ignores_where_a_run_executes_and_defaults_but_not_options() -> None:
    base = load_scenario(None)
    elsewhere = load_scenario(None, ["simulation.ray_address='10.0.0.1:6379'"])
    assert base.digest() == elsewhere.digest()
    spelled_out = load_scenario(None, ["strategy.fraction_evaluate=0.0"])
    assert spelled_out.digest() == base.digest()
    assert load_scenario(None, ["strategy.fraction_evaluate=0.5"]).digest() != base.digest()
    ldawa = load_scenario(None, ["strategy.name='ldawa'"])
    assert load_scenario(None, ["strategy.name='ldawa'", "strategy.bn='average'"]).digest() != (
        ldawa.digest()
    )


def test_shipped_scenarios_are_the_files_in_sims_scenarios() -> None:
    assert shipped_scenarios() == sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
    assert "default" in shipped_scenarios()


def test_json_schema_names_every_section() -> None:
    schema = RunConfig.model_json_schema()
    assert {"dataset", "partition", "model", "train", "topology", "simulation"} <= set(
        schema["properties"]
    )
    assert json.dumps(schema)
