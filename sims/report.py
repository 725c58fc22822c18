"""Statistics and tables of finished runs, grouped by everything but the seed.

:func:`build_report` turns run directories (from ``fedmerge compare`` or
``fedmerge simulate``) into ``summary.csv``, ``summary.md``, ``runs.csv`` and
three PNG plots (drawn by :mod:`sims.plots`). Runs are grouped by their
resolved scenario less ``seed`` and ``simulation`` (resources, which do not
change the numbers; its ``adversary_*`` keys, which do, are kept); a group's
numbers are the mean and sample standard deviation over its seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmerge.atomic import atomic_write_text
from fedmerge.tasks import TaskConfig
from sims.evaluation import client_accuracy
from sims.plots import plot_client_accuracy, plot_curves, plot_fusion, write_tensorboard
from sims.runs import CONFIG_FILE, DEFAULT_TARGET, RunRecord, expand_run_dirs, load_run
from strategies.config import ConfigError, EvaluationConfig, SimulationConfig, flatten

logger = logging.getLogger(__name__)

#: Top-level scenario entries that do not change a run's numbers: runs that
#: differ only in these are one group.
UNGROUPED = ("seed", "simulation")

#: The scenario section whose varying keys tell a report's series apart (one
#: line or box each); the other varying keys make panels.
SERIES_SECTION = "strategy"

#: The key shown by its value alone in labels.
NAME_KEY = "strategy.name"


@dataclass
class Group:
    """Runs that differ only in their seed.

    Attributes
    ----------
    values : dict of str to object
        The group's values of the keys that vary across the report.
    runs : list of RunRecord
        Sorted by seed.
    """

    values: dict[str, Any]
    runs: list[RunRecord]

    def label(self, keys: list[str] | None = None) -> str:
        """``value, key=value`` text of the group (``keys``: a subset to show).

        Keys the group has no value for (an option of another strategy) are left out.
        """
        shown = {
            k: v for k, v in self.values.items() if (keys is None or k in keys) and v is not None
        }
        parts = [
            str(v) if k == NAME_KEY else f"{k.rpartition('.')[2]}={v}" for k, v in shown.items()
        ]
        return ", ".join(parts) or "all runs"


@dataclass(frozen=True)
class Grouping:
    """The groups of a report and the keys that tell them apart.

    Attributes
    ----------
    keys : list of str
        Dotted scenario keys whose values differ between groups, those of
        the strategy section first.
    series : list of str
        The strategy section's part of ``keys`` (possibly empty).
    groups : list of Group
        In order of each group's first run.
    """

    keys: list[str]
    series: list[str]
    groups: list[Group]


#: Keys of ``simulation`` that change a run's numbers (adversarial clients): grouped.
GROUPED_SIMULATION_PREFIX = "adversary_"


#: Config sections that runs written by earlier versions lack; grouped by their non-defaults.
LATER_SECTIONS: dict[str, type] = {"task": TaskConfig, "evaluation": EvaluationConfig}


def _simulation_defaults() -> dict[str, Any]:
    defaults = dataclasses.asdict(SimulationConfig())
    return {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}


def _group_key(config: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in config.items() if k not in UNGROUPED}
    simulation = config.get("simulation", {})
    defaults = _simulation_defaults()
    adversaries = {  # at their defaults they are left out, as in runs written before they existed
        k: v
        for k, v in simulation.items()
        if k.startswith(GROUPED_SIMULATION_PREFIX) and v != defaults.get(k)
    }
    if adversaries:
        kept["simulation"] = adversaries
    # likewise for sections added later: a supervised run evaluated on the server's test
    # set groups with runs written before [task] or [evaluation] existed
    for section, cls in LATER_SECTIONS.items():
        defaults = dataclasses.asdict(cls())
        changed = {k: v for k, v in kept.pop(section, {}).items() if v != defaults.get(k)}
        if changed:
            kept[section] = changed
    return flatten(kept)


def group_runs(runs: list[RunRecord]) -> Grouping:
    """Group ``runs`` by everything but the seed (and resources).

    Raises
    ------
    ValueError
        If two runs are the same scenario with the same seed.
    """
    flat = [_group_key(r.config) for r in runs]
    all_keys = list(dict.fromkeys(k for f in flat for k in f))
    varying = [k for k in all_keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    section: set[str] = set()
    for r in runs:
        section.update(flatten({SERIES_SECTION: r.config.get(SERIES_SECTION, {})}))
    series = [k for k in varying if k in section]
    keys = series + [k for k in varying if k not in section]
    groups: dict[str, Group] = {}
    for run, f in zip(runs, flat, strict=True):
        key = json.dumps(f, sort_keys=True)
        group = groups.setdefault(key, Group({k: f.get(k) for k in keys}, []))
        clash = [r for r in group.runs if r.seed == run.seed]
        if clash:
            raise ValueError(
                f"run_dir: {str(run.run_dir)!r} repeats the scenario and seed of "
                f"{str(clash[0].run_dir)!r}; allowed: one run per scenario and seed"
            )
        group.runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: r.seed)
    return Grouping(keys, series, list(groups.values()))


#: Extra columns for peer-side runs (last round), and their headers.
PEER_COLUMNS: dict[str, str] = {
    "min_peer_accuracy": "min peer accuracy",
    "first_merge_accuracy": "peer accuracy after the first merge",
    "merged_accuracy": "peer accuracy after merge",
    "avg_model_accuracy": "average-model accuracy",
    "aligned_avg_model_accuracy": "aligned average-model accuracy",
    "bytes_per_peer": "bytes per peer",
}

#: Extra columns for one-shot fusion runs (the ``fusion`` record of round 1), and their headers.
FUSION_COLUMNS = {
    "fused_accuracy": "fused accuracy",
    "client_mean_accuracy": "clients' mean accuracy",
    "ensemble_accuracy": "ensemble accuracy",
    "accuracy_barrier": "accuracy barrier",
    "loss_barrier": "loss barrier",
    "vanilla_accuracy": "vanilla accuracy",
    "vanilla_loss_barrier": "vanilla loss barrier",
}


#: Extra columns for self-supervised runs (linear probe of the global encoder), and their headers.
SSL_COLUMNS: dict[str, str] = {
    "final_linear_probe_accuracy": "linear probe (final)",
    "best_linear_probe_accuracy": "linear probe (best)",
}
#: Every extra column, in table order.
EXTRA_COLUMNS: dict[str, str] = {**PEER_COLUMNS, **SSL_COLUMNS}


def rounds_to_target(rows: list[dict[str, Any]], target: float) -> int | None:
    """First round whose test accuracy is >= ``target`` (None if none is)."""
    return next(
        (int(r["round"]) for r in rows if r["accuracy"] is not None and r["accuracy"] >= target),
        None,
    )


def run_numbers(run: RunRecord, target: float) -> dict[str, Any]:
    """A run's numbers, from its ``metrics.jsonl``."""
    # None: nobody evaluated that round (evaluation.server = "clients" and no valid reply)
    acc = [math.nan if r["accuracy"] is None else r["accuracy"] for r in run.rows]
    numbers = {
        "final_accuracy": acc[-1],
        "best_accuracy": max((a for a in acc if not math.isnan(a)), default=math.nan),
        "rounds_to_target": rounds_to_target(run.rows, target),
        "bytes_total": sum(r["bytes_down"] + r["bytes_up"] for r in run.rows),
        "wall_time": run.wall_time,
    }
    fusion = next((r["fusion"] for r in run.rows if "fusion" in r), None)
    if fusion is not None:  # one-shot fusion: the fused model against its clients and ensemble
        for key in FUSION_COLUMNS:
            value = fusion.get(key)
            if key == "client_mean_accuracy":
                value = statistics.fmean(fusion["client_accuracy"])
            elif key == "accuracy_barrier" and value is None:  # runs recorded before it was
                value = statistics.fmean(fusion["client_accuracy"]) - fusion["fused_accuracy"]
            numbers[key] = math.nan if value is None else float(value)
    last = run.rows[-1]
    if "peer_accuracy" in last:  # peer-side strategies: per-peer numbers of the last round
        numbers["min_peer_accuracy"] = min(last["peer_accuracy"])
        for key in ("merged_accuracy", "avg_model_accuracy", "aligned_avg_model_accuracy"):
            value = last.get(key)
            numbers[key] = math.nan if value is None else value
        merged = [r["merged_accuracy"] for r in run.rows if r.get("merged_accuracy") is not None]
        numbers["first_merge_accuracy"] = merged[0] if merged else math.nan
        if all("bytes_down_per_peer" in r for r in run.rows[1:]):
            numbers["bytes_per_peer"] = statistics.fmean(
                sum(r["bytes_down_per_peer"][p] + r["bytes_up_per_peer"][p] for r in run.rows[1:])
                for p in range(len(last["peer_accuracy"]))
            )
    probes = [
        r["linear_probe_accuracy"] for r in run.rows if r.get("linear_probe_accuracy") is not None
    ]
    if probes:  # self-supervised runs: accuracy is the k-NN monitor, the probe the measure
        numbers["final_linear_probe_accuracy"] = probes[-1]
        numbers["best_linear_probe_accuracy"] = max(probes)
    return numbers


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]  # e.g. no merge in a `local` run
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(groups: list[Group], target: float) -> list[dict[str, Any]]:
    """One row per group: mean and sample std over seeds.

    Columns: the group's values, ``seeds`` (count), ``seed_list``, then
    ``X_mean``/``X_std`` for final accuracy, best accuracy, rounds to target
    (over the seeds that reached it; ``target_reached`` counts them), total
    bytes and wall time. A std over one seed is NaN.
    """
    out = []
    for group in groups:
        numbers = [run_numbers(r, target) for r in group.runs]
        row: dict[str, Any] = dict(group.values)
        row["seeds"] = len(numbers)
        row["seed_list"] = " ".join(str(r.seed) for r in group.runs)
        for key in ("final_accuracy", "best_accuracy", "bytes_total", "wall_time"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([n[key] for n in numbers])
        for key in (*EXTRA_COLUMNS, *FUSION_COLUMNS):
            if all(key in n for n in numbers):
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([n[key] for n in numbers])
        reached = [n["rounds_to_target"] for n in numbers if n["rounds_to_target"] is not None]
        row["target"] = target
        row["target_reached"] = len(reached)
        row["rounds_to_target_mean"], row["rounds_to_target_std"] = (
            _mean_std([float(r) for r in reached]) if reached else (math.nan, math.nan)
        )
        out.append(row)
    return out


def _pm(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], keys: list[str], target: float) -> str:
    """The summary as a Markdown table plus a line that says how to read it."""
    head = [*(keys or ["scenario"]), "seeds", "final accuracy", "best accuracy",
            f"rounds to {target:.0%}", "communicated", "wall time"]  # fmt: skip
    peer = [k for k in EXTRA_COLUMNS if any(f"{k}_mean" in row for row in rows)]
    head += [EXTRA_COLUMNS[k] for k in peer]
    fusion = [k for k in FUSION_COLUMNS if any(f"{k}_mean" in row for row in rows)]
    head += [FUSION_COLUMNS[k] for k in fusion]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["target_reached"] == 0:
            rounds = "not reached"
        else:
            rounds = _pm(row["rounds_to_target_mean"], row["rounds_to_target_std"], 1)
            if row["target_reached"] < row["seeds"]:
                rounds += f" ({row['target_reached']}/{row['seeds']} seeds)"
        cells = [
            *(["—" if row[k] is None else str(row[k]) for k in keys] if keys else ["all runs"]),
            str(row["seeds"]),
            _pm(row["final_accuracy_mean"], row["final_accuracy_std"], 4),
            _pm(row["best_accuracy_mean"], row["best_accuracy_std"], 4),
            rounds,
            f"{row['bytes_total_mean'] / 1e6:.2f} MB",
            _pm(row["wall_time_mean"], row["wall_time_std"], 1) + " s",
        ]
        for k in peer:
            if f"{k}_mean" not in row or math.isnan(row[f"{k}_mean"]):
                cells.append("—")
            elif k == "bytes_per_peer":
                cells.append(f"{row[f'{k}_mean'] / 1e6:.2f} MB")
            else:
                cells.append(_pm(row[f"{k}_mean"], row[f"{k}_std"], 4))
        for k in fusion:
            missing = f"{k}_mean" not in row or math.isnan(row[f"{k}_mean"])
            cells.append("—" if missing else _pm(row[f"{k}_mean"], row[f"{k}_std"], 4))
        lines.append("| " + " | ".join(cells) + " |")
    paired = (
        "paired: every row uses the same seeds, hence the same partitions, initial weights "
        "and client sampling"
        if len({row["seed_list"] for row in rows}) == 1
        else "not paired: the rows' seeds differ"
    )
    note = (
        f"\nMean ± sample standard deviation over seeds ({paired}). Rounds to "
        f"{target:.0%}: first round whose global test accuracy is >= {target}, over the seeds "
        f"that reached it. Communicated: bytes sent down plus up over the whole run."
    )
    if any(k in SSL_COLUMNS for k in peer):
        note += (
            " Self-supervised runs: accuracy is the k-NN accuracy of the global encoder; "
            "the linear probe is a logistic regression on its frozen features."
        )
    if any(k in PEER_COLUMNS for k in peer):
        note += (
            " Peer-side runs: final/best accuracy is the mean over peers of each peer's test "
            "accuracy after its local training; the peer columns are of the last round "
            "(after merge: right after mixing, before training, DIMAT's measurement point; "
            "bytes per peer: relayed down plus up, own model included; the first merge's "
            "column is the first round that merged; aligned average model: every peer "
            "weight-matched onto peer 0's units, then averaged)."
        )
    if fusion:
        note += (
            " One-shot fusion runs: the fused model, the clients' own models and their "
            "ensemble (mean softmax) on the test set in the fused round; accuracy barrier: "
            "the clients' mean accuracy minus the fused model's; loss barrier: the fused "
            "model's test loss minus the clients' mean (Git Re-Basin's barrier); vanilla: "
            "the plain average of the same clients, recorded beside an aligned fusion."
        )
    note += "\n"
    return "\n".join(lines) + "\n" + note


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV (NaN written as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        )
    return buffer.getvalue()


