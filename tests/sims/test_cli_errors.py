"""Tests of the ``fedmerge`` command: bad input fails fast; ``partition`` works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sims import cli

REPO = Path(__file__).resolve().parents[2]
EXIT_BAD_INPUT = 2


def _digits_train_size() -> int:
    """Digits' training set: sklearn's 1,797 images less a rounded 20 % test split."""
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    return n - round(0.2 * n)


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Replace the Flower launch: any call is recorded and fails the test."""
    calls: list[object] = []

    def fake_simulate(*args: object, **kwargs: object) -> dict:
        calls.append(args)
        raise AssertionError("the simulation started despite bad input")

    monkeypatch.setattr(cli, "simulate", fake_simulate)
    return calls


def _bad_toml(tmp_path: Path) -> str:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\nrounds = = 3\n')
    return str(path)


# (id, extra argv, substrings the single stderr line must hold: key, then bad value)
CASES = [
    ("unknown-dataset", ["--set", "dataset.name=imagenet"], ["dataset.name", "'imagenet'"]),
    ("unknown-model", ["--set", "model.name=gpt"], ["model.name", "'gpt'"]),
    ("unknown-strategy", ["--set", "strategy.name=scaffold"], ["strategy.name", "'scaffold'"]),
    ("alpha-zero", ["--set", "partition.alpha=0"], ["partition.alpha", "0.0"]),
    ("alpha-negative", ["--set", "partition.alpha=-0.5"], ["partition.alpha", "-0.5"]),
    (
        "more-clients-than-samples",
        [
            "--set",
            "dataset.name=digits",
            "--set",
            "num_clients=5000",
            "--set",
            "clients_per_round=1",
        ],
        ["num_clients", "5000"],
    ),
    ("missing-data-dir", ["--set", "dataset.root=/nonexistent"], ["dataset.root", "/nonexistent"]),
    ("empty-data-dir", ["--set", "dataset.root=@EMPTY_DIR@"], ["dataset.root", "empty-dir"]),
    ("mnist-without-root", ["--set", "dataset.name=mnist"], ["dataset.root", "'mnist'"]),
    ("malformed-toml", ["@BAD_TOML@"], ["scenario", "broken.toml"]),
    ("unknown-top-level-key", ["--set", "learning_rate=0.1"], ["learning_rate", "unknown key"]),
    ("unknown-nested-key", ["--set", "train.lrr=0.1"], ["train.lrr", "unknown key"]),
    ("type-error", ["--set", "rounds=many"], ["rounds", "'many'"]),
    ("clients-per-round", ["--set", "clients_per_round=11"], ["clients_per_round", "11"]),
    (
        "option-of-another-strategy",
        ["--set", "strategy.negative=clip"],
        ["strategy.negative: got 'clip'", "only with strategy 'ldawa'", "(strategy is 'fedavg')"],
    ),
    (
        "impossible-regular-graph",
        [
            "--set",
            "strategy.name=dimat",
            "--set",
            "topology.name=regular",
            "--set",
            "topology.degree=3",
            "--set",
            "num_clients=5",
            "--set",
            "clients_per_round=5",
        ],
        ["topology.degree", "3"],
    ),
    ("unknown-topology", ["--set", "topology.name=mesh"], ["topology.name", "'mesh'"]),
    (
        "client-widths-without-ot",
        ["--set", "strategy.client_widths=[1, 2]"],
        ["strategy.client_widths: got [1, 2]", "only with strategy 'ot'"],
    ),
]


@pytest.mark.parametrize(("extra", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_simulate_bad_input_is_one_line_and_exit_2(
    extra: list[str],
    needles: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_simulation: list[object],
) -> None:
    runs = tmp_path / "runs"
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    argv = [
        _bad_toml(tmp_path) if a == "@BAD_TOML@" else a.replace("@EMPTY_DIR@", str(empty))
        for a in extra
    ]
    code = cli.main(["simulate", *argv, "--runs-root", str(runs)])
    out, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert lines[0].startswith("fedmerge: error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert out == "", "nothing may be printed before the input is checked"
    assert no_simulation == []
    assert not runs.exists(), "a run directory was created"


def test_subprocess_bad_input_exit_code_and_single_stderr_line(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "sims.cli", "simulate", "--set", "dataset.name=imagenet",
         "--runs-root", str(runs)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == EXIT_BAD_INPUT
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "dataset.name" in lines[0] and "'imagenet'" in lines[0] and "digits" in lines[0]
    assert proc.stdout == ""
    assert not runs.exists()


def test_partition_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "p.png"
    code = cli.main(["partition", "--set", "partition.scheme=zigzag", "--out", str(png)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert len(err.splitlines()) == 1 and "partition.scheme" in err and "'zigzag'" in err
    assert not png.exists()


def test_partition_writes_png_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "digits.png"
    code = cli.main(
        ["partition", "--set", "dataset.name=digits", "--set", "model.name=mlp",
         "--set", "num_clients=7", "--set", "partition.scheme=dirichlet",
         "--set", "partition.alpha=0.3", "--set", "partition.min_partition_size=1",
         "--out", str(png)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024

    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0].isdigit():
            rows.append(cells)
    assert [int(r[0]) for r in rows] == list(range(7))
    n_train = _digits_train_size()
    for r in rows:
        assert len(r) == 1 + 10 + 1  # client, ten classes, total
        per_class = [0 if c == "." else int(c) for c in r[1:-1]]
        assert sum(per_class) == int(r[-1])
    assert sum(int(r[-1]) for r in rows) == n_train
    assert f"{n_train} of {n_train} training samples assigned" in out
