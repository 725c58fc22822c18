"""The ``fedmerge`` command: simulate scenarios, compare strategies, deploy a federation."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from rich.console import Console
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
from sims.certs import write_certs
from sims.checks import (
    check_run_dir,
    check_run_path,
    clear_run_dir,
    run_dir_lock,
)
from sims.compare import PlannedRun, Sweep, load_sweep, plan_sweep, run_sweep, write_manifest
from sims.deploy import run_status, superlink_command, supernode_command
from sims.launch import FLOWER_ENV, SimulationError, preflight, run_config_toml, simulate
from sims.node import supernode_with_worker, supervise
from sims.plots import plot_accuracy, plot_partition
from sims.report import DEFAULT_TARGET, Report, build_report
from sims.runs import expand_run_dirs
from sims.scenario_files import load_scenario
from strategies.config import ConfigError, RunConfig, StrategyConfig
from strategies.federation import federation
from strategies.plugins import get_plugin, load_plugins, plugin_names

# Wide output when piped (rich would wrap tables at 80 columns).
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2
#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


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
    console.print(
        f"[bold]fedmerge[/] {scenario.name}: {scenario.strategy.name} on {scenario.dataset.name} "
        f"({scenario.partition.scheme}), {scenario.model.name}, {scenario.num_clients} clients, "
        f"{scenario.clients_per_round}/round, {scenario.rounds} rounds -> {run_dir}",
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
    check_run_path(out.parent)
    fed = federation(scenario)
    data = fed.data
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
    states = [r.state for r in runs]
    console.print(
        f"[bold]fedmerge compare[/] {sweep.name}: {len(runs)} runs "
        f"({states.count('done')} cached, {states.count('resume')} to resume, "
        f"{states.count('new')} new) -> {sweep_dir}",
        soft_wrap=True,
    )
    check_run_path(sweep_dir)
    with run_dir_lock(sweep_dir):
        _compare_locked(args, sweep, runs, out)
    return 0


def _compare_locked(
    args: argparse.Namespace, sweep: Sweep, runs: list[PlannedRun], out: Path
) -> None:
    todo = [r for r in runs if r.state != "done"]
    write_manifest(sweep, runs, args.runs_root)
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
    dirs = expand_run_dirs(args.run_dirs)
    parents = {d.resolve().parent for d in dirs}
    shared = parents.pop() if len(parents) == 1 else Path()
    out = Path(args.out) if args.out else shared / "report"
    target = args.target
    for path in [Path(d) for d in args.run_dirs] if target is None else []:
        for manifest in (path / "sweep.json", path.parent / "sweep.json"):
            if target is None and manifest.is_file():
                target = json.loads(manifest.read_text()).get("target_accuracy")
    target = DEFAULT_TARGET if target is None else target
    report = build_report(dirs, out, target=target, tensorboard=args.tensorboard)
    _print_report(report)
    return 0


def cmd_run_config(args: argparse.Namespace) -> int:
    """Print (or write) a scenario as a flat run config for ``flwr run --run-config``."""
    text = run_config_toml(load_scenario(args.scenario, args.set), None)
    if args.out:
        atomic_write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """Write a private CA, a SuperLink certificate and SuperNode key pairs."""
    for path in write_certs(Path(args.out), args.host, args.nodes):
        console.print(str(path), highlight=False, markup=False, soft_wrap=True)
    return 0


def _exec_flower(cmd: list[str]) -> int:
    """Replace this process by Flower's (same PID), telemetry and update checks off."""
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, {**os.environ, **FLOWER_ENV})


def cmd_superlink(args: argparse.Namespace) -> int:
    """Start flower-superlink with TLS and SuperNode authentication."""
    certs = Path(args.certs) if args.certs else None
    return _exec_flower(
        superlink_command(
            certs=certs, host=args.host, port=args.port, insecure=args.insecure,
            force=args.force_insecure, auth=not args.no_auth, extra=args.extra,
        )
    )  # fmt: skip


def cmd_supernode(args: argparse.Namespace) -> int:
    """Start flower-supernode with TLS and its key, and its long-lived ClientApp process."""
    cmd = supernode_command(
        superlink=args.superlink, node_config=args.node_config,
        certs=Path(args.certs) if args.certs else None,
        key=Path(args.key) if args.key else None, insecure=args.insecure,
        force=args.force_insecure, port=args.port, extra=args.extra,
    )  # fmt: skip
    if args.isolation == "subprocess":  # Flower's default: a new process per message
        return _exec_flower(cmd)
    return supervise(supernode_with_worker(cmd, args.port), {**os.environ, **FLOWER_ENV})


