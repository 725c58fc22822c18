"""The ``fedmerge`` commands that simulate, compare and report (the heavy imports).

:mod:`sims.cli` parses the command line and imports this module only for
these commands: ``fedmerge supernode``, ``superlink``, ``certs`` and
``status`` start without PyTorch, Flower or the data sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedmerge.atomic import atomic_write_text
from sims import local_federation
from sims.checks import (
    check_run_dir,
    check_run_path,
    clear_run_dir,
    run_dir_lock,
)
from sims.cli import console
from sims.compare import (
    PlannedRun,
    Sweep,
    load_sweep,
    plan_sweep,
    run_sweep,
    runs_at_a_time,
    write_manifest,
)
from sims.launch import preflight, run_config_toml, scenario_data, simulate
from sims.plots import import_pyplot_meanwhile, plot_accuracy, plot_partition
from sims.report import Report, build_report
from sims.runs import DEFAULT_TARGET, SWEEP_FILE, expand_run_dirs, read_sweep_manifest, run_state
from sims.scenario_files import load_scenario
from strategies.config import ConfigError, RunConfig, StrategyConfig
from strategies.federation import federation
from strategies.plugins import get_plugin, load_plugins, plugin_names


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _f4(value: float | None) -> str:
    """``value`` to 4 decimals; ``-`` for a measure nobody took (no client evaluated)."""
    return "-" if value is None else f"{value:.4f}"


def format_round(row: dict[str, Any]) -> str:
    """One progress line for a ``metrics.jsonl`` row."""
    head = f"  round {row['round']:3d}  acc {_f4(row['accuracy'])}  loss {_f4(row['loss'])}"
    if row["round"] == 0:
        return f"{head}  (initial model)"
    tl = row.get("train_loss") or {}
    nan = float("nan")
    return (
        f"{head}  train-loss {tl.get('mean', nan):.3f}±{tl.get('std', nan):.3f}  "
        f"clients {row['clients']}  up {_mb(row['bytes_up'])}  "
        f"down {_mb(row['bytes_down'])}  {row['round_time']:.2f} s"
    )


def _default_run_dir(scenario: RunConfig, root: str) -> Path:
    if any(sep in scenario.name for sep in {"/", os.sep, "\0"}):
        raise ConfigError(
            f"name: got {scenario.name!r}; allowed: a name without '/' (it names the run "
            f"directory under --runs-root {root!r}), or give --run-dir"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{scenario.name}-{scenario.strategy.name}-s{scenario.seed}-{stamp}"


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run one scenario; print per-round progress and a summary."""
    scenario = load_scenario(args.scenario, args.set)
    preflight(scenario)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(scenario, args.runs_root)
    check_run_path(run_dir)
    with run_dir_lock(run_dir):
        # Checked under the lock: a writer that holds it may be between two files.
        check_run_dir(run_dir, scenario, force=args.force)
        if args.force:
            clear_run_dir(run_dir)
        return _simulate_locked(scenario, run_dir)


