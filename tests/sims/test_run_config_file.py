"""``fedmerge run-config``: a scenario file as a run config that Flower's own parser accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from sims.cli import main
from sims.scenario_files import load_scenario
from strategies.config import RUN_DIR_KEY, from_run_config

SCENARIO = """
name = "lists"
rounds = 3
[model]
name = "mlp"
hidden = [200, 200]
[dataset]
name = "digits"
[strategy]
name = "fedavg"
"""


def test_a_scenario_with_lists_round_trips_through_flowers_parser(tmp_path: Path) -> None:
    scenario = tmp_path / "lists.toml"
    scenario.write_text(SCENARIO)
    with pytest.raises(ValueError, match="needs to be of type"):  # why the command exists
        parse_config_args([str(scenario)])
    out = tmp_path / "run_config.toml"
    assert main(["run-config", str(scenario), "--set", "seed=5", "-o", str(out)]) == 0
    flat = parse_config_args([str(out)])  # what flwr run --run-config does with the file
    assert RUN_DIR_KEY not in flat  # a new run never lands in an old run directory
    back = from_run_config(flat)
    assert back.model.hidden == (200, 200) and back.seed == 5 and back.rounds == 3
    expected = load_scenario(str(scenario), ["seed=5"])
    assert back.digest() == expected.digest() and back == expected


def test_run_config_to_standard_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "lists.toml"
    scenario.write_text(SCENARIO)
    assert main(["run-config", str(scenario)]) == 0
    text = capsys.readouterr().out
    assert '"model.hidden" = "[200, 200]"' in text and '"rounds" = 3' in text


def test_run_config_into_a_directory_is_refused_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "s").mkdir()
    assert main(["run-config", "-o", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedmerge: error: --out: got {str(tmp_path / 's')!r}, which is a directory; "
        "allowed: a file\n"
    )
    assert list((tmp_path / "s").iterdir()) == []  # no temp file left in it