def cmd_federation(args: argparse.Namespace) -> int:
    """Start (up) or stop (down) a TLS federation on this machine."""
    if args.action == "down":
        pids = local_federation.down(Path(args.dir))
        console.print(
            f"federation down: stopped {len(pids)} processes {pids}", highlight=False, markup=False
        )
        return 0
    options = local_federation.FederationOptions(
        Path(args.dir), nodes=args.nodes, dataset=args.dataset,
        dataset_root=args.dataset_root, port=args.port, seed=args.seed,
    )  # fmt: skip
    for line in local_federation.usage_lines(local_federation.up(options)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print how a run ended; exit 0 completed, 3 degraded, 1 failed, 4 no summary."""
    line, code = run_status(args.run_dir)
    console.print(line, highlight=False, markup=False, soft_wrap=True)
    return code


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE; see PROG --help`` and exit with code 2."""
        _error_line(f"error: {self.prog}: {message}; see {self.prog} --help")
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedmerge``."""
    parser = _Parser(prog="fedmerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def scenario_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "scenario", nargs="?", help="scenario TOML file or shipped name (default: default)"
        )
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a scenario key, e.g. --set train.lr=0.05 (repeatable)",
        )

    sim = sub.add_parser("simulate", help="run a scenario through Flower's simulation runtime")
    scenario_args(sim)
    sim.add_argument(
        "--run-dir", help="write the run here (default: RUNS_ROOT/NAME-STRATEGY-SEED-TIME)"
    )
    sim.add_argument(
        "--runs-root", default="runs", help="parent of new run directories (default: runs)"
    )
    sim.add_argument(
        "--force",
        action="store_true",
        help="delete the run in --run-dir first (another scenario's, or a damaged checkpoint)",
    )
    sim.set_defaults(func=cmd_simulate)

    part = sub.add_parser("partition", help="show a scenario's partition (table and PNG)")
    scenario_args(part)
    part.add_argument("--out", help="PNG path (default: partition-NAME.png)")
    part.set_defaults(func=cmd_partition)

    cmp = sub.add_parser("compare", help="run a sweep of paired scenarios, then tables and plots")
    cmp.add_argument("sweep", help="sweep TOML file (see sims/sweeps/)")
    cmp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key in every run, e.g. --set rounds=50 (repeatable)",
    )
    cmp.add_argument("--force", action="store_true", help="delete and re-run finished runs")
    cmp.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="runs at a time on the shared Ray cluster (default: 1)",
    )
    cmp.add_argument(
        "--runs-root", default="runs", help="runs go to RUNS_ROOT/SWEEP_NAME/DIGEST (default: runs)"
    )
    cmp.add_argument("--out", help="report folder (default: RUNS_ROOT/SWEEP_NAME/report)")
    cmp.add_argument(
        "--tensorboard", action="store_true", help="write RUN_DIR/tensorboard/ for every run"
    )
    cmp.set_defaults(func=cmd_compare)

    strat = sub.add_parser("strategies", help="list the strategies, their options and defaults")
    strat.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="also import this plugin module or .py file (repeatable)",
    )
    strat.add_argument(
        "--json", action="store_true", help="print the list as JSON (name, side, summary, options)"
    )
    strat.set_defaults(func=cmd_strategies)

    rep = sub.add_parser("report", help="tables and plots from existing run directories")
    rep.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="finished run directories, or a sweep folder (RUNS_ROOT/SWEEP_NAME) for all its runs",
    )
    rep.add_argument("--out", help="report folder (default: PARENT/report if they share one)")
    rep.add_argument(
        "--target",
        type=float,
        help=f"accuracy for 'rounds to target' (default: the sweep's target_accuracy, "
        f"else {DEFAULT_TARGET})",
    )
    rep.add_argument(
        "--tensorboard", action="store_true", help="also write RUN_DIR/tensorboard/ for every run"
    )
    rep.set_defaults(func=cmd_report)

    rc = sub.add_parser(
        "run-config", help="a scenario as a flat TOML file for flwr run --run-config"
    )
    scenario_args(rc)
    rc.add_argument("-o", "--out", help="write it here (default: standard output)")
    rc.set_defaults(func=cmd_run_config)

    crt = sub.add_parser("certs", help="a private CA, a SuperLink certificate, node key pairs")
    crt.add_argument("out", metavar="DIR", help="where to write them")
    crt.add_argument(
        "--host", action="append", required=True, help="SuperLink name or IP (repeatable)"
    )
    crt.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs (default: 0)")
    crt.set_defaults(func=cmd_certs)

    def flower_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--certs", metavar="DIR", help="directory written by fedmerge certs")
        p.add_argument("--insecure", action="store_true", help="no TLS (loopback only)")
        p.add_argument(
            "--force-insecure", action="store_true", help="allow --insecure off loopback"
        )
        p.add_argument("extra", nargs="*", help="more Flower arguments, after --")

    sl = sub.add_parser("superlink", help="flower-superlink with TLS and node authentication")
    sl.add_argument("--host", default="0.0.0.0", help="listen address (default: 0.0.0.0)")
    sl.add_argument("--port", type=int, default=9091, help="the one port (default: 9091)")
    sl.add_argument("--no-auth", action="store_true", help="no --enable-supernode-auth")
    flower_args(sl)
    sl.set_defaults(func=cmd_superlink)

    sn = sub.add_parser("supernode", help="flower-supernode with TLS and its key")
    sn.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    sn.add_argument(
        "--node-config", required=True, help="e.g. \"partition-id=0 data-dir='/srv/data'\""
    )
    sn.add_argument("--key", help="this node's private key (node-I of fedmerge certs)")
    sn.add_argument("--port", type=int, help="local ClientApp API port (default: 9094)")
    sn.add_argument(
        "--isolation",
        choices=["process", "subprocess"],
        default="process",
        help="process: one long-lived ClientApp process serves every message (default); "
        "subprocess: Flower's default, a new ClientApp process per message",
    )
    flower_args(sn)
    sn.set_defaults(func=cmd_supernode)

    fed = sub.add_parser(
        "federation", help="up: a TLS federation on this machine (SuperLink, nodes); down: stop it"
    )
    fed.add_argument("action", choices=["up", "down"])
    fed.add_argument("dir", metavar="DIR", help="its certificates, data, logs and state file")
    fed.add_argument("--nodes", type=int, default=2, help="SuperNodes (default: 2)")
    fed.add_argument(
        "--dataset", default="digits", help="data set split among the nodes (default: digits)"
    )
    fed.add_argument("--dataset-root", help="its files, if it is not generated")
    fed.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    fed.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    fed.set_defaults(func=cmd_federation)

    st = sub.add_parser("status", help="how a run ended (exit 0 completed, 3 degraded, 1 failed)")
    st.add_argument("run_dir", metavar="RUN_DIR")
    st.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedmerge`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM exits through Python's unwinding, so that `simulate` stops the
    # SuperLink (and with it Ray) that it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        _error_line(
            "interrupted: the processes it started are stopped; finished rounds are kept "
            "(run the same command again to resume from the last checkpoint)"
        )
        return EXIT_INTERRUPTED
    except SimulationError as exc:
        err_console.print(
            f"fedmerge: simulation failed: {exc}", highlight=False, markup=False, soft_wrap=True
        )
        return 1
    except local_federation.FederationError as exc:
        _error_line(f"federation failed: {exc}")
        return 1
    except Exception as exc:  # one line for bad input; a traceback for bugs
        message = input_error(exc)
        if message is None:
            traceback.print_exc()
            _error_line(
                f"internal error ({type(exc).__name__}), a bug in fedmerge: please report it "
                f"with the traceback above"
            )
            return 1
        _error_line(f"error: {message}")
        return EXIT_BAD_INPUT


def _error_line(text: str) -> None:
    err_console.print(f"fedmerge: {text}", highlight=False, markup=False, soft_wrap=True)


def input_error(exc: BaseException) -> str | None:
    """The one-line message for an exception caused by the input; ``None`` for a bug.

    Bad input is a :class:`ValueError` (``ConfigError`` and the kernel's
    errors among them: their message is the line), an :class:`OSError` (a
    path that cannot be read or written: the path and the reason), a
    :class:`RecursionError` (input nested too deeply) or running out of
    memory (:class:`MemoryError`, or PyTorch's allocator failing). Anything
    else, e.g. a ``TypeError`` or ``KeyError`` in fedmerge's own code, is a
    bug and keeps its traceback.
    """
    if isinstance(exc, ValueError):
        text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        return text
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "input"
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{where}: got {reason}; allowed: a path this user can read and write"
    if isinstance(exc, RecursionError):
        return "input: got data nested too deeply; allowed: a few levels of tables and lists"
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    ):
        return "memory: got a scenario that does not fit in memory; allowed: a smaller one"
    return None


if __name__ == "__main__":
    sys.exit(main())