def _simulate_locked(scenario: RunConfig, run_dir: Path) -> int:
    import_pyplot_meanwhile()  # for the plot at the end
    console.print(
        f"[bold]fedmerge[/] {scenario.name}: {scenario.strategy.name} on {scenario.dataset.name} "
        f"({scenario.partition.scheme}), {scenario.model.name}, {scenario.num_clients} clients, "
        f"{scenario.clients_per_round}/round, {scenario.rounds} rounds -> {run_dir}",
        soft_wrap=True,
    )
    if run_state(scenario, run_dir) == "done":  # simulate() returns its summary as it is
        console.print(
            f"{run_dir} holds this scenario's finished run: its summary, not run again "
            f"(--force runs it from scratch)",
            soft_wrap=True,
        )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting Flower + Ray", total=scenario.rounds)

        def on_round(row: dict[str, Any]) -> None:
            progress.console.print(format_round(row), soft_wrap=True, highlight=False)
            progress.update(task, completed=row["round"], description="training")

        summary = simulate(scenario, run_dir, on_round=on_round)
    plot_accuracy(run_dir)
    table = Table(title=f"summary ({run_dir})", show_header=False)
    for key, value in [
        ("final accuracy", _f4(summary["final_accuracy"])),
        ("final loss", _f4(summary["final_loss"])),
        ("best accuracy", _f4(summary["best_accuracy"])),
        ("initial accuracy", _f4(summary["initial_accuracy"])),
        ("rounds", str(summary["rounds"])),
        ("bytes communicated", f"{_mb(summary['bytes_total'])} (up {_mb(summary['bytes_up'])}, "
         f"down {_mb(summary['bytes_down'])})"),
        ("wall time", f"{summary['wall_time']:.1f} s (rounds {summary['train_time']:.1f} s; "
         f"start-up and shutdown of Flower and Ray "
         f"{summary['wall_time'] - summary['train_time']:.1f} s)"),
    ]:  # fmt: skip
        table.add_row(key, value)
    if scenario.evaluation.server == "clients":
        fraction = scenario.strategy.options.fraction_evaluate
        table.add_row(
            "evaluation", f"by the clients, on their own data (fraction_evaluate {fraction})"
        )
    if scenario.task.self_supervised:  # accuracy is the k-NN monitor; the probe is the measure
        probe = summary.get("final_linear_probe_accuracy")
        table.add_row("task", f"{scenario.task.name} (accuracy: k-NN, k = {scenario.task.knn_k})")
        if probe is not None:
            table.add_row(
                "linear probe",
                f"{probe:.4f} (initial {summary['initial_linear_probe_accuracy']:.4f})",
            )
    console.print(table)
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """Show the partition of a scenario as a per-client label histogram."""
    scenario = load_scenario(args.scenario, args.set)
    out = Path(args.out or f"partition-{scenario.name}.png")
    if out.is_dir():
        out = out / f"partition-{scenario.name}.png"
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: got {str(out)!r}; allowed: a .png file or a directory")
    check_run_path(out.parent, "--out")
    fed = federation(scenario)
    data = scenario_data(fed)
    labels = data.train_y.numpy()
    parts = fed.partitions
    counts = np.stack([np.bincount(labels[p], minlength=data.num_classes) for p in parts])
    table = Table(title=f"{scenario.dataset.name}, {scenario.partition.scheme} partition")
    table.add_column("client", justify="right")
    for c in range(data.num_classes):
        table.add_column(str(c), justify="right")
    table.add_column("total", justify="right")
    for i, row in enumerate(counts):
        table.add_row(str(i), *(str(v) if v else "." for v in row), str(int(row.sum())))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    p = scenario.partition
    detail = {"dirichlet": f"(alpha={p.alpha})", "quantity-skew": f"(alpha={p.alpha})",
              "pathological": f"(#C={p.classes_per_client})",
              "shards": f"({p.shards_per_client} shards/client)"}.get(p.scheme, "")  # fmt: skip
    title = f"{scenario.dataset.name} / {p.scheme}{detail} / {scenario.num_clients} clients"
    out = plot_partition(counts, out, title)
    covered = int(counts.sum())
    console.print(f"{covered} of {len(labels)} training samples assigned; plot: {out}")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    """List the registered strategies with their options and defaults."""
    load_plugins(args.plugin)
    rows: list[dict[str, Any]] = []
    for name in plugin_names():
        plugin = get_plugin(name)
        options = StrategyConfig(name).to_dict()
        del options["name"]
        rows.append(
            {"name": name, "side": "peer" if plugin.peer else "server",
             "summary": plugin.summary, "options": options}
        )  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="strategies (strategy.name and its options)")
    for column in ("name", "side", "what it does", "options (default)"):
        table.add_column(column)
    for row in rows:
        # One option per line: a cell never wraps inside an option.
        cell = "\n".join(f"{k} ({json.dumps(v)})" for k, v in row["options"].items())
        table.add_row(row["name"], row["side"], row["summary"], cell or "-")
    console.print(table)
    return 0


def _run_line(i: int, n: int, run: PlannedRun, summary: dict[str, Any], how: str) -> str:
    wall = summary.get("wall_time")
    return (
        f"[{i + 1:{len(str(n))}d}/{n}] {how:<7} {run.label}  "
        f"final {_f4(summary['final_accuracy'])}  best {_f4(summary['best_accuracy'])}  "
        f"{_mb(summary['bytes_total'])}  "
        f"{'' if wall is None else f'{wall:.1f} s  '}-> {run.run_dir}"
    )


def cmd_compare(args: argparse.Namespace) -> int:
    """Run every combination of a sweep (cached by digest), then write the report."""
    if args.parallel < 1:
        raise ValueError(f"--parallel: got {args.parallel}; allowed: an integer >= 1")
    sweep = load_sweep(args.sweep, args.set)
    runs = plan_sweep(sweep, args.runs_root, force=args.force)
    sweep_dir = Path(args.runs_root) / sweep.name
    out = Path(args.out) if args.out else sweep_dir / "report"
    check_run_path(sweep_dir, "--runs-root")
    check_run_path(out, "--out")  # before the runs, not after them
    states = [r.state for r in runs]
    console.print(
        f"[bold]fedmerge compare[/] {sweep.name}: {len(runs)} runs "
        f"({states.count('done')} cached, {states.count('resume')} to resume, "
        f"{states.count('new')} new) -> {sweep_dir}",
        soft_wrap=True,
    )
    with run_dir_lock(sweep_dir):
        _compare_locked(args, sweep, runs, out)
    return 0


