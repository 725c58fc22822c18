"""Run directories: another scenario's run, damaged checkpoints and metrics, the lock.

Run directories are written by hand here (rows as plain JSON, checkpoints by
the recorder's own writer), so no test starts Flower or Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sims import checks, cli, commands, launch
from sims.compare import load_sweep, plan_sweep
from sims.launch import SimulationError
from sims.scenario_files import load_scenario
from strategies.checkpoint import (
    METADATA_KEY,
    CheckpointError,
    checkpoint_metadata,
    read_checkpoint,
    resume_rows,
)
from strategies.config import ConfigError, RunConfig
from strategies.recorder import RoundRecorder
from strategies.run_log import RunLog

REPO = Path(__file__).resolve().parents[2]
EXIT_BAD_INPUT = 2
SETS = ["dataset.name=digits", "model.name=mlp", "rounds=3"]


def _argv(*extra: str) -> list[str]:
    return [a for s in SETS for a in ("--set", s)] + list(extra)


def _scenario(*extra: str) -> RunConfig:
    return load_scenario(None, [*SETS, *extra])


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), value), "b": torch.arange(4, dtype=torch.float32) + value}


def _write_rows(run_dir: Path, rounds: list[int], *, extra_lines: tuple[str, ...] = ()) -> None:
    lines = [json.dumps({"round": r, "accuracy": 0.1 * r, "loss": 2.0 - r}) for r in rounds]
    (run_dir / "metrics.jsonl").write_text("".join(f"{x}\n" for x in [*lines, *extra_lines]))


def _prepare(run_dir: Path, config: RunConfig, *, checkpoint_round: int = 2) -> RoundRecorder:
    """A run of ``config`` stopped after ``checkpoint_round``: config, rows, checkpoint."""
    log = RunLog(run_dir)
    log.write_json("config.json", config.to_dict())
    _write_rows(run_dir, list(range(checkpoint_round + 1)))
    recorder = RoundRecorder(config, log, torch.nn.Linear(1, 1), None)  # type: ignore[arg-type]
    recorder.checkpoint(checkpoint_round, _state(checkpoint_round), {"calls": checkpoint_round})
    return recorder


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.name != ".lock"}


class _Launched(SimulationError):
    pass


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Replace the Flower launch: record the run directory's files, then stop."""
    calls: list[dict[str, object]] = []

    def fake_simulate(scenario: RunConfig, run_dir: Path, **kwargs: object) -> dict:
        calls.append({"digest": scenario.digest(), "files": sorted(os.listdir(run_dir))})
        raise _Launched("stopped by the test")

    monkeypatch.setattr(commands, "simulate", fake_simulate)
    return calls


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert "Traceback" not in err
    return lines[0]


# -- the checkpoint as one unit ----------------------------------------------------------
def test_checkpoint_weights_carry_their_round_and_json_their_hash(tmp_path: Path) -> None:
    config = _scenario()
    _prepare(tmp_path, config, checkpoint_round=2)
    weights = tmp_path / "checkpoint.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
    assert header == {"round": 2, "digest": config.digest(), "sampler_state": {"calls": 2}}
    mirror = json.loads((tmp_path / "checkpoint.json").read_text())
    assert mirror["round"] == 2 and mirror["digest"] == config.digest()
    assert mirror["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    loaded = load_file(str(weights))
    for key, value in _state(2).items():
        torch.testing.assert_close(loaded[key], value)


def test_recorder_resumes_from_a_checked_checkpoint(tmp_path: Path) -> None:
    config = _scenario()
    _prepare(tmp_path, config, checkpoint_round=2)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "accuracy": 0.3, "lo')  # round 3 was cut off mid-line
    recorder = RoundRecorder(config, RunLog(tmp_path), torch.nn.Linear(1, 1), None)  # type: ignore[arg-type]
    resume = recorder.begin()
    assert resume is not None
    assert resume.round == 2 and resume.sampler_state == {"calls": 2}
    assert [r["round"] for r in resume.rows] == [0, 1, 2]
    for key, value in _state(2).items():
        torch.testing.assert_close(resume.state[key], value)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2]


