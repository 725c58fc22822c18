"""``fedmerge compare``: paired sweeps through the real simulation path, cached by digest.

The module runs five real simulations on the session's Ray cluster: one
interrupted run (killed with SIGTERM after round 1), the sweep's four runs
(two strategies x two seeds; the interrupted one resumes), and one
uninterrupted reference run of the interrupted scenario.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sims import cli, compare
from sims.launch import simulate
from sims.runs import read_json
from sims.scenario_files import load_scenario
from strategies.config import RunConfig, run_config_from_dict
from strategies.federation import Federation
from strategies.plugins import plugin_names

REPO = Path(__file__).resolve().parents[2]
EXIT_BAD_INPUT = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGET = 0.5

# The sweep's fixed part, once as --set overrides (to derive digests and run
# the interrupted run by hand) and once as the sweep file's [set] table.
FIXED = [
    "rounds=2",
    "train.max_steps=40",
    "evaluation.test_samples=2000",
    "num_clients=4",
    "clients_per_round=2",
    "partition.scheme='dirichlet'",
    "partition.alpha=0.5",
]
STRATEGIES = {"fedavg": ["strategy.name='fedavg'"],
              "fedprox": ["strategy.name='fedprox'", "strategy.prox_mu=0.1"]}  # fmt: skip
SEEDS = (0, 1)


def _sweep_text(ray_address: str) -> str:
    return f"""
name = "pair"
base = "default"
target_accuracy = {TARGET}

[set]
rounds = 2
train.max_steps = 40
evaluation.test_samples = 2000
num_clients = 4
clients_per_round = 2
partition.scheme = "dirichlet"
partition.alpha = 0.5
simulation.ray_address = "{ray_address}"

[[variants]]
strategy.name = "fedavg"

[[variants]]
strategy.name = "fedprox"
strategy.prox_mu = 0.1

