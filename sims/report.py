"""Tables and plots of finished runs, grouped by everything but the seed.

:func:`build_report` turns run directories (from ``fedmerge compare`` or
``fedmerge simulate``) into ``summary.csv``, ``summary.md``, ``runs.csv`` and
three PNG plots. Runs are grouped by their resolved scenario less ``seed`` and
``simulation.*`` (resources, which do not change the numbers); a group's
numbers are the mean and sample standard deviation over its seeds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from fedmerge.atomic import atomic_write, atomic_write_text
from fedmerge.scenario import flatten

logger = logging.getLogger(__name__)

#: Per-run cache of the final model's accuracy on every client's local data.
CLIENT_ACCURACY_FILE = "client_accuracy.json"


@dataclass(frozen=True)
class Run:
    """One finished run directory, read.

    Attributes
    ----------
    run_dir : Path
    config : dict
        ``config.json`` (the resolved scenario).
    rows : list of dict
        ``metrics.jsonl``, round 0 (the initial model) first.
    summary : dict
        ``summary.json``.
    wall_time : float
        Seconds of the ``simulate`` call that finished the run (``timing.json``),
        else the ServerApp's own time (``summary.json``'s ``serverapp_time``).
    """

    run_dir: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    wall_time: float

    @property
    def seed(self) -> int:
        """The scenario's seed."""
        return int(self.config["seed"])


@dataclass
class Group:
    """Runs that differ only in their seed.

    Attributes
    ----------
    values : dict of str to object
        The group's values of the keys that vary across the report.
    runs : list of Run
        Sorted by seed.
    """

    values: dict[str, Any]
    runs: list[Run]

    def label(self, keys: list[str] | None = None) -> str:
        """``value, key=value`` text of the group (``keys``: a subset to show)."""
        shown = {k: v for k, v in self.values.items() if keys is None or k in keys}
        parts = [
            str(v) if k == "strategy.name" else f"{k.rpartition('.')[2]}={v}"
            for k, v in shown.items()
        ]
        return ", ".join(parts) or "all runs"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def load_run(run_dir: str | Path) -> Run:
    """Read a finished run directory.

    Raises
    ------
    ValueError
        If ``run_dir`` has no ``config.json``/``metrics.jsonl`` or has not completed.
    """
    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise ValueError(
                f"run_dir: {str(run_dir)!r} has no {name}; allowed: a run directory "
                f"written by fedmerge simulate or compare"
            )
    summary = _read_json(run_dir / "summary.json")
    if summary.get("status") != "completed":
        raise ValueError(
            f"run_dir: {str(run_dir)!r} has not completed (no summary.json with status "
            f"completed); allowed: finished runs (resume it with fedmerge compare)"
        )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    timing = _read_json(run_dir / "timing.json")
    wall = timing.get("wall_time", summary.get("wall_time", summary.get("serverapp_time")))
    config = json.loads((run_dir / "config.json").read_text())
    return Run(run_dir, config, rows, summary, math.nan if wall is None else float(wall))


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories of ``paths``; a sweep folder stands for the runs in it.

    A path without ``config.json`` whose subfolders hold run directories (as
    ``RUNS_ROOT/SWEEP_NAME/`` does) is replaced by those, in the order of its
    ``sweep.json`` when present, else by name. Other paths are kept as given.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        children = [] if (path / "config.json").exists() else sorted(path.glob("*/config.json"))
        if not children:
            out.append(path)
            continue
        order = [r["run_dir"] for r in _read_json(path / "sweep.json").get("runs", [])]
        rank = {name: i for i, name in enumerate(order)}
        dirs = [c.parent for c in children]
        out.extend(sorted(dirs, key=lambda d: (rank.get(d.name, len(rank)), d.name)))
    return out


def _group_key(config: dict[str, Any]) -> dict[str, Any]:
    flat = flatten(config)
    return {k: v for k, v in flat.items() if k != "seed" and not k.startswith("simulation.")}