def test_recorder_refuses_weights_of_another_round(tmp_path: Path) -> None:
    """The ServerApp side of the check (the CLI runs it too, before launch)."""
    config = _scenario()
    recorder = _prepare(tmp_path, config, checkpoint_round=1)
    old_weights = (tmp_path / "checkpoint.safetensors").read_bytes()
    _write_rows(tmp_path, [0, 1, 2])
    recorder.checkpoint(2, _state(2), {"calls": 2})
    (tmp_path / "checkpoint.safetensors").write_bytes(old_weights)
    rows_before = (tmp_path / "metrics.jsonl").read_bytes()
    fresh = RoundRecorder(config, RunLog(tmp_path), torch.nn.Linear(1, 1), None)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: got round 2 .* round 1"):
        fresh.begin()
    assert (tmp_path / "metrics.jsonl").read_bytes() == rows_before, "rows were touched"


def test_stop_between_the_two_writes_resumes_from_the_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], launches: list[dict[str, object]]
) -> None:
    """Weights of round 2 written, checkpoint.json still of round 1: round 2 is exact."""
    config = _scenario()
    recorder = _prepare(tmp_path, config, checkpoint_round=1)
    _write_rows(tmp_path, [0, 1, 2])
    recorder.log.save_tensors(
        "checkpoint.safetensors", _state(2), checkpoint_metadata(2, config.digest(), {"calls": 2})
    )
    assert json.loads((tmp_path / "checkpoint.json").read_text())["round"] == 1
    fresh = RoundRecorder(config, RunLog(tmp_path), torch.nn.Linear(1, 1), None)  # type: ignore[arg-type]
    resume = fresh.begin()
    assert resume is not None and resume.round == 2 and resume.sampler_state == {"calls": 2}
    torch.testing.assert_close(resume.state["w"], _state(2)["w"])
    code = cli.main(["simulate", *_argv("--run-dir", str(tmp_path))])
    assert code == 1 and "stopped by the test" in capsys.readouterr().err
    assert len(launches) == 1


def test_rows_after_the_checkpoint_are_dropped(tmp_path: Path) -> None:
    _write_rows(tmp_path, [0, 1, 2, 3], extra_lines=('{"round": 4, "acc',))
    rows = resume_rows(tmp_path, 2)
    assert [r["round"] for r in rows] == [0, 1, 2]


# -- the CLI before launch -----------------------------------------------------------------
def test_run_dir_of_another_scenario_is_refused_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], launches: list[dict[str, object]]
) -> None:
    other = _scenario("seed=1")
    _prepare(tmp_path, other)
    before = _snapshot(tmp_path)
    code = cli.main(["simulate", *_argv("--run-dir", str(tmp_path))])
    line = _one_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert line.startswith(f"fedmerge: error: run_dir: '{tmp_path}' holds a run of another")
    assert other.digest() in line and _scenario().digest() in line and "--force" in line
    assert other.digest() != _scenario().digest()
    assert _snapshot(tmp_path) == before
    assert launches == []


def test_force_deletes_the_other_run_and_keeps_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], launches: list[dict[str, object]]
) -> None:
    _prepare(tmp_path, _scenario("seed=1"))
    (tmp_path / "notes.txt").write_text("mine\n")
    code = cli.main(["simulate", *_argv("--run-dir", str(tmp_path), "--force")])
    assert code == 1 and "stopped by the test" in capsys.readouterr().err
    assert launches == [{"digest": _scenario().digest(), "files": [".lock", "notes.txt"]}]
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_same_scenario_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], launches: list[dict[str, object]]
) -> None:
    _prepare(tmp_path, _scenario())
    before = _snapshot(tmp_path)
    code = cli.main(["simulate", *_argv("--run-dir", str(tmp_path))])
    assert code == 1 and "stopped by the test" in capsys.readouterr().err
    assert len(launches) == 1 and launches[0]["digest"] == _scenario().digest()
    assert _snapshot(tmp_path) == before


def _truncate_weights(run_dir: Path) -> None:
    weights = run_dir / "checkpoint.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _swap_in_older_weights(run_dir: Path) -> None:
    recorder = RoundRecorder(
        _scenario(),
        RunLog(run_dir),
        torch.nn.Linear(1, 1),
        None,  # type: ignore[arg-type]
    )
    weights = run_dir / "checkpoint.safetensors"
    recorder.checkpoint(1, _state(1), {"calls": 1})
    older = weights.read_bytes()
    recorder.checkpoint(2, _state(2), {"calls": 2})
    weights.write_bytes(older)