[axes]
seed = [0, 1]
"""


def _overrides(ray_address: str, strategy: str, seed: int) -> list[str]:
    return [
        *FIXED,
        f"simulation.ray_address='{ray_address}'",
        *STRATEGIES[strategy],
        f"seed={seed}",
    ]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def _snapshot(root: Path) -> dict[str, int]:
    """Modification times (ns) of every file under the sweep's run directories.

    Lock files are left out: every ``compare`` takes the locks again.
    """
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in sorted(root.rglob("*"))
        if p.is_file() and "report" not in p.relative_to(root).parts and p.name != ".lock"
    }


def _logs(sweep_dir: Path) -> str:
    """The ends of the sweep's Flower and runtime logs, for a failed sweep's message."""
    return "".join(
        f"\n--- {log.relative_to(sweep_dir)}\n" + "\n".join(log.read_text().splitlines()[-40:])
        for log in sorted(sweep_dir.rglob("*.log"))
    )


@dataclass
class Compared:
    sweep: Path
    runs_root: Path
    run_dirs: dict[tuple[str, int], Path]  # (strategy, seed) -> run dir
    scenarios: dict[tuple[str, int], RunConfig]
    calls: list[str]  # digests that compare's simulate was called with
    killed_checkpoint: dict
    reference: Path  # uninterrupted run of the killed scenario
    stdout: str


def _kill_after_round_1(scenario: RunConfig, overrides: list[str], run_dir: Path) -> dict:
    """Run ``fedmerge simulate`` into ``run_dir``, SIGTERM it once round 1 is checkpointed."""
    argv = [sys.executable, "-m", "sims.cli", "simulate", "default", "--run-dir", str(run_dir)]
    for item in overrides:
        argv += ["--set", item]
    log = run_dir.parents[1] / "killed.log"  # beside the sweep's directory, not in it
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            ckpt = read_json(run_dir / "checkpoint.json")
            rounds = (
                [r["round"] for r in _rows(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
            )
            if 1 in rounds and ckpt.get("round", -1) >= 1:
                break
            assert proc.poll() is None, (
                f"simulate exited early with {proc.returncode}: {log.read_text()[-3000:]}"
            )
            time.sleep(0.05)
        else:
            raise AssertionError("round 1 was never checkpointed")
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (run_dir / "summary.json").exists(), (
        "the run finished, or recorded a failure, after it was killed: "
        + (run_dir / "summary.json").read_text()
    )
    checkpoint = json.loads((run_dir / "checkpoint.json").read_text())
    assert checkpoint["digest"] == scenario.digest()
    # Nothing was recorded after the kill (the ServerApp is stopped first): round 2
    # takes seconds, the kill follows round 1's checkpoint within 0.05 s.
    assert checkpoint["round"] == 1
    assert [r["round"] for r in _rows(run_dir)] == [0, 1]
    return checkpoint


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Iterator[Compared]:
    # The sweep starts its own runtime and Ray head with every core, as `fedmerge compare`
    # does: two runs at a time need two CPUs, more than a pytest worker's Ray head has.
    # The killed run and the reference run join the session's Ray head (where a run
    # executes is not part of its digest).
    session_head = ray_address
    ray_address = ""
    tmp = tmp_path_factory.mktemp("compare")
    sweep = tmp / "pair.toml"
    sweep.write_text(_sweep_text(ray_address))
    runs_root = tmp / "runs"
    scenarios = {
        (s, seed): load_scenario(None, _overrides(ray_address, s, seed))
        for s in STRATEGIES
        for seed in SEEDS
    }
    run_dirs = {k: runs_root / "pair" / sc.digest() for k, sc in scenarios.items()}

    killed = ("fedavg", 0)
    checkpoint = _kill_after_round_1(
        scenarios[killed], _overrides(session_head, *killed), run_dirs[killed]
    )

    calls: list[str] = []

    def recording_simulate(scenario: RunConfig, run_dir: Path, **kwargs: object) -> dict:
        calls.append(scenario.digest())
        return simulate(scenario, run_dir, **kwargs)  # type: ignore[arg-type]

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(compare, "simulate", recording_simulate)
        # Two at a time on one runtime: the numbers must not depend on it.
        code = cli.main(["compare", str(sweep), "--runs-root", str(runs_root), "--parallel", "2"])
    assert code == 0, out.getvalue() + _logs(runs_root / "pair")

    reference = tmp / "reference"
    simulate(load_scenario(None, _overrides(session_head, *killed)), reference)
    yield Compared(
        sweep, runs_root, run_dirs, scenarios, calls, checkpoint, reference, out.getvalue()
    )


# -- the sweep ran every combination once -------------------------------------------


def test_every_combination_ran_once_into_its_digest_dir(compared: Compared) -> None:
    assert sorted(compared.calls) == sorted(s.digest() for s in compared.scenarios.values())
    for key, run_dir in compared.run_dirs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["digest"] == compared.scenarios[key].digest() == run_dir.name
        assert (
            json.loads((run_dir / "config.json").read_text()) == compared.scenarios[key].to_dict()
        )
        assert [r["round"] for r in _rows(run_dir)] == [0, 1, 2]
    manifest = json.loads((compared.runs_root / "pair" / "sweep.json").read_text())
    assert sorted(r["digest"] for r in manifest["runs"]) == sorted(compared.calls)


def test_progress_has_one_line_per_run(compared: Compared) -> None:
    lines = [x for x in compared.stdout.splitlines() if x.startswith("[")]
    assert len(lines) == 4, compared.stdout
    assert sum("resumed" in x for x in lines) == 1
    assert all("/4] " in x and "final " in x for x in lines)
    assert "1 to resume, 3 new" in compared.stdout


# -- pairing --------------------------------------------------------------------------


def test_strategies_are_paired_by_seed(compared: Compared) -> None:
    """Same seed: same partitions, initial weights and sampled clients, whatever the strategy."""
    initial = {}
    for seed in SEEDS:
        avg, prox = (compared.run_dirs[(s, seed)] for s in ("fedavg", "fedprox"))
        sa, sp = (json.loads((d / "summary.json").read_text()) for d in (avg, prox))
        assert sa["initial_hash"] == sp["initial_hash"]
        assert sa["partition_hash"] == sp["partition_hash"]
        ra, rp = _rows(avg), _rows(prox)
        assert [r["sampled"] for r in ra] == [r["sampled"] for r in rp]
        assert all(len(r["sampled"]) == 2 for r in ra[1:])
        assert ra[0]["accuracy"] == rp[0]["accuracy"]  # the same initial model
        assert ra[-1]["accuracy"] != rp[-1]["accuracy"]  # the strategies did differ
        initial[seed] = sa["initial_hash"], sa["partition_hash"]
    # the hashes do depend on the seed, so equality above is not vacuous
    assert initial[0][0] != initial[1][0] and initial[0][1] != initial[1][1]


# -- cache and resume -----------------------------------------------------------------


def test_interrupted_run_resumed_with_the_numbers_of_an_uninterrupted_one(
    compared: Compared,
) -> None:
    assert compared.killed_checkpoint["round"] >= 1
    resumed = compared.run_dirs[("fedavg", 0)]
    assert json.loads((resumed / "timing.json").read_text())["resumed"] is True
    for a, b in zip(_rows(resumed), _rows(compared.reference), strict=True):
        for key in ("round", "accuracy", "loss", "train_loss", "sampled", "bytes_up"):
            assert a[key] == b[key], key
    wa, wb = (
        load_file(str(resumed / "model.safetensors")),
        load_file(str(compared.reference / "model.safetensors")),
    )
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)


def test_second_compare_is_a_cache_hit(
    compared: Compared, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_dir = compared.runs_root / "pair"
    before = _snapshot(sweep_dir)
    calls: list[object] = []
    monkeypatch.setattr(compare, "simulate", lambda *a, **k: calls.append(a))
    assert cli.main(["compare", str(compared.sweep), "--runs-root", str(compared.runs_root)]) == 0
    out = capsys.readouterr().out
    assert calls == []
    assert "4 cached, 0 to resume, 0 new" in out
    after = _snapshot(sweep_dir)
    after.pop("sweep.json")  # the manifest is rewritten, the runs are not
    before.pop("sweep.json")
    assert after == before


def test_force_deletes_and_reruns_every_run(
    compared: Compared, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runs_root = tmp_path / "runs"
    shutil.copytree(compared.runs_root / "pair", runs_root / "pair")
    originals = {d.name: d for d in compared.run_dirs.values()}
    calls: list[str] = []

    def fake_simulate(scenario: RunConfig, run_dir: Path, **kwargs: object) -> dict:
        # --force empties the run directory first; only the run's lock is left
        assert [p.name for p in run_dir.iterdir()] == [".lock"], "old run not deleted"
        calls.append(scenario.digest())
        shutil.copytree(originals[scenario.digest()], run_dir, dirs_exist_ok=True)
        (run_dir / "timing.json").unlink()
        return {**json.loads((run_dir / "summary.json").read_text()), "wall_time": 1.0}

    monkeypatch.setattr(compare, "simulate", fake_simulate)
    args = ["compare", str(compared.sweep), "--runs-root", str(runs_root), "--force",
            "--tensorboard"]  # fmt: skip
    assert cli.main(args) == 0
    assert sorted(calls) == sorted(originals)
    for name in originals:
        assert (runs_root / "pair" / name / "tensorboard").is_dir()
        assert json.loads((runs_root / "pair" / name / "timing.json").read_text()) == {
            "wall_time": 1.0,
            "resumed": False,
        }


# -- report ---------------------------------------------------------------------------


def _expected_table(compared: Compared) -> dict[str, dict[str, float]]:
    """Mean and sample std over seeds, recomputed from metrics.jsonl by hand."""

    def stats(xs: list[float]) -> tuple[float, float]:
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = {}
    for strategy in STRATEGIES:
        finals, bests, reach, total = [], [], [], []
        for seed in SEEDS:
            rows = _rows(compared.run_dirs[(strategy, seed)])
            finals.append(rows[-1]["accuracy"])
            bests.append(max(r["accuracy"] for r in rows))
            hit = [r["round"] for r in rows if r["accuracy"] >= TARGET]
            if hit:
                reach.append(float(min(hit)))
            total.append(float(sum(r["bytes_up"] + r["bytes_down"] for r in rows)))
        out[strategy] = {
            "final_accuracy": stats(finals),
            "best_accuracy": stats(bests),
            "bytes_total": stats(total),
            "target_reached": len(reach),
            "rounds_to_target": stats(reach) if len(reach) > 1 else None,
        }
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_table_equals_numbers_recomputed_from_metrics(compared: Compared) -> None:
    report = compared.runs_root / "pair" / "report"
    rows = {r["strategy.name"]: r for r in _csv(report / "summary.csv")}
    assert set(rows) == set(STRATEGIES)
    expected = _expected_table(compared)
    md = (report / "summary.md").read_text()
    for strategy, exp in expected.items():
        row = rows[strategy]
        assert int(row["seeds"]) == 2 and row["seed_list"] == "0 1"
        for key in ("final_accuracy", "best_accuracy", "bytes_total"):
            mean, std = exp[key]
            assert float(row[f"{key}_mean"]) == pytest.approx(mean, abs=1e-12)
            assert float(row[f"{key}_std"]) == pytest.approx(std, abs=1e-9)
        assert int(row["target_reached"]) == exp["target_reached"]
        if exp["rounds_to_target"] is not None:
            assert float(row["rounds_to_target_mean"]) == exp["rounds_to_target"][0]
        mean, std = exp["final_accuracy"]
        assert f"{mean:.4f} ± {std:.4f}" in md
    assert md.count("\n| fed") == 2


def test_plots_are_pngs_of_nontrivial_size(compared: Compared) -> None:
    report = compared.runs_root / "pair" / "report"
    for name in ("accuracy_rounds.png", "accuracy_bytes.png", "client_accuracy.png"):
        data = (report / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5_000, (name, len(data))


def test_client_accuracy_is_the_final_model_on_each_clients_data(compared: Compared) -> None:
    run_dir = compared.run_dirs[("fedprox", 1)]
    cached = json.loads((run_dir / "client_accuracy.json").read_text())["accuracy"]
    scenario = run_config_from_dict(json.loads((run_dir / "config.json").read_text()))
    fed = Federation(scenario)
    model = fed.initial_model()
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    with torch.no_grad():
        expected = [
            (model(x).argmax(1) == y).double().mean().item()
            for x, y in (fed.client_data(pid) for pid in range(scenario.num_clients))
        ]
    assert len(cached) == 4
    assert cached == pytest.approx(expected, abs=1e-9)
    assert len(set(cached)) > 1  # clients with skewed labels do differ


def test_report_rebuilds_the_same_tables_from_run_dirs(
    compared: Compared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dirs = [str(d) for d in compared.run_dirs.values()]
    assert cli.main(["report", *dirs, "--out", str(tmp_path), "--target", str(TARGET)]) == 0
    original = compared.runs_root / "pair" / "report"
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == (
        original / "summary.csv"
    ).read_text().splitlines()[0]
    by_strategy = {r["strategy.name"]: r for r in _csv(tmp_path / "summary.csv")}
    for r in _csv(original / "summary.csv"):
        assert by_strategy[r["strategy.name"]] == r
    assert (tmp_path / "accuracy_rounds.png").read_bytes()[:8] == PNG_MAGIC
    assert "final accuracy" in capsys.readouterr().out


# -- bad sweep files ------------------------------------------------------------------


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []

    def fake_simulate(*args: object, **kwargs: object) -> dict:
        calls.append(args)
        raise AssertionError("a run started despite a bad sweep")

    monkeypatch.setattr(compare, "simulate", fake_simulate)
    return calls


GOOD_SET = "[set]\nrounds = 2\nnum_clients = 4\nclients_per_round = 2\n"
BAD = [
    ("unknown-sweep-key", 'strategies = ["fedavg"]\n', [], ["strategies", "unknown sweep key"]),
    ("unknown-key", GOOD_SET + "[axes]\ntrain.lrr = [0.1]\n", [], ["train.lrr", "unknown"]),
    ("unknown-section", GOOD_SET + '[axes]\noptimizer.name = ["adam"]\n', [],
     ["optimizer.name", "optimizer: unknown key"]),
    ("unknown-strategy", GOOD_SET + '[axes]\nstrategy.name = ["fedavg", "scaffold"]\n', [],
     ["strategy.name", "'scaffold'", plugin_names()[-1]]),
    ("bad-variant", GOOD_SET + '[[variants]]\nstrategy.name = "nope"\n', [],
     ["variants", "strategy.name", "'nope'"]),
    ("bad-value", GOOD_SET + "[axes]\npartition.alpha = [0.5, -1.0]\n", [],
     ["partition.alpha", "-1.0"]),
    ("axis-not-a-list", GOOD_SET + "[axes]\nseed = 3\n", [], ["seed", "non-empty list"]),
    ("empty-axis", GOOD_SET + "[axes]\nseed = []\n", [], ["seed", "non-empty list"]),
    ("duplicate-value", GOOD_SET + "[axes]\nseed = [0, 0]\n", [], ["seed", "twice"]),
    ("bad-option", "[set]\nclients_per_round = 4\n[axes]\nnum_clients = [4, 3]\n", [],
     ["axes", "num_clients=3", "clients_per_round", "4"]),
    # each value is valid on the base (10 clients, 1 per round); one pair is not
    ("bad-combination", 'base = "base.toml"\n[[variants]]\nclients_per_round = 1\n'
     "[[variants]]\nclients_per_round = 4\n[axes]\nnum_clients = [4, 3]\n", [],
     ["combination", "clients_per_round=4", "num_clients=3", "got 4"]),
    ("fixed-and-varied", "[set]\nseed = 1\n[axes]\nseed = [0, 1]\n", [], ["seed", "also varied"]),
    ("set-flag-and-varied", GOOD_SET + "[axes]\nseed = [0, 1]\n", ["--set", "seed=3"],
     ["--set", "seed", "also varied"]),
    ("bad-base", 'base = "nope"\n', [], ["base", "'nope'"]),
    ("malformed", "[set]\nrounds = = 2\n", [], ["not valid TOML"]),
    ("bad-target", "target_accuracy = 1.5\n", [], ["target_accuracy", "1.5"]),
    ("client-without-data", "[set]\ndataset.name = 'digits'\nmodel.name = 'mlp'\n"
     "num_clients = 5000\nclients_per_round = 1\n", [], ["num_clients", "5000"]),
    ("missing-file", None, [], ["sweep", "does not exist"]),
    # expanded, it would fill the memory before the first run started
    ("too-many-runs", GOOD_SET + f"[axes]\nseed = {list(range(150))}\n"
     f"train.epochs = {list(range(1, 71))}\n", [],
     ["10,500 combinations", "150 seed x 70 train.epochs", "at most 10,000"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "extra", "needles"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_sweep_is_one_line_and_exit_2(
    text: str | None,
    extra: list[str],
    needles: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_simulation: list[object],
) -> None:
    sweep = tmp_path / "bad.toml"
    if text is not None:
        sweep.write_text(text)
    (tmp_path / "base.toml").write_text("num_clients = 10\nclients_per_round = 1\n")
    runs = tmp_path / "runs"
    code = cli.main(["compare", str(sweep), "--runs-root", str(runs), *extra])
    out, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedmerge: error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert out == ""
    assert no_simulation == []
    assert not runs.exists()


def test_bad_sweep_in_a_subprocess_exits_2_with_one_line(tmp_path: Path) -> None:
    sweep = tmp_path / "bad.toml"
    sweep.write_text('[axes]\nstrategy.name = ["fedavg", "scaffold"]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "sims.cli", "compare", str(sweep),
         "--runs-root", str(tmp_path / "r")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == EXIT_BAD_INPUT
    assert len(proc.stderr.splitlines()) == 1 and "'scaffold'" in proc.stderr
    assert proc.stdout == ""


# -- expansion (no simulation) --------------------------------------------------------


def test_axes_of_tables_zip_their_keys_and_seeds_vary_slowest(tmp_path: Path) -> None:
    sweep = tmp_path / "grid.toml"
    sweep.write_text(
        "[set]\nrounds = 1\n[axes]\nseed = [3, 4]\n"
        'partition = [{scheme = "iid"}, {scheme = "pathological", classes_per_client = 3}]\n'
        'strategy = [{name = "fedavg"}, {name = "fedprox", prox_mu = 0.5}]\n'
    )
    combos = compare.expand(compare.load_sweep(sweep))
    assert len(combos) == 2 * 2 * 2
    assert [sc.seed for _, sc in combos] == [3] * 4 + [4] * 4
    seen = {(sc.partition.scheme, sc.partition.classes_per_client, sc.strategy.name,
             getattr(sc.strategy.options, "prox_mu", None), sc.seed)
            for _, sc in combos}  # fmt: skip
    default = RunConfig()
    expected = {
        (scheme, cpc, name, mu, seed)
        for scheme, cpc in (("iid", default.partition.classes_per_client), ("pathological", 3))
        for name, mu in (("fedavg", None), ("fedprox", 0.5))  # prox_mu: fedprox only
        for seed in (3, 4)
    }
    assert seen == expected
    assert all(sc.rounds == 1 for _, sc in combos)
    assert len({sc.digest() for _, sc in combos}) == 8


def test_shipped_sweeps_expand(tmp_path: Path) -> None:
    niid = compare.expand(compare.load_sweep(REPO / "sims/sweeps/niid_bench_fmnist.toml"))
    assert len(niid) == 5 * 2 * 3
    settings = {(s.partition.scheme, s.partition.classes_per_client if s.partition.scheme ==
                 "pathological" else None) for _, s in niid}  # fmt: skip
    assert settings == {("iid", None), ("dirichlet", None), ("pathological", 1),
                        ("pathological", 2), ("pathological", 3)}  # fmt: skip
    assert {s.num_clients for _, s in niid} == {10}
    assert {s.strategy.name for _, s in niid} == {"fedavg", "fedprox"}
    smoke = compare.expand(compare.load_sweep(REPO / "sims/sweeps/smoke.toml"))
    assert len(smoke) == 4 and {s.rounds for _, s in smoke} == {2}
