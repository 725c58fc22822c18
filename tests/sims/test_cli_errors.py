"""Tests of the ``fedmerge`` command: bad input fails fast; ``partition`` works."""

from __future__ import annotations

import gzip
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sims import checks, cli, commands
from tests.fresh_python import run_fresh

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

    monkeypatch.setattr(commands, "simulate", fake_simulate)
    return calls


def _bad_toml(tmp_path: Path) -> str:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\nrounds = = 3\n')
    return str(path)


_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, written from the format's definition."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def _fmnist_dir(tmp_path: Path, kind: str) -> Path:
    """Four Fashion-MNIST files: empty, not gzip, or with a label out of 0..9."""
    root = tmp_path / f"fmnist-{kind}"
    root.mkdir()
    images, labels = np.zeros((4, 28, 28)), np.array([0, 1, 12, 3])
    for stem in _IDX_STEMS:
        array = images if "images" in stem else labels
        blob = {"empty": b"", "not-gzip": b"hello, not gzip\n"}.get(kind)
        data = blob if blob is not None else gzip.compress(_idx_bytes(array))
        (root / f"{stem}.gz").write_bytes(data)
    return root


def _edge_file(tmp_path: Path, kind: str) -> Path:
    """A ring of 4 peers whose first edge has a negative, NaN or too large weight."""
    first = {"negative": "-0.25", "nan": "nan", "sum-above-1": "0.75"}[kind]
    path = tmp_path / f"edges-{kind}.txt"
    path.write_text(f"0 1 {first}\n1 2 0.5\n2 3 0.25\n3 0 0.5\n")
    return path


def _deep_toml(tmp_path: Path) -> str:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    return str(path)


def _placeholders(arg: str, tmp_path: Path) -> str:
    """Replace the @NAME@ placeholders of a case by paths made for it."""
    if arg == "@BAD_TOML@":
        return _bad_toml(tmp_path)
    if arg == "@DEEP_TOML@":
        return _deep_toml(tmp_path)
    if arg == "@DIR@":
        return str(tmp_path)
    if arg == "@ODD_KEY_TOML@":
        path = tmp_path / "odd-key.toml"
        path.write_text('[train]\n"x\\ny" = 2\n')
        return str(path)
    for kind in ("empty", "not-gzip", "labels"):
        if f"@FMNIST_{kind}@" in arg:
            arg = arg.replace(f"@FMNIST_{kind}@", str(_fmnist_dir(tmp_path, kind)))
    for kind in ("negative", "nan", "sum-above-1"):
        if f"@EDGES_{kind}@" in arg:
            arg = arg.replace(f"@EDGES_{kind}@", str(_edge_file(tmp_path, kind)))
    return arg