def _drop_row_2(run_dir: Path) -> None:
    _write_rows(run_dir, [0, 1, 3])


def _garble_row_1(run_dir: Path) -> None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = '{"round": 1, "accur'
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _cut_rows(run_dir: Path) -> None:
    _write_rows(run_dir, [0, 1])


def _garble_mirror(run_dir: Path) -> None:
    (run_dir / "checkpoint.json").write_text('{"round": 2, "wei')


def _round_as_text(run_dir: Path) -> None:
    path = run_dir / "checkpoint.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "round": "2"}))


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (_truncate_weights, ["checkpoint.safetensors: got a damaged file", "--force"]),
        (
            _swap_in_older_weights,
            ["checkpoint.json: got round 2", "holds round 1", "delete checkpoint.json"],
        ),
        (_drop_row_2, ["metrics.jsonl:3: got", "the JSON row of round 2", "--force"]),
        (_garble_row_1, ["metrics.jsonl:2: got", "the JSON row of round 1"]),
        (_cut_rows, ["metrics.jsonl: got 2 rows", "rounds 0 to 2"]),
        # said "got round ? with weights ?" (and a round "2" read as 2, beside round 2)
        (
            _garble_mirror,
            [
                "checkpoint.json: got no checkpoint record (JSONDecodeError",
                "delete checkpoint.json",
            ],
        ),
        (_round_as_text, ["checkpoint.json: got round '2' with weights", "holds round 2"]),
    ],
    ids=[
        "corrupt-checkpoint",
        "mismatched-checkpoint",
        "missing-row",
        "corrupt-row",
        "cut-rows",
        "corrupt-checkpoint-json",
        "round-as-text",
    ],
)
def test_damaged_run_is_refused_before_launch(
    damage: object,
    needles: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    launches: list[dict[str, object]],
) -> None:
    _prepare(tmp_path, _scenario(), checkpoint_round=2)
    damage(tmp_path)  # type: ignore[operator]
    before = _snapshot(tmp_path)
    code = cli.main(["simulate", *_argv("--run-dir", str(tmp_path))])
    line = _one_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert line.startswith(f"fedmerge: error: {tmp_path}/")
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert launches == []
    assert _snapshot(tmp_path) == before


def test_checkpoint_of_another_scenario_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], launches: list[dict[str, object]]
) -> None:
    """checkpoint.json edited to this scenario's digest; the weights' header names the other."""
    _prepare(tmp_path, _scenario("seed=1"))
    mirror = json.loads((tmp_path / "checkpoint.json").read_text())
    mirror["digest"] = _scenario().digest()
    (tmp_path / "checkpoint.json").write_text(json.dumps(mirror))
    (tmp_path / "config.json").write_text(json.dumps(_scenario().to_dict()))
    code = cli.main(["simulate", *_argv("--run-dir", str(tmp_path))])
    line = _one_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert line.startswith(f"fedmerge: error: {tmp_path}/checkpoint.safetensors: got a checkpoint")
    assert _scenario("seed=1").digest() in line and "--force" in line
    assert launches == []


def test_compare_refuses_a_damaged_checkpoint_before_any_run(tmp_path: Path) -> None:
    sweep_file = tmp_path / "tiny.toml"
    sweep_file.write_text(
        'name = "tiny"\n[set]\nrounds = 3\ndataset.name = "digits"\nmodel.name = "mlp"\n'
        "[axes]\nseed = [0]\n"
    )
    sweep = load_sweep(sweep_file)
    run_dir = tmp_path / "runs" / "tiny" / _scenario().digest()
    _prepare(run_dir, _scenario(), checkpoint_round=2)
    _truncate_weights(run_dir)
    with pytest.raises(ConfigError, match=r"checkpoint\.safetensors: got a damaged file"):
        plan_sweep(sweep, tmp_path / "runs")
    assert [r.state for r in plan_sweep(sweep, tmp_path / "runs", force=True)] == ["new"]