def _compare_locked(
    args: argparse.Namespace, sweep: Sweep, runs: list[PlannedRun], out: Path
) -> None:
    todo = [r for r in runs if r.state != "done"]
    write_manifest(sweep, runs, args.runs_root)
    import_pyplot_meanwhile()  # for the report at the end
    tensorboard = args.tensorboard or sweep.tensorboard
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[runs]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        speed_estimate_period=24 * 3600.0,  # average over the whole sweep
    ) as progress:
        task = progress.add_task("", total=max(len(todo), 1), runs=f"0/{len(todo)} runs")
        finished = 0

        def on_start(i: int, run: PlannedRun) -> None:
            progress.update(task, description=f"{run.label} (starting)")

        def on_round(run: PlannedRun, row: dict[str, Any]) -> None:
            rounds = run.scenario.rounds
            progress.update(
                task,
                completed=finished + row["round"] / rounds,
                description=f"{run.label} (round {row['round']}/{rounds})",
            )

        def on_end(i: int, run: PlannedRun, summary: dict[str, Any]) -> None:
            nonlocal finished
            how = {"done": "cached", "resume": "resumed"}.get(run.state, "done")
            if run.state != "done":
                finished += 1
                progress.update(task, completed=finished, runs=f"{finished}/{len(todo)} runs")
            progress.console.print(
                _run_line(i, len(runs), run, summary, how),
                soft_wrap=True,
                highlight=False,
                markup=False,
            )

        at_a_time = runs_at_a_time(runs, args.parallel, args.force)
        if at_a_time < args.parallel:
            progress.console.print(
                f"--parallel {args.parallel}: {at_a_time} at a time (runs on a Ray cluster of "
                f"your own go one at a time; a Ray head the sweep starts is split among the "
                f"runs that go together, at least one client's CPUs each)",
                soft_wrap=True,
                highlight=False,
            )
        run_sweep(
            runs,
            force=args.force,
            tensorboard=tensorboard,
            on_start=on_start,
            on_round=on_round,
            on_end=on_end,
            parallel=args.parallel,
            runtime_log=Path(args.runs_root) / sweep.name / "runtime.log",
        )
    report = build_report(
        [r.run_dir for r in runs], out, target=sweep.target_accuracy, tensorboard=tensorboard
    )
    _print_report(report)


def _print_report(report: Report) -> None:
    console.print(report.summary_md.read_text(), markup=False, highlight=False, soft_wrap=True)
    pngs = [report.accuracy_png, report.bytes_png, report.clients_png]
    pngs += [p for p in (report.fusion_png, report.merged_png) if p is not None]
    console.print(
        f"tables: {report.summary_md}, {report.summary_csv}, {report.runs_csv}\n"
        f"plots:  {', '.join(str(p) for p in pngs)}",
        highlight=False,
        soft_wrap=True,
    )


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild the tables and plots of a comparison from existing run directories."""
    target = args.target
    if target is not None and not 0 < target <= 1:
        raise ValueError(f"--target: got {target:g}; allowed: a number in (0, 1]")
    dirs = expand_run_dirs(args.run_dirs)
    parents = {d.resolve().parent for d in dirs}
    shared = parents.pop() if len(parents) == 1 else Path()
    out = Path(args.out) if args.out else shared / "report"
    check_run_path(out, "--out")
    if target is None:  # the sweeps' own, if they agree
        found: dict[float, Path] = {}
        for path in map(Path, args.run_dirs):
            for manifest in (path / SWEEP_FILE, path.parent / SWEEP_FILE):
                if manifest.is_file():
                    value = read_sweep_manifest(manifest).target_accuracy
                    if value is not None:
                        found.setdefault(value, manifest)
                    break
        if len(found) > 1:
            listed = ", ".join(f"{t} ({m})" for t, m in sorted(found.items()))
            raise ValueError(
                f"--target: not given, and the runs' sweeps set different target_accuracy "
                f"({listed}); allowed: --target T, 0 < T <= 1, for all of them"
            )
        target = next(iter(found), DEFAULT_TARGET)
    report = build_report(dirs, out, target=target, tensorboard=args.tensorboard)
    _print_report(report)
    return 0


def cmd_run_config(args: argparse.Namespace) -> int:
    """Print (or write) a scenario as a flat run config for ``flwr run --run-config``."""
    text = run_config_toml(load_scenario(args.scenario, args.set), None)
    if args.out:
        if Path(args.out).is_dir():
            raise ValueError(f"--out: got {args.out!r}, which is a directory; allowed: a file")
        check_run_path(Path(args.out).parent, "--out")
        atomic_write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_federation_up(args: argparse.Namespace) -> int:
    """Start a TLS federation on this machine (``down``: :func:`sims.cli.cmd_federation`)."""
    options = local_federation.FederationOptions(
        Path(args.dir), nodes=args.nodes, dataset=args.dataset,
        dataset_root=args.dataset_root, port=args.port, seed=args.seed,
    )  # fmt: skip
    for line in local_federation.usage_lines(local_federation.up(options)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return 0
