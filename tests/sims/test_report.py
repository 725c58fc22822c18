"""``fedmerge report``: tables and plots from run directories (hand-made runs, no Flower)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sims import cli, evaluation, plots, report
from sims.runs import expand_run_dirs, load_run, run_state
from sims.scenario_files import load_scenario
from strategies.federation import Federation

EXIT_BAD_INPUT = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (strategy overrides, seed) -> accuracies of rounds 0, 1, 2; and wall time
RUNS = {
    ("fedavg", 0): ([0.10, 0.50, 0.80], 10.0),
    ("fedavg", 1): ([0.10, 0.60, 0.70], 14.0),
    ("fedprox", 0): ([0.10, 0.75, 0.65], 20.0),
    ("fedprox", 1): ([0.10, 0.30, 0.60], 21.0),
}
STRATEGY = {"fedavg": ["strategy.name='fedavg'"],
            "fedprox": ["strategy.name='fedprox'", "strategy.prox_mu=0.1"]}  # fmt: skip


def _write_run(
    run_dir: Path,
    overrides: list[str],
    acc: list[float],
    wall: float,
    *,
    peer: list[float] | None = None,
    completed: bool = True,
) -> Path:
    scenario = load_scenario(None, ["rounds=2", "num_clients=4", "clients_per_round=2", *overrides])
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(scenario.to_dict()))
    rows = []
    for r, a in enumerate(acc):
        row = {
            "round": r, "accuracy": a, "loss": 2.0 - a, "clients": 0 if r == 0 else 2,
            "train_loss": None if r == 0 else {"mean": 1.0 / r, "std": 0.1, "min": 0.5,
                                               "max": 1.5, "n": 2},
            "bytes_down": 0 if r == 0 else 1_000_000, "bytes_up": 0 if r == 0 else 500_000,
            "round_time": 1.0, "elapsed": float(r), "failures": 0, "sampled": [],
        }  # fmt: skip
        rows.append(row)
    if peer is not None:
        rows[-1]["peer_accuracy"] = peer
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if completed:
        summary = {"status": "completed", "digest": scenario.digest(), "serverapp_time": 99.0}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        (run_dir / "timing.json").write_text(json.dumps({"wall_time": wall, "resumed": False}))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        _write_run(tmp_path / "runs" / f"{s}-{seed}", [*STRATEGY[s], f"seed={seed}"], acc, wall,
                   peer=[0.5 + 0.1 * seed, 0.9, 0.7 - 0.1 * seed])
        for (s, seed), (acc, wall) in RUNS.items()
    ]  # fmt: skip


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_summary_numbers_hand_worked(runs: list[Path], tmp_path: Path) -> None:
    rep = report.build_report(runs, tmp_path / "out", target=0.7)
    rows = {r["strategy.name"]: r for r in _csv(rep.summary_csv)}
    avg, prox = rows["fedavg"], rows["fedprox"]
    # fedavg: finals 0.8, 0.7; both reach 0.7 in round 2
    assert float(avg["final_accuracy_mean"]) == pytest.approx(0.75)
    assert float(avg["final_accuracy_std"]) == pytest.approx(math.sqrt(2 * 0.05**2))
    assert float(avg["rounds_to_target_mean"]) == 2.0
    assert float(avg["rounds_to_target_std"]) == 0.0
    assert avg["target_reached"] == "2" and avg["seeds"] == "2" and avg["seed_list"] == "0 1"
    assert float(avg["bytes_total_mean"]) == 3_000_000  # 2 rounds x (1 MB down + 0.5 MB up)
    assert float(avg["wall_time_mean"]) == 12.0
    assert float(avg["wall_time_std"]) == pytest.approx(math.sqrt(8))
    # fedprox: finals 0.65, 0.60; bests 0.75, 0.60; only seed 0 reaches 0.7 (round 1)
    assert float(prox["final_accuracy_mean"]) == pytest.approx(0.625)
    assert float(prox["best_accuracy_mean"]) == pytest.approx(0.675)
    assert float(prox["best_accuracy_std"]) == pytest.approx(math.sqrt(2 * 0.075**2))
    assert prox["target_reached"] == "1"
    assert float(prox["rounds_to_target_mean"]) == 1.0 and prox["rounds_to_target_std"] == ""
    # prox_mu is an option of fedprox only: fedavg's runs have no value for it
    assert prox["strategy.prox_mu"] == "0.1" and avg["strategy.prox_mu"] == ""

    md = rep.summary_md.read_text().splitlines()
    assert md[0].startswith("| strategy.name | strategy.prox_mu | seeds | final accuracy |")
    assert "rounds to 70%" in md[0]
    # the fixture's runs carry peer accuracies [0.5 + 0.1 s, 0.9, 0.7 - 0.1 s]: min 0.5 and 0.6
    assert md[0].endswith(
        "| min peer accuracy | peer accuracy after the first merge | peer accuracy after merge "
        "| average-model accuracy | aligned average-model accuracy |"
    )
    assert md[2] == (
        "| fedavg | — | 2 | 0.7500 ± 0.0707 | 0.7500 ± 0.0707 | 2.0 ± 0.0 | 3.00 MB "
        "| 12.0 ± 2.8 s | 0.5500 ± 0.0707 | — | — | — | — |"
    )
    assert md[3] == (
        "| fedprox | 0.1 | 2 | 0.6250 ± 0.0354 | 0.6750 ± 0.1061 | 1.0 (1/2 seeds) | 3.00 MB "
        "| 20.5 ± 0.7 s | 0.5500 ± 0.0707 | — | — | — | — |"
    )
    assert float(avg["min_peer_accuracy_mean"]) == pytest.approx(0.55)
    per_run = _csv(rep.runs_csv)
    assert [(r["strategy.name"], r["seed"], r["rounds_to_target"]) for r in per_run] == [
        ("fedavg", "0", "2"), ("fedavg", "1", "2"), ("fedprox", "0", "1"), ("fedprox", "1", ""),
    ]  # fmt: skip


def test_target_never_reached(runs: list[Path], tmp_path: Path) -> None:
    rep = report.build_report(runs, tmp_path / "out", target=0.9)
    assert [r["target_reached"] for r in _csv(rep.summary_csv)] == ["0", "0"]
    assert rep.summary_md.read_text().count("not reached") == 2


def test_one_seed_has_no_std(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r", ["seed=3"], [0.1, 0.2, 0.4], 5.0, peer=[0.3, 0.5])
    rep = report.build_report([run], tmp_path / "out")
    (row,) = _csv(rep.summary_csv)
    assert row["final_accuracy_mean"] == "0.4" and row["final_accuracy_std"] == ""
    assert "| all runs | 1 | 0.4000 | 0.4000 | not reached | 3.00 MB | 5.0 s |" in (
        rep.summary_md.read_text()
    )


def test_resources_do_not_split_groups(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", ["seed=0", "simulation.ray_address='x:1'"], [0.1, 0.5, 0.6],
                   1.0, peer=[0.5])  # fmt: skip
    b = _write_run(tmp_path / "b", ["seed=1"], [0.1, 0.5, 0.8], 1.0, peer=[0.5])
    rep = report.build_report([a, b], tmp_path / "out")
    (row,) = _csv(rep.summary_csv)
    assert row["seeds"] == "2" and float(row["final_accuracy_mean"]) == pytest.approx(0.7)


def test_plots_are_pngs_of_nontrivial_size(runs: list[Path], tmp_path: Path) -> None:
    rep = report.build_report(runs, tmp_path / "out")
    for path in (rep.accuracy_png, rep.bytes_png, rep.clients_png):
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, path
    assert not list((tmp_path / "out").glob(".*")), "a temp file was left behind"


def test_panels_per_partition_setting(tmp_path: Path) -> None:
    """Two partitions x two strategies: one panel per partition, still valid PNGs."""
    dirs = []
    for scheme in ("iid", "dirichlet"):
        for (s, seed), (acc, wall) in RUNS.items():
            dirs.append(_write_run(tmp_path / f"{scheme}-{s}-{seed}",
                                   [*STRATEGY[s], f"seed={seed}", f"partition.scheme='{scheme}'"],
                                   acc, wall, peer=[0.5, 0.6]))  # fmt: skip
    grouping = report.group_runs([load_run(d) for d in dirs])
    assert grouping.keys == ["strategy.name", "strategy.prox_mu", "partition.scheme"]
    assert grouping.series == ["strategy.name", "strategy.prox_mu"]
    assert len(grouping.groups) == 4 and all(len(g.runs) == 2 for g in grouping.groups)
    rep = report.build_report(dirs, tmp_path / "out")
    assert len(_csv(rep.summary_csv)) == 4
    assert rep.clients_png.read_bytes()[:8] == PNG_MAGIC


def test_client_accuracy_evaluates_the_final_model_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ["dataset.name='digits'", "model.name='mlp'", "partition.scheme='dirichlet'",
                 "partition.min_partition_size=1"]  # fmt: skip
    run_dir = _write_run(tmp_path / "r", overrides, [0.1, 0.2, 0.3], 1.0)
    scenario = load_scenario(None, ["rounds=2", "num_clients=4", "clients_per_round=2", *overrides])
    fed = Federation(scenario)
    model = fed.initial_model()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(run_dir / "model.safetensors"))  # fmt: skip
    got = evaluation.client_accuracy(load_run(run_dir))
    model.eval()
    with torch.no_grad():
        expected = []
        for pid in range(4):
            x, y = fed.client_data(pid)
            hits = [int(model(x[i : i + 1]).argmax()) == int(y[i]) for i in range(len(y))]
            expected.append(sum(hits) / len(y))
    assert got == pytest.approx(expected, abs=1e-12)
    cache = run_dir / evaluation.CLIENT_ACCURACY_FILE
    mtime = cache.stat().st_mtime_ns
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("not cached"))
    assert evaluation.client_accuracy(load_run(run_dir)) == got
    assert cache.stat().st_mtime_ns == mtime


def test_peer_accuracy_is_used_when_present(runs: list[Path]) -> None:
    run = load_run(runs[1])
    assert evaluation.client_accuracy(run) == pytest.approx([0.6, 0.9, 0.6])
    assert not (runs[1] / evaluation.CLIENT_ACCURACY_FILE).exists()


def test_tensorboard_events_hold_the_metrics(runs: list[Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = plots.write_tensorboard(runs[0])
    assert out == runs[0] / "tensorboard"
    events = EventAccumulator(str(out))
    events.Reload()
    acc = [(e.step, round(e.value, 6)) for e in events.Scalars("accuracy")]
    assert acc == [(0, 0.1), (1, 0.5), (2, 0.8)]
    mb = [round(e.value, 6) for e in events.Scalars("bytes/cumulative_mb")]
    assert mb == [0.0, 1.5, 3.0]
    assert [e.step for e in events.Scalars("train_loss/mean")] == [1, 2]
    plots.write_tensorboard(runs[0])  # rewriting replaces, never nests
    assert [p.name for p in out.iterdir() if p.is_dir()] == []


def test_report_cli_writes_everything(
    runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", *map(str, runs), "--target", "0.7", "--tensorboard"]) == 0
    out = runs[0].parent / "report"  # default: the runs' shared parent
    for name in ("summary.csv", "summary.md", "runs.csv", "accuracy_rounds.png",
                 "accuracy_bytes.png", "client_accuracy.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert all((r / "tensorboard").is_dir() for r in runs)
    assert "| fedavg | — | 2 |" in capsys.readouterr().out


def test_report_of_a_sweep_folder_takes_its_runs_in_manifest_order(
    runs: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = runs[0].parent
    order = [runs[2], runs[3], runs[0], runs[1]]  # fedprox first
    manifest = {"runs": [{"run_dir": r.name} for r in order], "target_accuracy": 0.6}
    (folder / "sweep.json").write_text(json.dumps(manifest))
    assert expand_run_dirs([folder]) == order
    assert cli.main(["report", str(folder)]) == 0
    rows = _csv(folder / "report" / "summary.csv")
    assert [r["strategy.name"] for r in rows] == ["fedprox", "fedavg"]
    assert "rounds to 60%" in (folder / "report" / "summary.md").read_text()  # the sweep's
    assert cli.main(["report", str(folder)]) == 0  # its own report/ folder is no run
    capsys.readouterr()


@pytest.mark.parametrize("case", ["unfinished", "not-a-run", "duplicate", "bad-target", "none"])
def test_report_bad_input_is_one_line_and_exit_2(
    case: str, runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*map(str, runs), "--out", str(tmp_path / "out")]
    needles = []
    if case == "unfinished":
        (runs[2] / "summary.json").unlink()
        needles = [str(runs[2]), "not completed"]
    elif case == "not-a-run":
        args.insert(0, str(tmp_path))
        needles = ["run_dir", "config.json"]
    elif case == "duplicate":
        copy = _write_run(tmp_path / "copy", [*STRATEGY["fedavg"], "seed=0"], [0.1, 0.2, 0.3], 1.0)
        args.insert(0, str(copy))
        needles = ["repeats the scenario and seed"]
    elif case == "bad-target":
        args += ["--target", "1.5"]
        needles = ["target", "1.5"]
    if case == "none":
        with pytest.raises(SystemExit) as exc:  # argparse: RUN_DIR is required
            cli.main(["report"])
        assert exc.value.code == EXIT_BAD_INPUT
        return
    assert cli.main(["report", *args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("fedmerge: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()


def test_note_says_whether_rows_are_paired(runs: list[Path], tmp_path: Path) -> None:
    paired = report.build_report(runs, tmp_path / "a").summary_md.read_text()
    assert "(paired: every row uses the same seeds" in paired
    unpaired = report.build_report(runs[:3], tmp_path / "b").summary_md.read_text()
    assert "not paired: the rows' seeds differ" in unpaired


@pytest.mark.parametrize(("status", "finished"), [("degraded", True), ("running", False)])
def test_a_degraded_run_is_finished_for_report_and_compare(
    status: str, finished: bool, tmp_path: Path
) -> None:
    run_dir = _write_run(tmp_path / "run", [], [0.1, 0.5, 0.6], 3.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": status}))
    save_file({"w": torch.zeros(1)}, str(run_dir / "model.safetensors"))
    scenario = load_scenario(None, ["rounds=2", "num_clients=4", "clients_per_round=2"])
    assert run_state(scenario, run_dir) == ("done" if finished else "new")
    if finished:
        assert load_run(run_dir).summary["status"] == "degraded"
    else:
        with pytest.raises(ValueError, match="has not completed"):
            load_run(run_dir)


def test_runs_that_differ_in_their_adversaries_are_separate_groups(tmp_path: Path) -> None:
    clean = _write_run(tmp_path / "clean", [], [0.1, 0.5, 0.6], 3.0)
    attacked = _write_run(
        tmp_path / "attacked", ["simulation.adversary_fraction=0.3"], [0.1, 0.2, 0.1], 3.0
    )
    cpus = _write_run(tmp_path / "cpus", ["simulation.num_cpus_per_client=2"], [0.1, 0.5, 0.6], 3.0)
    grouping = report.group_runs([load_run(clean), load_run(attacked)])
    assert grouping.keys == ["simulation.adversary_fraction"]
    assert [g.values for g in grouping.groups] == [
        {"simulation.adversary_fraction": None},  # at its default: as in runs that predate it
        {"simulation.adversary_fraction": 0.3},
    ]
    with pytest.raises(ValueError, match="repeats the scenario and seed"):
        report.group_runs([load_run(clean), load_run(cpus)])  # resources are still ungrouped


def test_one_shot_fusion_columns_hand_worked(tmp_path: Path) -> None:
    """Fused, clients' mean and ensemble accuracy and both barriers, mean ± std over seeds."""
    dirs = []
    # seed -> (fused acc, client accs, ensemble acc, fused loss, client losses)
    fusions = {0: (0.50, [0.40, 0.60], 0.70, 1.5, [1.0, 1.2]),
               1: (0.60, [0.50, 0.70], 0.80, 1.1, [0.8, 1.0])}  # fmt: skip
    for seed, (fused, clients, ens, floss, closs) in fusions.items():
        run = _write_run(
            tmp_path / f"r{seed}", [f"seed={seed}"], [0.1, fused, fused], 1.0, peer=clients
        )  # per-client accuracies, so no model file is read
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[1]["fusion"] = {
            "method": "weight", "fused_accuracy": fused, "fused_loss": floss,
            "client_accuracy": clients, "client_loss": closs, "ensemble_accuracy": ens,
            "client_partitions": [0, 1], "loss_barrier": floss - sum(closs) / 2,
            "accuracy_barrier": sum(clients) / 2 - fused,
        }  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(run)
    rep = report.build_report(dirs, tmp_path / "out")
    (row,) = _csv(rep.summary_csv)
    assert float(row["fused_accuracy_mean"]) == pytest.approx(0.55)
    assert float(row["client_mean_accuracy_mean"]) == pytest.approx(0.55)  # (0.5 + 0.6) / 2
    assert float(row["ensemble_accuracy_mean"]) == pytest.approx(0.75)
    assert float(row["accuracy_barrier_mean"]) == pytest.approx(0.0)  # 0.0 and 0.0
    # loss barriers 1.5 - 1.1 = 0.4 and 1.1 - 0.9 = 0.2: mean 0.3, std sqrt(0.02)
    assert float(row["loss_barrier_mean"]) == pytest.approx(0.3)
    assert float(row["loss_barrier_std"]) == pytest.approx(math.sqrt(0.02))
    md = rep.summary_md.read_text().splitlines()
    assert md[0].endswith(
        "| fused accuracy | clients' mean accuracy | ensemble accuracy | accuracy barrier "
        "| loss barrier | vanilla accuracy | vanilla loss barrier |"
    )
    assert md[2].endswith("| 0.7500 ± 0.0707 | 0.0000 ± 0.0000 | 0.3000 ± 0.1414 | — | — |")
    assert "loss barrier: the fused model's test loss minus the clients' mean" in md[-1]
    assert rep.fusion_png is not None and rep.fusion_png.read_bytes()[:8] == PNG_MAGIC
    assert rep.merged_png is None  # no peer merged