def _client_accuracy(run: RunRecord) -> list[float]:
    """:func:`client_accuracy`; a scenario it cannot rebuild names the run's ``config.json``."""
    try:
        return client_accuracy(run)
    except ConfigError as exc:
        raise ConfigError(f"{run.run_dir / CONFIG_FILE}: {exc}") from exc


@dataclass(frozen=True)
class Report:
    """Paths :func:`build_report` wrote, and the summary rows."""

    summary_csv: Path
    summary_md: Path
    runs_csv: Path
    accuracy_png: Path
    bytes_png: Path
    clients_png: Path
    rows: list[dict[str, Any]]
    fusion_png: Path | None = None
    merged_png: Path | None = None


def build_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    target: float = DEFAULT_TARGET,
    tensorboard: bool = False,
) -> Report:
    """Tables and plots of ``run_dirs`` into ``out``.

    Parameters
    ----------
    run_dirs : list of path
        Finished run directories; order sets the order of groups.
    out : path
        Created if missing; gets ``summary.csv``, ``summary.md``, ``runs.csv``,
        ``accuracy_rounds.png``, ``accuracy_bytes.png``, ``client_accuracy.png``;
        with one-shot fusion runs also ``fusion.png`` (fused, clients, ensemble),
        with peer runs that merge ``merged_rounds.png`` (accuracy after merging).
    target : float (default: DEFAULT_TARGET, 0.7)
        Accuracy for "rounds to target", in (0, 1].
    tensorboard : bool (default: False)
        Also write each run's ``tensorboard/`` directory.

    Raises
    ------
    ValueError
        No run directories, a bad ``target``, or a run that is missing, unfinished
        or damaged (the message names the file, and the key at fault).
    """
    if not 0 < target <= 1:
        raise ValueError(f"target: got {target}; allowed: a number in (0, 1]")
    if not run_dirs:
        raise ValueError("run_dir: got none; allowed: one or more run directories")
    unique = list(dict.fromkeys(d.resolve() for d in expand_run_dirs(run_dirs)))
    runs = [load_run(d) for d in unique]
    grouping = group_runs(runs)
    groups = grouping.groups
    rows = summarize(groups, target)
    # before anything is written: it rebuilds each run's scenario from its config.json
    per_client = [[a for r in g.runs for a in _client_accuracy(r)] for g in groups]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.csv", csv_text(rows))
    atomic_write_text(out / "summary.md", markdown_table(rows, grouping.keys, target))
    per_run = []
    for g in groups:
        for r in g.runs:
            n = run_numbers(r, target)
            per_run.append({**g.values, "seed": r.seed, "run_dir": str(r.run_dir), **n})
    atomic_write_text(out / "runs.csv", csv_text(per_run))
    if tensorboard:
        for r in runs:
            write_tensorboard(r.run_dir)
    fusion_png = merged_png = None
    if any("fused_accuracy_mean" in row for row in rows):
        fusion_png = plot_fusion(grouping, rows, out / "fusion.png")
    if any(r.get("merged_accuracy") is not None for run in runs for r in run.rows):
        merged_png = plot_curves(
            grouping, out / "merged_rounds.png", x="round", field="merged_accuracy",
            ylabel="mean peer accuracy right after merging",
        )  # fmt: skip
    return Report(
        summary_csv=out / "summary.csv",
        summary_md=out / "summary.md",
        runs_csv=out / "runs.csv",
        accuracy_png=plot_curves(grouping, out / "accuracy_rounds.png", x="round"),
        bytes_png=plot_curves(grouping, out / "accuracy_bytes.png", x="bytes"),
        clients_png=plot_client_accuracy(grouping, per_client, out / "client_accuracy.png"),
        rows=rows,
        fusion_png=fusion_png,
        merged_png=merged_png,
    )