def group_runs(runs: list[Run]) -> tuple[list[str], list[Group]]:
    """Group ``runs`` by everything but the seed.

    Returns
    -------
    keys : list of str
        Dotted scenario keys whose values differ between groups (strategy
        keys first).
    groups : list of Group
        In order of each group's first run.

    Raises
    ------
    ValueError
        If two runs are the same scenario with the same seed.
    """
    flat = [_group_key(r.config) for r in runs]
    all_keys = list(dict.fromkeys(k for f in flat for k in f))
    varying = [k for k in all_keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    varying.sort(key=lambda k: not k.startswith("strategy."))
    groups: dict[str, Group] = {}
    for run, f in zip(runs, flat, strict=True):
        key = json.dumps(f, sort_keys=True)
        group = groups.setdefault(key, Group({k: f.get(k) for k in varying}, []))
        clash = [r for r in group.runs if r.seed == run.seed]
        if clash:
            raise ValueError(
                f"run_dir: {str(run.run_dir)!r} repeats the scenario and seed of "
                f"{str(clash[0].run_dir)!r}; allowed: one run per scenario and seed"
            )
        group.runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: r.seed)
    return varying, list(groups.values())


#: Extra columns for peer-side runs (last round), and their headers.
PEER_COLUMNS: dict[str, str] = {
    "min_peer_accuracy": "min peer accuracy",
    "merged_accuracy": "peer accuracy after merge",
    "avg_model_accuracy": "average-model accuracy",
    "bytes_per_peer": "bytes per peer",
}


def rounds_to_target(rows: list[dict[str, Any]], target: float) -> int | None:
    """First round whose test accuracy is >= ``target`` (None if none is)."""
    return next((int(r["round"]) for r in rows if r["accuracy"] >= target), None)