def test_first_merge_accuracy_is_read_from_the_first_round_that_merged(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r", ["seed=0"], [0.1, 0.5, 0.6], 1.0, peer=[0.5, 0.7])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[0]["merged_accuracy"] = None  # round 0: pre-training, nothing merged
    rows[1]["merged_accuracy"] = 0.42
    rows[2]["merged_accuracy"] = 0.58
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = report.build_report([run], tmp_path / "out")
    (row,) = _csv(rep.summary_csv)
    assert float(row["first_merge_accuracy_mean"]) == pytest.approx(0.42)
    assert rep.merged_png is not None and rep.merged_png.stat().st_size > 5000
    assert rep.fusion_png is None
    assert float(row["merged_accuracy_mean"]) == pytest.approx(0.58)


def test_self_supervised_runs_report_the_linear_probe_and_score_clients_by_knn(
    tmp_path: Path,
) -> None:
    overrides = ["dataset.name='digits'", "model.name='mlp'", "task.name='simclr'",
                 "task.knn_k=1", "task.eval_samples=100000"]  # fmt: skip
    dirs = []
    for seed, probes in ((0, [0.30, None, 0.50]), (1, [0.20, None, 0.70])):
        run_dir = _write_run(tmp_path / f"ssl-{seed}", [*overrides, f"seed={seed}"],
                             [0.1, 0.2, 0.3], 1.0)  # fmt: skip
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for row, probe in zip(rows, probes, strict=True):
            row["linear_probe_accuracy"] = probe
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        scenario = load_scenario(None, ["rounds=2", "num_clients=4", "clients_per_round=2",
                                        *overrides, f"seed={seed}"])  # fmt: skip
        state = Federation(scenario).initial_model().state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(run_dir / "model.safetensors"))
        dirs.append(run_dir)
    rep = report.build_report(dirs, tmp_path / "report", target=0.25)
    (row,) = rep.rows
    assert row["final_linear_probe_accuracy_mean"] == pytest.approx(0.6)
    assert row["best_linear_probe_accuracy_mean"] == pytest.approx(0.6)
    assert row["final_linear_probe_accuracy_std"] == pytest.approx(math.sqrt(0.02))
    assert "linear probe (final)" in rep.summary_md.read_text()
    # the encoder has no classifier: each client is scored by 1-NN against the training
    # set (eval_samples exceeds it) less the client's own samples
    scenario = load_scenario(None, ["rounds=2", "num_clients=4", "clients_per_round=2",
                                    *overrides, "seed=0"])  # fmt: skip
    fed = Federation(scenario)
    model = fed.initial_model()
    got = evaluation.client_accuracy(load_run(dirs[0]))
    model.eval()
    with torch.no_grad():
        bank = torch.nn.functional.normalize(model.features(fed.data.train_x), dim=1)
        expected = []
        for pid in range(4):
            x, y = fed.client_data(pid)
            others = torch.ones(len(fed.data.train_y), dtype=torch.bool)
            others[torch.from_numpy(np.asarray(fed.partitions[pid]))] = False
            q = torch.nn.functional.normalize(model.features(x), dim=1)
            sims = q @ bank.T
            sims[:, ~others] = -2.0  # below any cosine: never a neighbour
            nearest = sims.argmax(1)
            expected.append(float((fed.data.train_y[nearest] == y).float().mean()))
    assert got == pytest.approx(expected, abs=1e-6)
    assert max(got) < 0.99  # no query is its own neighbour any more


