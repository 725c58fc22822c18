"""The ``fedmerge`` command: simulate scenarios, inspect partitions."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmerge.federation import client_indices, dataset_for
from fedmerge.scenario import Scenario, load_scenario
from sims.launch import SimulationError, preflight, simulate
from sims.plots import plot_accuracy, plot_partition

console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def format_round(row: dict[str, Any]) -> str:
    """One progress line for a ``metrics.jsonl`` row."""
    head = f"  round {row['round']:3d}  acc {row['accuracy']:.4f}  loss {row['loss']:.4f}"
    if row["round"] == 0:
        return f"{head}  (initial model)"
    tl = row.get("train_loss") or {}
    nan = float("nan")
    return (
        f"{head}  train-loss {tl.get('mean', nan):.3f}±{tl.get('std', nan):.3f}  "
        f"clients {row['clients']}  up {_mb(row['bytes_up'])}  "
        f"down {_mb(row['bytes_down'])}  {row['round_time']:.2f} s"
    )


def _default_run_dir(scenario: Scenario, root: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{scenario.name}-{scenario.strategy.name}-s{scenario.seed}-{stamp}"


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run one scenario; print per-round progress and a summary."""
    scenario = load_scenario(args.scenario, args.set)
    preflight(scenario)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(scenario, args.runs_root)
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
        ("final accuracy", f"{summary['final_accuracy']:.4f}"),
        ("final loss", f"{summary['final_loss']:.4f}"),
        ("best accuracy", f"{summary['best_accuracy']:.4f}"),
        ("initial accuracy", f"{summary['initial_accuracy']:.4f}"),
        ("rounds", str(summary["rounds"])),
        ("bytes communicated", f"{_mb(summary['bytes_total'])} (up {_mb(summary['bytes_up'])}, "
         f"down {_mb(summary['bytes_down'])})"),
        ("wall time", f"{summary['wall_time']:.1f} s (start-up {summary['startup_time']:.1f} s, "
         f"rounds {summary['train_time']:.1f} s)"),
    ]:  # fmt: skip
        table.add_row(key, value)
    console.print(table)
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """Show the partition of a scenario as a per-client label histogram."""
    scenario = load_scenario(args.scenario, args.set)
    data = dataset_for(scenario)
    labels = data.train_y.numpy()
    parts = client_indices(scenario)
    counts = np.stack([np.bincount(labels[p], minlength=data.num_classes) for p in parts])
    table = Table(title=f"{scenario.dataset.name}, {scenario.partition.scheme} partition")
    table.add_column("client", justify="right")
    for c in range(data.num_classes):
        table.add_column(str(c), justify="right")
    table.add_column("total", justify="right")
    for i, row in enumerate(counts):
        table.add_row(str(i), *(str(v) if v else "." for v in row), str(int(row.sum())))
    console.print(table)
    out = Path(args.out or f"partition-{scenario.name}.png")
    title = (
        f"{scenario.dataset.name} / {scenario.partition.scheme} / {scenario.num_clients} clients"
    )
    plot_partition(counts, out, title)
    covered = int(counts.sum())
    console.print(f"{covered} of {len(labels)} training samples assigned; plot: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedmerge``."""
    parser = argparse.ArgumentParser(prog="fedmerge", description=__doc__)
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
    sim.set_defaults(func=cmd_simulate)

    part = sub.add_parser("partition", help="show a scenario's partition (table and PNG)")
    scenario_args(part)
    part.add_argument("--out", help="PNG path (default: partition-NAME.png)")
    part.set_defaults(func=cmd_partition)
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
    except (ValueError, TypeError, FileNotFoundError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        err_console.print(f"fedmerge: error: {message}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except SimulationError as exc:
        err_console.print(f"fedmerge: simulation failed: {exc}", highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
