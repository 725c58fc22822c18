"""``fedmerge report`` on damaged run and sweep files: one line naming the file, exit 2.

Each case used to end in a traceback ("internal error"), in a line that named no
file (``Expecting value: line 1 column 1 (char 0)``), or in a report built from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sims import cli
from tests.sims.test_cli_errors import _one_error_line
from tests.sims.test_report import EXIT_BAD_INPUT, _write_run

#: id -> (file of the run directory, its new text (or a change of its text), what the line names)
DAMAGED_RUN: dict[str, tuple[str, str | Callable[[str], str], str]] = {
    "config-list": ("config.json", "[]", "got []; allowed: a JSON object"),
    "config-empty-object": ("config.json", "{}", "seed: got no such key; allowed: an integer"),
    "config-not-json": ("config.json", "garbage", 'got "garbage", which is not JSON'),
    "config-seed-text": (
        "config.json",
        lambda text: json.dumps({**json.loads(text), "seed": "1"}),
        'seed: got "1"; allowed: an integer',
    ),
    "config-section-list": (
        "config.json",
        lambda text: json.dumps({**json.loads(text), "simulation": []}),
        "simulation: got []; allowed: a JSON object",
    ),
    "config-bad-scenario-key": (  # checked when the final model is evaluated on the clients
        "config.json",
        lambda text: json.dumps({**json.loads(text), "rounds": "x"}),
        "rounds: got 'x'",
    ),
    "metrics-empty-object": ("metrics.jsonl", "{}\n", ":1: round: got no such key"),
    "metrics-not-json": ("metrics.jsonl", "garbage\n", ':1: got "garbage"; allowed: a JSON object'),
    "metrics-list": ("metrics.jsonl", "[1]\n", ':1: got "[1]"; allowed: a JSON object'),
    "metrics-accuracy-text": (
        "metrics.jsonl",
        lambda text: text.replace('"accuracy": 0.5,', '"accuracy": "high",'),
        ':2: accuracy: got "high"; allowed: a number, or null',
    ),
    "metrics-no-rows": ("metrics.jsonl", "\n", "got no rows"),
    "timing-wall-time-text": ("timing.json", '{"wall_time": "abc"}', 'wall_time: got "abc"'),
}

#: id -> text of a sweep.json, and what the line names
DAMAGED_SWEEP = {
    "list": ("[1]", "got [1]; allowed: a JSON object"),
    "runs-number": ('{"runs": 5}', "runs: got 5; allowed: a list"),
    "runs-of-names": ('{"runs": ["r1"]}', 'runs[0]: got "r1"; allowed: a JSON object'),
    "run-without-run-dir": ('{"runs": [{"x": 1}]}', "runs[0]: run_dir: got no such key"),
    "target-list": ('{"target_accuracy": [1]}', "target_accuracy: got [1]; allowed: a number"),
    "target-text": ('{"target_accuracy": "abc"}', 'target_accuracy: got "abc"; allowed: a number'),
    "target-above-1": ('{"target_accuracy": 5}', "target_accuracy: got 5; allowed: a number"),
    "not-json": ("garbage", 'got "garbage", which is not JSON'),
}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run (rounds 0-2, no per-peer accuracies) with a final model, in ``sweep/r1``."""
    run = _write_run(tmp_path / "sweep" / "r1", ["seed=0"], [0.1, 0.5, 0.8], 3.0)
    save_file({"w": torch.zeros(1)}, str(run / "model.safetensors"))
    return run


def _report_fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The error line of ``fedmerge report ARGS``, which must exit 2."""
    code = cli.main(["report", *args])
    line = _one_error_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT, line
    return line


@pytest.mark.parametrize("case", list(DAMAGED_RUN))
def test_damaged_run_file_is_one_line_naming_it(
    case: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, damage, needle = DAMAGED_RUN[case]
    path = run_dir / name
    path.write_text(damage if isinstance(damage, str) else damage(path.read_text()))
    line = _report_fails([str(run_dir), "--out", str(tmp_path / "out")], capsys)
    assert f"{path}" in line and needle in line and "; allowed: " in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", ["sweep-folder", "run-in-sweep-folder"])
@pytest.mark.parametrize("case", list(DAMAGED_SWEEP))
def test_damaged_sweep_manifest_is_one_line_naming_it(
    case: str, given: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The manifest is read for the runs' order (a sweep folder) and for the target (both)."""
    text, needle = DAMAGED_SWEEP[case]
    manifest = run_dir.parent / "sweep.json"
    manifest.write_text(text)
    given_dir = run_dir.parent if given == "sweep-folder" else run_dir
    line = _report_fails([str(given_dir), "--out", str(tmp_path / "out")], capsys)
    assert line.startswith(f"fedmerge: error: {manifest}: ") and needle in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["5", "0", "-0.5", "nan"])