def _run_written_before(run_dir: Path, section: str) -> Path:
    """A seed-0 run whose ``config.json`` lacks ``section``, as versions before it wrote."""
    _write_run(run_dir, ["seed=0"], [0.1, 0.2, 0.3], 1.0)
    config = json.loads((run_dir / "config.json").read_text())
    del config[section]
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def test_a_run_written_before_the_task_section_groups_with_a_supervised_one(
    tmp_path: Path,
) -> None:
    old = _run_written_before(tmp_path / "old", "task")
    new = _write_run(tmp_path / "new", ["seed=1"], [0.1, 0.2, 0.3], 1.0)
    ssl = _write_run(tmp_path / "ssl", ["seed=1", "task.name='simclr'"], [0.1, 0.2, 0.3], 1.0)
    grouping = report.group_runs([load_run(d) for d in (old, new, ssl)])
    assert grouping.keys == ["task.name"]
    assert [len(g.runs) for g in grouping.groups] == [2, 1]
    assert [g.values["task.name"] for g in grouping.groups] == [None, "simclr"]


def test_a_run_written_before_the_evaluation_section_groups_with_a_default_one(
    tmp_path: Path,
) -> None:
    old = _run_written_before(tmp_path / "old", "evaluation")
    new = _write_run(tmp_path / "new", ["seed=1"], [0.1, 0.2, 0.3], 1.0)
    by_clients = _write_run(
        tmp_path / "clients",
        ["seed=1", "evaluation.server='clients'", "strategy.fraction_evaluate=0.5"],
        [0.1, 0.2, 0.3],
        1.0,
    )
    grouping = report.group_runs([load_run(d) for d in (old, new, by_clients)])
    assert "evaluation.server" in grouping.keys and "evaluation.test_dir" not in grouping.keys
    assert sorted(len(g.runs) for g in grouping.groups) == [1, 2]
    together = next(g for g in grouping.groups if len(g.runs) == 2)
    assert together.values["evaluation.server"] is None


def test_runs_of_sweeps_with_different_targets_need_a_target_whatever_their_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first sweep's target used to win: the table's "rounds to" changed with the order."""
    a = _write_run(tmp_path / "a" / "r0", ["seed=0"], [0.1, 0.5, 0.8], 3.0, peer=[0.8, 0.8])
    b = _write_run(tmp_path / "b" / "r1", ["seed=1"], [0.1, 0.6, 0.7], 3.0, peer=[0.7, 0.7])
    (tmp_path / "a" / "sweep.json").write_text(json.dumps({"target_accuracy": 0.7}))
    (tmp_path / "b" / "sweep.json").write_text(json.dumps({"target_accuracy": 0.2}))
    for order in ([a, b], [b, a]):
        assert cli.main(["report", *map(str, order), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            "fedmerge: error: --target: not given, and the runs' sweeps set different "
            f"target_accuracy (0.2 ({tmp_path / 'b' / 'sweep.json'}), 0.7 ("
        )
        assert not (tmp_path / "out").exists()
    assert (
        cli.main(["report", str(a), str(b), "--out", str(tmp_path / "out"), "--target", "0.5"]) == 0
    )
    assert "rounds to 50%" in (tmp_path / "out" / "summary.md").read_text()
    capsys.readouterr()
