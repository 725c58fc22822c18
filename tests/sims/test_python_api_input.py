"""What the Python API refuses before it touches a directory or starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from sims.compare import load_sweep, plan_sweep
from sims.launch import simulate
from sims.scenario_files import load_scenario
from strategies.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "sims" / "sweeps" / "smoke.toml"


@pytest.mark.parametrize("force", [False, True])
def test_an_empty_run_dir_is_refused_and_the_working_directory_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """simulate(scenario, "") ran in the working directory, and with force=True it first
    deleted the files there that have the names of a run's (config.json, flower.log, ...)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("mine")
    (tmp_path / "flower.log").write_text("mine too")
    with pytest.raises(ConfigError, match=r"^run_dir: got ''; allowed: a non-empty path"):
        simulate(load_scenario(None), "", force=force)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "flower.log"]
    assert (tmp_path / "config.json").read_text() == "mine"


def test_an_empty_runs_root_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^runs_root: got ''; allowed: a non-empty path"):
        plan_sweep(load_sweep(SMOKE), "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: simulate("default", d), r"^scenario: got str; allowed: a RunConfig"),
        (lambda d: simulate(load_scenario(None), None), r"^run_dir: got NoneType None; allowed"),
        (lambda d: simulate(load_scenario(None), 123), r"^run_dir: got int 123; allowed"),
        (lambda d: plan_sweep("smoke", d), r"^sweep: got str; allowed: a Sweep"),
        (lambda d: load_sweep(123), r"^sweep: got int 123; allowed"),
    ],
    ids=["scenario-name", "run-dir-none", "run-dir-int", "sweep-name", "sweep-int"],
)
def test_a_wrong_type_is_a_type_error_before_anything_is_written(
    call: object, message: str, tmp_path: Path
) -> None:
    """They were AttributeErrors after the run directory and its lock had been made."""
    run_dir = tmp_path / "run"
    with pytest.raises(TypeError, match=message):
        call(run_dir)  # type: ignore[operator]
    assert not run_dir.exists()


def test_sweep_overrides_as_one_string_are_refused() -> None:
    """load_sweep(path, "rounds=3") read the string letter by letter: "--set: got 'r'"."""
    with pytest.raises(ConfigError, match=r"^overrides: got 'rounds=3'; allowed: a list"):
        load_sweep(SMOKE, "rounds=3")  # type: ignore[arg-type]


FACTORIES = """
import math
import torch.nn as nn

def raises(input_shape, num_classes, *, width, hidden):
    raise TypeError("user bug")

def other_inputs(input_shape, num_classes, *, width, hidden):
    return nn.Sequential(nn.Flatten(), nn.Linear(3, num_classes))

def three_outputs(input_shape, num_classes, *, width, hidden):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 3))

class Zeros(nn.Module):
    def forward(self, x):
        return x.new_zeros(len(x), 10)

def no_parameters(input_shape, num_classes, *, width, hidden):
    return Zeros()

def fine(input_shape, num_classes, *, width, hidden):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
"""


@pytest.mark.parametrize(
    ("factory", "strategy", "needle"),
    [
        ("raises", "fedavg", "which raised TypeError: user bug; allowed: a function"),
        ("other_inputs", "fedavg", "on a batch of shape (2, 1, 8, 8) raised RuntimeError"),
        ("other_inputs", "aligned", "on a batch of shape (2, 1, 8, 8) raised RuntimeError"),
        ("three_outputs", "fedavg", "whose model gives (2, 3) for a batch of shape (2, 1, 8, 8)"),
        ("no_parameters", "fedavg", "whose model has no parameters; allowed: a model with"),
    ],
)
def test_a_model_factory_that_cannot_serve_the_data_is_refused_before_the_run(
    tmp_path: Path, factory: str, strategy: str, needle: str
) -> None:
    """A factory's own exception was reported as a bug in fedmerge, and a model of the wrong
    outputs ran until its first round ("Target 6 is out of bounds")."""
    from sims.launch import preflight

    (tmp_path / "models.py").write_text(FACTORIES)
    scenario = load_scenario(
        None,
        [
            "dataset.name='digits'",
            f"model.factory='{tmp_path / 'models.py'}:{factory}'",
            f"strategy.name='{strategy}'",
        ],
    )
    with pytest.raises(ConfigError) as refused:
        preflight(scenario)
    line = str(refused.value)
    assert line.startswith(f"model.factory: got '{tmp_path / 'models.py'}:{factory}', ")
    assert needle in line, line


def test_a_model_factory_that_serves_the_data_passes(tmp_path: Path) -> None:
    from sims.launch import preflight

    (tmp_path / "models.py").write_text(FACTORIES)
    preflight(
        load_scenario(
            None, ["dataset.name='digits'", f"model.factory='{tmp_path / 'models.py'}:fine'"]
        )
    )