def run_numbers(run: Run, target: float) -> dict[str, Any]:
    """A run's numbers, from its ``metrics.jsonl``."""
    acc = [r["accuracy"] for r in run.rows]
    numbers = {
        "final_accuracy": acc[-1],
        "best_accuracy": max(acc),
        "rounds_to_target": rounds_to_target(run.rows, target),
        "bytes_total": sum(r["bytes_down"] + r["bytes_up"] for r in run.rows),
        "wall_time": run.wall_time,
    }
    last = run.rows[-1]
    if "peer_accuracy" in last:  # peer-side strategies: per-peer numbers of the last round
        numbers["min_peer_accuracy"] = min(last["peer_accuracy"])
        for key in ("merged_accuracy", "avg_model_accuracy"):
            value = last.get(key)
            numbers[key] = math.nan if value is None else value
        if all("bytes_down_per_peer" in r for r in run.rows[1:]):
            numbers["bytes_per_peer"] = statistics.fmean(
                sum(r["bytes_down_per_peer"][p] + r["bytes_up_per_peer"][p] for r in run.rows[1:])
                for p in range(len(last["peer_accuracy"]))
            )
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
        for key in PEER_COLUMNS:
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
    peer = [k for k in PEER_COLUMNS if any(f"{k}_mean" in row for row in rows)]
    head += [PEER_COLUMNS[k] for k in peer]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["target_reached"] == 0:
            rounds = "not reached"
        else:
            rounds = _pm(row["rounds_to_target_mean"], row["rounds_to_target_std"], 1)
            if row["target_reached"] < row["seeds"]:
                rounds += f" ({row['target_reached']}/{row['seeds']} seeds)"
        cells = [
            *([str(row[k]) for k in keys] if keys else ["all runs"]),
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
    if peer:
        note += (
            " Peer-side runs: final/best accuracy is the mean over peers of each peer's test "
            "accuracy after its local training; the peer columns are of the last round "
            "(after merge: right after mixing, before training, DIMAT's measurement point; "
            "bytes per peer: relayed down plus up, own model included)."
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


# -- per-client accuracy -----------------------------------------------------------


def client_accuracy(run: Run) -> list[float]:
    """Accuracy of the run's final model on every client's local data.

    A last ``metrics.jsonl`` row with a ``peer_accuracy`` list (peer-side
    strategies, one model per peer) is used as is. Otherwise the final global
    model (``model.safetensors``) is evaluated on each client's local training
    data; the result is cached in ``client_accuracy.json``, keyed by the
    model file's hash.
    """
    peer = run.rows[-1].get("peer_accuracy")
    if isinstance(peer, list):
        return [float(a) for a in peer]
    model_path = run.run_dir / "model.safetensors"
    if not model_path.is_file():
        raise ValueError(
            f"run_dir: {str(run.run_dir)!r} has no model.safetensors; allowed: finished runs"
        )
    model_hash = hashlib.sha256(model_path.read_bytes()).hexdigest()
    cache_path = run.run_dir / CLIENT_ACCURACY_FILE
    cached = _read_json(cache_path)
    if cached.get("model_sha256") == model_hash:
        return [float(a) for a in cached["accuracy"]]

    from safetensors.torch import load_file

    from fedmerge.federation import client_data, initial_model
    from fedmerge.scenario import scenario_from_dict
    from fedmerge.training import evaluate

    scenario = scenario_from_dict(run.config)
    model = initial_model(scenario)
    model.load_state_dict(load_file(str(model_path)))
    accuracy = []
    for pid in range(scenario.num_clients):
        x, y = client_data(scenario, pid)
        accuracy.append(evaluate(model, x, y)[1])
    record = {"model_sha256": model_hash, "data": "local training data", "accuracy": accuracy}
    atomic_write_text(cache_path, json.dumps(record, indent=2) + "\n")
    return accuracy


# -- plots -------------------------------------------------------------------------


def _save(fig: Any, out: Path) -> Path:
    """Save a figure as PNG through a temp file and a rename."""
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return out


def _panels(keys: list[str], groups: list[Group]) -> tuple[list[str], dict[str, list[Group]]]:
    """Series keys (strategy.*) and groups per panel (the other varying keys)."""
    series = [k for k in keys if k.startswith("strategy.")] or keys
    panel_keys = [k for k in keys if k not in series]
    panels: dict[str, list[Group]] = {}
    for g in groups:
        panels.setdefault(g.label(panel_keys) if panel_keys else "", []).append(g)
    return series, panels


def _figure(n: int) -> tuple[Any, list[Any]]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.2 * cols, 3.8 * rows), dpi=110, squeeze=False, sharey=True
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _band(ax: Any, x: np.ndarray, ys: np.ndarray, label: str, color: Any) -> None:
    mean = ys.mean(axis=0)
    ax.plot(x, mean, marker="o", markersize=3, label=label, color=color)
    if len(ys) > 1:
        std = ys.std(axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=color)


def _curves(group: Group, field: str) -> np.ndarray:
    n = min(len(r.rows) for r in group.runs)
    return np.array([[row[field] for row in r.rows[:n]] for r in group.runs], dtype=float)


def plot_curves(keys: list[str], groups: list[Group], out: Path, *, x: str) -> Path:
    """Mean accuracy per round (``x="round"``) or per cumulative MB (``x="bytes"``).

    One panel per combination of the non-strategy keys that vary; one line per
    strategy, with a band of ± one sample standard deviation over seeds.
    """
    series, panels = _panels(keys, groups)
    fig, axes = _figure(len(panels))
    colors = plt.get_cmap("tab10")
    for ax, (title, members) in zip(axes, panels.items(), strict=True):
        for i, g in enumerate(members):
            acc = _curves(g, "accuracy")
            if x == "round":
                xs = _curves(g, "round")[0]
            else:
                step = _curves(g, "bytes_down") + _curves(g, "bytes_up")
                xs = np.cumsum(step, axis=1).mean(axis=0) / 1e6
            _band(ax, xs, acc, f"{g.label(series)} (n={len(g.runs)})", colors(i % 10))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round" if x == "round" else "cumulative MB communicated (down + up)")
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("global test accuracy")
    fig.suptitle("mean over seeds ± 1 sample std", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_client_accuracy(
    keys: list[str], groups: list[Group], per_client: list[list[float]], out: Path
) -> Path:
    """Box plot per group of per-client accuracy at the end, pooled over seeds."""
    series, panels = _panels(keys, groups)
    index = {id(g): i for i, g in enumerate(groups)}
    fig, axes = _figure(len(panels))
    rng = np.random.default_rng(0)  # jitter of the dots only
    for ax, (title, members) in zip(axes, panels.items(), strict=True):
        data = [per_client[index[id(g)]] for g in members]
        ax.boxplot(data, showmeans=True)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=8, alpha=0.5)
        ax.set_xticks(range(1, len(members) + 1), [g.label(series) for g in members], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("accuracy on the client's local data")
    fig.suptitle("final model, every client of every seed", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


# -- TensorBoard -------------------------------------------------------------------


def write_tensorboard(run_dir: str | Path) -> Path:
    """Write ``run_dir/tensorboard/`` (event file) from ``metrics.jsonl``.

    Scalars per round: ``accuracy``, ``loss``, ``train_loss/mean`` and
    ``train_loss/std``, ``bytes/cumulative_mb``, ``round_time``; the resolved
    scenario as text. Written in a temp directory, then renamed into place.
    """
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    final = run_dir / "tensorboard"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tensorboard."))
    try:
        writer = SummaryWriter(log_dir=str(tmp))
        config = (run_dir / "config.json").read_text() if (run_dir / "config.json").exists() else ""
        writer.add_text("scenario", f"```\n{config}\n```", 0)
        total = 0
        for row in rows:
            step = int(row["round"])
            total += row["bytes_down"] + row["bytes_up"]
            writer.add_scalar("accuracy", row["accuracy"], step)
            writer.add_scalar("loss", row["loss"], step)
            writer.add_scalar("bytes/cumulative_mb", total / 1e6, step)
            writer.add_scalar("round_time", row["round_time"], step)
            if row.get("train_loss"):
                writer.add_scalar("train_loss/mean", row["train_loss"]["mean"], step)
                writer.add_scalar("train_loss/std", row["train_loss"]["std"], step)
        writer.close()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- everything --------------------------------------------------------------------


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


def build_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    target: float = 0.7,
    tensorboard: bool = False,
) -> Report:
    """Tables and plots of ``run_dirs`` into ``out``.

    Parameters
    ----------
    run_dirs : list of path
        Finished run directories; order sets the order of groups.
    out : path
        Created if missing; gets ``summary.csv``, ``summary.md``, ``runs.csv``,
        ``accuracy_rounds.png``, ``accuracy_bytes.png``, ``client_accuracy.png``.
    target : float (default: 0.7)
        Accuracy for "rounds to target", in (0, 1].
    tensorboard : bool (default: False)
        Also write each run's ``tensorboard/`` directory.

    Raises
    ------
    ValueError
        No run directories, a bad ``target``, or a run that is missing or unfinished.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target: got {target}; allowed: a number in (0, 1]")
    if not run_dirs:
        raise ValueError("run_dir: got none; allowed: one or more run directories")
    unique = list(dict.fromkeys(d.resolve() for d in expand_run_dirs(run_dirs)))
    runs = [load_run(d) for d in unique]
    keys, groups = group_runs(runs)
    rows = summarize(groups, target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.csv", csv_text(rows))
    atomic_write_text(out / "summary.md", markdown_table(rows, keys, target))
    per_run = []
    for g in groups:
        for r in g.runs:
            n = run_numbers(r, target)
            per_run.append({**g.values, "seed": r.seed, "run_dir": str(r.run_dir), **n})
    atomic_write_text(out / "runs.csv", csv_text(per_run))
    per_client = [[a for r in g.runs for a in client_accuracy(r)] for g in groups]
    if tensorboard:
        for r in runs:
            write_tensorboard(r.run_dir)
    return Report(
        summary_csv=out / "summary.csv",
        summary_md=out / "summary.md",
        runs_csv=out / "runs.csv",
        accuracy_png=plot_curves(keys, groups, out / "accuracy_rounds.png", x="round"),
        bytes_png=plot_curves(keys, groups, out / "accuracy_bytes.png", x="bytes"),
        clients_png=plot_client_accuracy(keys, groups, per_client, out / "client_accuracy.png"),
        rows=rows,
    )