def test_bad_target_option_is_named_as_the_option(
    target: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _report_fails([str(run_dir), "--target", target, "--out", str(tmp_path / "out")], capsys)
    assert line == (
        f"fedmerge: error: --target: got {float(target):g}; allowed: a number in (0, 1]"
    )
    assert not (tmp_path / "out").exists()


_DIGITS_MLP = ["dataset.name='digits'", "model.name='mlp'", "seed=0"]


def _run_with_model(root: Path) -> tuple[Path, list[float]]:
    """A finished digits/MLP run of 4 clients with its real initial model as the final one,
    and that model's accuracy on each client's data, computed here with a plain loop."""
    from sims.scenario_files import load_scenario
    from strategies.federation import Federation

    run = _write_run(root / "r1", _DIGITS_MLP, [0.1, 0.5, 0.8], 3.0)
    fed = Federation(load_scenario(None, ["rounds=2", "num_clients=4", "clients_per_round=2",
                                          *_DIGITS_MLP]))  # fmt: skip
    model = fed.initial_model().eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(run / "model.safetensors"))  # fmt: skip
    with torch.no_grad():
        expected = [
            float((model(x).argmax(1) == y).double().mean())
            for x, y in (fed.client_data(pid) for pid in range(4))
        ]
    return run, expected


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"\x00" * 7 + b"garbage"),  # not safetensors
        lambda p: p.write_bytes(p.read_bytes()[:100]),  # truncated
        lambda p: save_file({"foo": torch.zeros(3)}, str(p)),  # another model's keys
        lambda p: save_file(  # the right keys, one of another shape
            {
                k: (v[:1].contiguous() if k.endswith("bias") else v)
                for k, v in load_file(str(p)).items()
            },
            str(p),
        ),
    ],
    ids=["not-safetensors", "truncated", "other-keys", "other-shape"],
)
def test_a_damaged_or_foreign_final_model_is_one_line_naming_it(
    damage: Callable[[Path], object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """load_file and load_state_dict raised their own errors: a traceback called a bug."""
    run, _ = _run_with_model(tmp_path / "sweep")
    model = run / "model.safetensors"
    damage(model)
    line = _report_fails([str(run), "--out", str(tmp_path / "out")], capsys)
    assert line.startswith(f"fedmerge: error: {model}: got ")
    assert line.endswith("; allowed: the final mlp weights that the run wrote")


@pytest.mark.parametrize(
    "cached",
    [
        {},  # no accuracy
        {"accuracy": [None, "x", 0.5, 0.5]},
        {"accuracy": "abcd"},
        {"accuracy": [0.5]},  # another number of clients
        {"accuracy": [7.5, 0.5, 0.5, 0.5]},  # not an accuracy
    ],
    ids=["no-accuracy", "not-numbers", "a-string", "too-short", "above-1"],
)
def test_a_cache_of_another_shape_is_computed_again(
    cached: dict[str, object], tmp_path: Path
) -> None:
    """A cache with the model's hash was taken as it was: a KeyError, a TypeError, letters
    read as accuracies, or a wrong list plotted."""
    import hashlib

    from sims import evaluation
    from sims.runs import load_run

    run, expected = _run_with_model(tmp_path / "sweep")
    digest = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    cache = run / evaluation.CLIENT_ACCURACY_FILE
    cache.write_text(json.dumps({"model_sha256": digest, **cached}))
    assert evaluation.client_accuracy(load_run(run)) == pytest.approx(expected, abs=1e-12)
    assert json.loads(cache.read_text())["accuracy"] == pytest.approx(expected, abs=1e-12)