# -- the lock --------------------------------------------------------------------------
def _lock_in_a_thread(run_dir: Path) -> str | None:
    """Take and release ``run_dir``'s lock in another thread; its refusal, if refused."""
    refused: list[str] = []

    def take() -> None:
        try:
            with checks.run_dir_lock(run_dir):
                pass
        except ConfigError as exc:
            refused.append(str(exc))

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(30)
    return refused[0] if refused else None


def test_second_writer_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], launches: list[dict[str, object]]
) -> None:
    """A writer in another thread of this process is refused as one in another process is."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with checks.run_dir_lock(tmp_path):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        code = cli.main(["simulate", *_argv("--run-dir", str(tmp_path))])
    finally:
        release.set()
        holder.join(30)
    line = _one_line(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert f"run_dir: '{tmp_path}' is in use by process {os.getpid()}" in line
    assert launches == []


def test_lock_goes_with_its_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], launches: list[dict[str, object]]
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom sims.checks import run_dir_lock\n"
         f"with run_dir_lock({str(tmp_path)!r}):\n    print('locked', flush=True)\n"
         "    time.sleep(120)\n"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert cli.main(["simulate", *_argv("--run-dir", str(tmp_path))]) == EXIT_BAD_INPUT
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        # from Python too (a str path as well as a Path): simulate() takes the lock itself,
        # before anything starts
        with pytest.raises(ConfigError, match=f"in use by process {holder.pid}"):
            launch.simulate(_scenario(), str(tmp_path))
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
    assert cli.main(["simulate", *_argv("--run-dir", str(tmp_path))]) == 1
    assert len(launches) == 1


def test_the_lock_is_reentrant_in_its_own_thread_only(tmp_path: Path) -> None:
    """``fedmerge simulate`` holds the lock, then ``simulate()`` takes it again: one writer."""
    with checks.run_dir_lock(tmp_path):
        with checks.run_dir_lock(tmp_path):
            refused = _lock_in_a_thread(tmp_path)
            assert refused is not None and f"in use by process {os.getpid()}" in refused
        refused = _lock_in_a_thread(tmp_path)  # the outer block holds it still
        assert refused is not None and f"in use by process {os.getpid()}" in refused
    assert _lock_in_a_thread(tmp_path) is None  # released with the outer block


# -- the machine (a machine with two GPUs, as torch would report it) ---------------------
@pytest.mark.parametrize(
    ("sets", "refused"),
    [
        (["device='cuda'"], None),
        (["device='cuda:1'", "simulation.num_gpus_per_client=2.0"], None),
        (["device='cuda:2'"], "device: got 'cuda:2'; allowed: 'cpu' or 'cuda:0' to 'cuda:1'"),
        (["simulation.num_gpus_per_client=2.5"], "simulation.num_gpus_per_client: got 2.5"),
        (
            ["simulation.num_gpus_per_client=2.5", "simulation.ray_address='auto'"],
            None,  # a cluster's GPUs are the cluster's business
        ),
    ],
    ids=["cuda", "cuda-1-two-gpus-per-client", "cuda-2", "gpus-per-client", "cluster"],
)
def test_gpu_checks_follow_what_torch_sees(
    sets: list[str], refused: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checks, "_cuda_devices", lambda: 2)
    config = _scenario(*sets)
    if refused is None:
        checks.check_scenario(config)
    else:
        with pytest.raises(ConfigError, match=f"^{re.escape(refused)}"):
            checks.check_scenario(config)


def test_simulate_from_python_refuses_another_scenarios_finished_run_and_keeps_it(
    tmp_path: Path,
) -> None:
    """``sims.launch.simulate`` checks the run directory first, as ``fedmerge simulate`` does.

    Without the check, the run would start over in the directory and replace
    the finished run of the other scenario (its ServerApp's own refusal of a
    finished run cannot act: the launcher removes ``summary.json`` first).
    """
    other = _scenario("seed=1")
    _prepare(tmp_path, other)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}) + "\n")
    (tmp_path / "flower.log").write_text("the other run's log\n")
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match="holds a run of another scenario") as refused:
        launch.simulate(_scenario(), tmp_path)
    assert other.digest() in str(refused.value) and _scenario().digest() in str(refused.value)
    assert _snapshot(tmp_path) == before


def _finished(run_dir: Path, scenario: RunConfig) -> dict[str, object]:
    """A finished run of ``scenario`` in ``run_dir``, written by hand; its summary."""
    _prepare(run_dir, scenario, checkpoint_round=scenario.rounds)
    _write_rows(run_dir, list(range(scenario.rounds + 1)))
    summary: dict[str, object] = {
        "status": "completed", "digest": scenario.digest(), "final_accuracy": 0.5,
        "wall_time": 12.5,
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary) + "\n")
    (run_dir / "model.safetensors").write_bytes(b"the final model")
    (run_dir / "flower.log").write_text("the run's log\n")
    return summary


def test_simulate_returns_a_finished_run_of_the_same_scenario_as_it_is(tmp_path: Path) -> None:
    """A finished run is not run again from Python, as ``fedmerge compare`` skips it.

    Launched again, it would resume with no round left, yet its ``flower.log``
    and ``summary.json`` would be written anew (and lost if that launch failed).
    """
    scenario = _scenario()
    summary = _finished(tmp_path, scenario)
    before = _snapshot(tmp_path)
    assert launch.simulate(scenario, tmp_path) == summary
    assert _snapshot(tmp_path) == before


def test_the_command_says_a_finished_run_is_not_run_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], launches: list[dict[str, object]]
) -> None:
    _finished(tmp_path, _scenario())
    code = cli.main(["simulate", *_argv("--run-dir", str(tmp_path))])
    said = capsys.readouterr()
    assert code == 1 and "stopped by the test" in said.err  # the fake launch
    assert f"{tmp_path} holds this scenario's finished run: its summary, not run again" in said.out


@pytest.mark.parametrize("whose", ["another scenario's", "this scenario's"])
def test_simulate_with_force_runs_from_scratch_and_keeps_other_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whose: str
) -> None:
    """``force=True``, as ``fedmerge simulate --force``: the run there (refused, or returned as
    it is, without it) is deleted before the launch; a file of the user's stays."""
    scenario = _scenario()
    _finished(tmp_path, _scenario("seed=1") if whose == "another scenario's" else scenario)
    (tmp_path / "notes.txt").write_text("mine\n")
    launched: list[list[str]] = []

    def launch_run(config: RunConfig, run_dir: Path, *args: object) -> dict[str, object]:
        launched.append(sorted(os.listdir(run_dir)))
        raise _Launched("stopped by the test")

    monkeypatch.setattr(launch, "_run_checked", launch_run)
    with pytest.raises(_Launched):
        launch.simulate(scenario, tmp_path, force=True)
    assert launched == [[".lock", "notes.txt"]]
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_a_checkpoint_one_round_behind_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The command checks the directory, then ``simulate()`` does, under the same lock: the
    line came twice. While the lock is held, the directory is checked once."""
    config = _scenario()
    recorder = _prepare(tmp_path, config, checkpoint_round=1)
    _write_rows(tmp_path, [0, 1, 2])
    recorder.log.save_tensors(
        "checkpoint.safetensors", _state(2), checkpoint_metadata(2, config.digest(), {"calls": 2})
    )
    with caplog.at_level("WARNING"), checks.run_dir_lock(tmp_path):
        answers = [checks.check_run_dir(tmp_path, config) for _ in range(2)]
    said = [r.getMessage() for r in caplog.records if "one round behind" in r.getMessage()]
    assert answers == ["resume", "resume"]
    assert len(said) == 1 and said[0].endswith("resuming from round 2")
    assert read_checkpoint(tmp_path).round == 2  # type: ignore[union-attr]


def test_another_scenario_is_checked_afresh_under_the_same_lock(tmp_path: Path) -> None:
    """What a check found is kept for its scenario only."""
    _prepare(tmp_path, _scenario("seed=1"))
    with checks.run_dir_lock(tmp_path):
        assert checks.check_run_dir(tmp_path, _scenario("seed=1")) == "resume"
        with pytest.raises(ConfigError, match="holds a run of another scenario"):
            checks.check_run_dir(tmp_path, _scenario())