_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
_CPUS = os.cpu_count() or 1
_DIGITS = ["--set", "dataset.name=digits", "--set", "model.name=mlp"]
_PEERS = [*_DIGITS, "--set", "strategy.name=gossip", "--set", "num_clients=4",
          "--set", "clients_per_round=4", "--set", "topology.name=edge-list",
          "--set", "topology.mixing=given"]  # fmt: skip


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
        ["strategy.client_widths: got [1, 2]", "only with strategy 'oneshot' or 'ot'"],
    ),
    # integers that pass every lower bound, but that Flower's run config (64-bit) cannot hold
    (
        "seed-beyond-64-bits",
        ["--set", f"seed={2**63}"],
        [f"seed: got {2**63}; allowed: an integer from -2**63 to 2**63 - 1"],
    ),
    (
        "huge-seed",
        ["--set", "seed=99999999999999999999999"],
        ["seed: got 99999999999999999999999; allowed: an integer from -2**63"],
    ),
    ("huge-epochs", ["--set", f"train.epochs={10**20}"], [f"train.epochs: got {10**20};"]),
    ("huge-in-a-list", ["--set", f"model.hidden=[8, {10**20}]"], [f"model.hidden: got {10**20};"]),
    # TOML's dates and times were a TypeError traceback (not JSON serializable)
    (
        "a-date",
        ["--set", "train.epochs=1979-05-27"],
        ["train.epochs: got 1979-05-27, a TOML date or time; allowed: a number"],
    ),
    (
        "a-time-in-a-list",
        ["--set", "model.hidden=[8, 07:32:00]"],
        ["model.hidden: got 07:32:00, a TOML date or time"],
    ),
    (
        "a-date-time",
        ["--set", "name=1979-05-27T07:32:00Z"],
        ["name: got 1979-05-27T07:32:00+00:00, a TOML date or time"],
    ),
    # str.isdigit() took '²' for a digit; int() then refused it under no key
    (
        "inject-failures-superscript",
        ["--set", 'simulation.inject_failures="1@²"'],
        ["simulation.inject_failures: got '1@²'; allowed: comma-separated PARTITION@ROUND"],
    ),
    ("deeply-nested-toml", ["@DEEP_TOML@"], ["deep.toml", "nested too deeply"]),
    ("set-key-with-line-break", ["--set", "a\nb=1"], ["--set: got 'a\\nb=1'", "dotted key"]),
    ("toml-key-with-line-break", ["@ODD_KEY_TOML@"], ["'train.x\\ny': unknown key"]),
    ("directory-as-scenario", ["@DIR@"], ["scenario", "is not a file"]),
    (
        "more-shards-than-samples",
        [*_DIGITS, "--set", "partition.scheme=shards", "--set", "partition.shards_per_client=1000"],
        ["partition.shards_per_client: got 1000", "1 to 143"],  # 1438 samples // 10 clients
    ),
    (
        "model-too-large-to-allocate",
        [*_DIGITS, "--set", "model.width=100000000"],
        ["model: got", "width=100000000", "fits in this machine's memory"],
    ),
    (
        "client-width-too-large-to-allocate",
        [*_DIGITS, "--set", "strategy.name=ot", "--set", "strategy.client_widths=[100000000]"],
        ["strategy.client_widths: got [100000000], which needs", "fits in this machine's memory"],
    ),
    (
        "byol-predictor-too-large-to-allocate",
        [*_DIGITS, "--set", "task.name=byol", "--set", "task.predictor_hidden=10000000000"],
        ["task: got", "predictor_hidden=10000000000, which needs", "fits in this machine's memory"],
    ),
    (
        "cuda-device-missing",
        [*_DIGITS, "--set", f"device=cuda:{_GPUS}"],
        [f"device: got 'cuda:{_GPUS}'", f"torch sees {_GPUS} CUDA device"],
    ),
    (
        "more-gpus-per-client-than-here",
        [*_DIGITS, "--set", f"simulation.num_gpus_per_client={_GPUS + 1}"],
        [f"simulation.num_gpus_per_client: got {_GPUS + 1}.0", f"0 to {_GPUS}"],
    ),
    (
        "more-cpus-per-client-than-ray-has",
        [*_DIGITS, "--set", f"simulation.num_cpus_per_client={_CPUS + 1}"],
        [f"simulation.num_cpus_per_client: got {_CPUS + 1}", f"1 to {_CPUS}"],
    ),
    (
        "more-cpus-per-client-than-ray-num-cpus",
        [
            *_DIGITS,
            *("--set", "simulation.ray_num_cpus=1"),
            "--set",
            "simulation.num_cpus_per_client=2",
        ],
        ["simulation.num_cpus_per_client: got 2", "1 to 1"],
    ),
    (
        "ray-num-cpus-above-cores",
        [*_DIGITS, "--set", f"simulation.ray_num_cpus={_CPUS * 1000}"],
        [f"simulation.ray_num_cpus: got {_CPUS * 1000}", f"0 (all) to {_CPUS}"],
    ),
    (
        "ray-address-refused",
        [*_DIGITS, "--set", "simulation.ray_address='127.0.0.1:1'"],
        ["simulation.ray_address: got '127.0.0.1:1'", "unreachable: Connection refused"],
    ),
    (
        "ray-address-malformed",
        [*_DIGITS, "--set", "simulation.ray_address='localhost:port'"],
        ["simulation.ray_address: got 'localhost:port'", "HOST:PORT"],
    ),
    (
        "topology-of-server-side-strategy",
        [*_DIGITS, "--set", "topology.name=full"],
        ["topology.name: got 'full'", "peer-side strategy", "(strategy is 'fedavg'"],
    ),
    (
        "topology-option-of-server-side-strategy",
        [*_DIGITS, "--set", "topology.mixing=metropolis"],
        ["topology.mixing: got 'metropolis'", "peer-side strategy"],
    ),
    (
        "inject-failure-partition-out-of-range",
        [*_DIGITS, "--set", "simulation.inject_failures='10@1'"],
        ["simulation.inject_failures: got 10@1", "PARTITION 0 to 9"],
    ),
    (
        "inject-failure-after-last-round",
        [*_DIGITS, "--set", "simulation.inject_failures='1@2,3@6'"],
        ["simulation.inject_failures: got 3@6", "ROUND 1 to 5"],
    ),
    (
        "inject-failure-round-0",
        [*_DIGITS, "--set", "simulation.inject_failures='1@0'"],
        ["simulation.inject_failures: got 1@0", "ROUND 1 to 5"],
    ),
    ("name-escapes-runs-root", [*_DIGITS, "--set", "name='../../..'"], ["name: got '../../..'"]),
    (
        "edge-weight-negative",
        [*_PEERS, "--set", "topology.edge_file='@EDGES_negative@'"],
        ["topology.edge_file: line 1 has weight '-0.25'", "[0, 1]"],
    ),
    (
        "edge-weight-nan",
        [*_PEERS, "--set", "topology.edge_file='@EDGES_nan@'"],
        ["topology.edge_file: line 1 has weight 'nan'", "[0, 1]"],
    ),
    (
        "edge-weights-sum-above-1",  # peer 0: edges (0, 1) and (3, 0), 0.75 + 0.5
        [*_PEERS, "--set", "topology.edge_file='@EDGES_sum-above-1@'"],
        ["peer 0", "sum to 1.250", "at most 1"],
    ),
    (
        "idx-files-empty",
        ["--set", "dataset.root='@FMNIST_empty@'"],
        ["dataset.root", "train-images-idx3-ubyte.gz", "got 0 bytes"],
    ),
    (
        "idx-files-not-gzip",
        ["--set", "dataset.root='@FMNIST_not-gzip@'"],
        ["dataset.root", "train-images-idx3-ubyte.gz", "damaged gzip file"],
    ),
    (
        "idx-labels-out-of-range",
        ["--set", "dataset.root='@FMNIST_labels@'"],
        ["dataset.root", "train-labels-idx1-ubyte.gz", "got label 12", "labels 0 to 9"],
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
    argv = [_placeholders(a.replace("@EMPTY_DIR@", str(empty)), tmp_path) for a in extra]
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


def test_partition_names_the_data_sets_root_as_simulate_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said `root: not set for 'mnist'`, where simulate says `dataset.root: ...`."""
    png = tmp_path / "p.png"
    code = cli.main(["partition", "--set", "dataset.name=mnist", "--out", str(png)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert line.startswith("fedmerge: error: dataset.root: not set for 'mnist'; allowed: ")
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


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert lines[0].startswith("fedmerge: error: "), lines[0]
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


@pytest.mark.parametrize("kind", ["is-a-file", "under-a-file", "component-too-long"])
def test_unusable_run_dir_is_one_line_and_exit_2(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_simulation: list[object]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    run_dir = {
        "is-a-file": a_file,
        "under-a-file": a_file / "run",
        "component-too-long": tmp_path / ("x" * 300) / "run",
    }[kind]
    code = cli.main(["simulate", *_DIGITS, "--run-dir", str(run_dir)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert line.startswith("fedmerge: error: run_dir: got ")
    expected = {
        "is-a-file": f"'{a_file}' is a file",
        "under-a-file": f"'{a_file}' is a file",
        "component-too-long": "component of 300 bytes",
    }[kind]
    assert expected in line
    assert a_file.read_text() == "not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert no_simulation == []


def test_unwritable_run_dir_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_simulation: list[object]
) -> None:
    if os.geteuid() != 0:
        locked = tmp_path / "read-only"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            code = cli.main(["simulate", *_DIGITS, "--run-dir", str(locked / "run")])
        finally:
            locked.chmod(0o755)
        expected = f"'{locked}' is not writable"
    else:  # root writes anywhere on disk, but not into sysfs
        code = cli.main(["simulate", *_DIGITS, "--run-dir", "/sys/fedmerge-run"])
        expected = "/sys/fedmerge-run: got Operation not permitted"
    line = _one_error_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert expected in line
    assert no_simulation == []


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (like a stray proxy)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_ray_address_that_never_answers_is_refused(
    silent_server: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_simulation: list[object],
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(checks, "RAY_CONNECT_TIMEOUT", 0.5)
    address = f"127.0.0.1:{silent_server}"
    code = cli.main(
        ["simulate", *_DIGITS, "--set", f"simulation.ray_address='{address}'",
         "--runs-root", str(tmp_path / "runs")]
    )  # fmt: skip
    line = _one_error_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert f"simulation.ray_address: got '{address}'" in line
    assert "no gRPC server answered" in line
    assert not (tmp_path / "runs").exists()


def test_partition_out_directory_writes_inside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "plots"
    out_dir.mkdir()
    code = cli.main(["partition", *_DIGITS, "--out", str(out_dir)])
    out = capsys.readouterr().out
    expected = out_dir / "partition-default.png"
    assert code == 0
    assert expected.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {expected}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_partition_out_without_png_suffix_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plot.pdf"
    code = cli.main(["partition", *_DIGITS, "--out", str(out)])
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert captured.out == "", "the table was printed before --out was checked"
    assert code == EXIT_BAD_INPUT
    assert f"--out: got '{out}'" in line and "a .png file or a directory" in line
    assert not out.exists()


def _raise(exc: BaseException) -> Callable[[object], int]:
    def command(args: object) -> int:
        raise exc

    return command


def _patch_command(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    parser = cli.build_parser

    def patched() -> object:
        """The real parser, its ``strategies`` command replaced by one that raises ``exc``."""
        p = parser()
        p._subparsers._group_actions[0].choices["strategies"].set_defaults(func=_raise(exc))
        return p

    monkeypatch.setattr(cli, "build_parser", patched)


@pytest.mark.parametrize(
    ("exc", "needles"),
    [
        (
            PermissionError(13, "Permission denied", "/srv/runs/x/metrics.jsonl"),
            ["/srv/runs/x/metrics.jsonl: got Permission denied"],
        ),
        (OSError(28, "No space left on device", "/srv/runs"), ["/srv/runs: got No space left"]),
        (RecursionError("maximum recursion depth exceeded"), ["nested too deeply"]),
        (MemoryError(), ["does not fit in memory"]),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"),
            ["does not fit in memory"],
        ),
        (  # a line of fedmerge's own, raised as an OSError (a data set's missing files)
            FileNotFoundError("root: '/x' is not a directory; allowed: a directory with MNIST"),
            ["fedmerge: error: root: '/x' is not a directory; allowed: a directory with MNIST"],
        ),
    ],
    ids=["permission", "disk-full", "recursion", "memory", "torch-allocator", "own-line"],
)
def test_main_turns_input_errors_into_one_line(
    exc: BaseException,
    needles: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _patch_command(monkeypatch, exc)
    code = cli.main(["strategies"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    for needle in needles:
        assert needle in line


def test_ctrl_c_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _patch_command(monkeypatch, KeyboardInterrupt())
    code = cli.main(["strategies"])
    err = capsys.readouterr().err
    assert code == 130
    # a command that trains nothing has no rounds to keep
    assert err == "fedmerge: interrupted: the processes it started are stopped\n"


def test_ctrl_c_in_a_simulation_says_its_rounds_are_kept(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sims.commands

    monkeypatch.setattr(sims.commands, "cmd_simulate", _raise(KeyboardInterrupt()))
    code = cli.main(["simulate"])
    err = capsys.readouterr().err
    assert code == 130
    assert err.startswith("fedmerge: interrupted: the processes it started are stopped; ")
    assert "finished rounds are kept (run the same command again to resume" in err
    assert len(err.splitlines()) == 1


def test_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _patch_command(monkeypatch, KeyError("rows"))
    code = cli.main(["strategies"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "KeyError: 'rows'" in err
    assert err.splitlines()[-1].startswith("fedmerge: internal error (KeyError), a bug")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGINT, 130, "fedmerge: interrupted: the processes it started are stopped\n"),
     (signal.SIGHUP, 129, ""), (signal.SIGTERM, 143, "")],
    ids=["ctrl-c", "terminal-closed", "sigterm"],
)  # fmt: skip
def test_a_signal_unwinds_the_command_in_a_subprocess(
    signum: signal.Signals, code: int, said: str, tmp_path: Path
) -> None:
    """Ctrl-C, a closed terminal (SIGHUP) and SIGTERM exit through Python's unwinding: the
    command's ``finally`` clauses run (so what it started is stopped), no traceback; Ctrl-C
    says so in one line. SIGHUP used to end the process at once."""
    marker = tmp_path / "unwound"
    script = (
        "import sys, time\n"
        "from sims import cli\n"
        "def wait(args):\n"
        "    try:\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(60)\n"
        "    finally:\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "    return 0\n"
        "p = cli.build_parser\n"
        "def patched():\n"
        "    parser = p()\n"
        "    parser._subparsers._group_actions[0].choices['strategies'].set_defaults(func=wait)\n"
        "    return parser\n"
        "cli.build_parser = patched\n"
        "sys.exit(cli.main(['strategies']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        # A shell without job control starts background jobs with SIGINT ignored,
        # and Python keeps an ignored SIGINT ignored: give the child the default,
        # and no blocked mask (inherited through fork and exec) that holds it back.
        preexec_fn=_default_sigint,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert err == said and marker.exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["simulate", "--set", "-x=1"], "fedmerge simulate: argument --set: expected one argument"),
        (["simulate", "--bogus"], "unrecognized arguments: --bogus"),
        (["simulat"], "invalid choice: 'simulat'"),
    ],
    ids=["set-key-like-an-option", "unknown-option", "unknown-command"],
)
def test_usage_errors_are_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert exited.value.code == EXIT_BAD_INPUT
    assert needle in line and line.endswith("--help")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["federation", "up", ""], "argument DIR"),
        (["partition", "--out", ""], "argument --out"),
        (["run-config", "-o", ""], "argument -o/--out"),
        (["simulate", "--run-dir", ""], "argument --run-dir"),
        (["compare", "sims/sweeps/smoke.toml", "--runs-root", ""], "argument --runs-root"),
        (["report", ""], "argument RUN_DIR"),
        (["status", ""], "argument RUN_DIR"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else None,
)
def test_an_empty_path_is_refused_not_taken_for_this_directory(
    argv: list[str],
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`federation up ''` started a federation in the working directory, `--out ''` wrote there."""
    monkeypatch.chdir(tmp_path)
    if argv[0] == "compare":
        argv = [argv[0], str(REPO / argv[1]), *argv[2:]]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert exited.value.code == EXIT_BAD_INPUT
    assert f"{named}: got ''; allowed: a non-empty path" in line
    assert list(tmp_path.iterdir()) == []


def test_matplotlib_is_imported_only_when_a_figure_is_drawn(tmp_path: Path) -> None:
    """A command that draws nothing (bad input, say) does not pay for matplotlib's import."""
    code = (
        "import sys\n"
        "import sims.cli, sims.commands, sims.compare, sims.report\n"
        "print('matplotlib' in sys.modules)\n"
        "from sims.plots import plot_partition\n"
        "import numpy as np, pathlib\n"
        f"out = pathlib.Path({str(tmp_path / 'p.png')!r})\n"
        "plot_partition(np.array([[3, 1], [0, 2]]), out, 't')\n"
        "import matplotlib\n"
        "print(out.read_bytes()[:4] == b'\\x89PNG', matplotlib.get_backend())\n"
    )
    assert run_fresh(code).split() == ["False", "True", "Agg"]


@pytest.mark.parametrize("flag", ["--out", "--runs-root"])
def test_compare_checks_where_it_writes_before_any_run(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def ran(*args: object) -> None:
        raise AssertionError("the sweep ran before its output folder was checked")

    monkeypatch.setattr(commands, "_compare_locked", ran)
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    sweep = tmp_path / "tiny.toml"
    sweep.write_text('name = "tiny"\nbase = "default"\n[axes]\nseed = [0, 1]\n')
    argv = ["compare", str(sweep), "--runs-root", str(tmp_path / "runs"), flag, str(afile)]
    assert cli.main(argv) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert line.startswith(f"fedmerge: error: {flag}: got ") and f"but '{afile}' is a file" in line
    assert captured.out == "" and afile.read_text() == "mine\n"


def test_simulate_refuses_a_sweeps_folder_as_its_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_simulation: list[object]
) -> None:
    """Its files would land beside the sweep's run folders, and ``report`` on the folder would
    then show this one run instead of the sweep's."""
    (tmp_path / "sweep.json").write_text('{"runs": []}\n')
    assert cli.main(["simulate", *_DIGITS, "--run-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert f"run_dir: got '{tmp_path}', the folder of a sweep (it holds sweep.json)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "sweep.json"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [(["report", "@T@/nowhere"], "run_dir: '@T@/nowhere' does not exist; allowed: a run "
      "directory, or a sweep folder (RUNS_ROOT/SWEEP_NAME) for all its runs"),
     (["report", "@T@/afile"], "run_dir: '@T@/afile' is not a directory; allowed: a run "
      "directory, or a sweep folder"),
     (["report", "@T@/sweep"], "run_dir: '@T@/sweep' is a sweep folder that holds no run yet; "
      "allowed: a sweep folder with runs (fedmerge compare writes them), or a run directory"),
     (["compare", "@T@/sweep"], "sweep: '@T@/sweep' is not a file; allowed: a sweep TOML file"),
     (["compare", "@T@/tiny.toml", "--set", "rounds=0"],
      "--set: rounds: got 0; allowed: greater than or equal to 1"),
     (["compare", "@T@/zero.toml"], "zero.toml, set: rounds: got 0; allowed: greater than or "
      "equal to 1")],
    ids=["report-nowhere", "report-file", "report-empty-sweep", "compare-folder",
         "compare-command-line-set", "compare-file-set"],
)  # fmt: skip
def test_what_the_message_names_is_what_was_wrong(
    argv: list[str], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text('{"runs": []}\n')
    (tmp_path / "tiny.toml").write_text('name = "tiny"\nbase = "default"\n[axes]\nseed = [0]\n')
    (tmp_path / "zero.toml").write_text('name = "z"\nbase = "default"\n[set]\nrounds = 0\n')
    argv = [a.replace("@T@", str(tmp_path)) for a in argv]
    assert cli.main(argv) == EXIT_BAD_INPUT
    got = _one_error_line(capsys.readouterr().err)
    assert got.startswith("fedmerge: error: " + line.replace("@T@", str(tmp_path)))
