"""Every figure of ``sims/`` (matplotlib, Agg backend) and TensorBoard export.

One run: :func:`plot_accuracy`. A scenario's partition:
:func:`plot_partition`. A report's groups of runs (see
:func:`sims.report.group_runs`): :func:`plot_curves` and
:func:`plot_client_accuracy`. A run's metrics as TensorBoard events:
:func:`write_tensorboard`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmerge.atomic import atomic_write
from sims.runs import CONFIG_FILE, SUMMARY_FILE, read_rows

if TYPE_CHECKING:
    from sims.report import Group, Grouping


@functools.cache
def _pyplot() -> ModuleType:
    """The ``pyplot`` of matplotlib on the Agg backend, imported when a figure is first drawn.

    Importing it costs about 0.9 s of CPU here. Every ``fedmerge`` command
    that runs or reports imports this module; those that draw nothing (bad
    input above all) no longer pay for it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def import_pyplot_meanwhile() -> None:
    """Import ``pyplot`` in a thread of its own, for a command that draws once its runs end.

    The command waits for its runs meanwhile: its figures then cost no more
    time at the end than they did when every command imported ``pyplot``
    first thing.
    """
    threading.Thread(target=_pyplot, name="import-pyplot", daemon=True).start()


def _save(fig: Any, out: Path) -> Path:
    """Save ``fig`` through a temp file and a rename, then close it.

    ``out``'s suffix sets the format (PNG without one). An interrupted or
    failed save leaves a figure that was there before as it was.
    """
    form = Path(out).suffix.lstrip(".").lower() or "png"
    try:
        atomic_write(Path(out), lambda f: fig.savefig(f, format=form))
    finally:
        _pyplot().close(fig)
    return out


# -- one run, one partition --------------------------------------------------------


def plot_accuracy(run_dir: Path, out: Path | None = None) -> Path:
    """Plot global test accuracy per round; returns the PNG's path."""
    rows = read_rows(run_dir)
    out = out or Path(run_dir) / "accuracy.png"
    fig, ax = _pyplot().subplots(figsize=(6, 4), dpi=100)
    ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], marker="o")
    ax.set_xlabel("round")
    summary = Path(run_dir) / SUMMARY_FILE
    by_clients = summary.exists() and json.loads(summary.read_text()).get("evaluation") == "clients"
    ax.set_ylabel("clients' accuracy (own data)" if by_clients else "test accuracy")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_partition(counts: np.ndarray, out: Path, title: str) -> Path:
    """Stacked bar chart of a label-count matrix.

    Parameters
    ----------
    counts : array-like, shape (n_clients, n_classes)
        Samples of each class held by each client.
    out : Path
        The figure's file; its suffix sets the format.
    title : str
    """
    clients, classes = counts.shape
    fig, ax = _pyplot().subplots(figsize=(max(6, clients * 0.35), 4), dpi=100)
    bottom = np.zeros(clients)
    cmap = _pyplot().get_cmap("tab20" if classes > 10 else "tab10")
    for c in range(classes):
        ax.bar(range(clients), counts[:, c], bottom=bottom, color=cmap(c % cmap.N), label=str(c))
        bottom += counts[:, c]
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    if classes <= 20:
        ax.legend(title="label", fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return _save(fig, out)


# -- a report's groups -------------------------------------------------------------


def _panels(grouping: Grouping) -> tuple[list[str], dict[str, list[Group]]]:
    """Series keys (one line or box each) and the groups of each panel.

    The series are the varying keys of the strategy section (all varying
    keys if none is); each combination of the other varying keys is a panel.
    """
    series = grouping.series or grouping.keys
    panel_keys = [k for k in grouping.keys if k not in series]
    panels: dict[str, list[Group]] = {}
    for g in grouping.groups:
        panels.setdefault(g.label(panel_keys) if panel_keys else "", []).append(g)
    return series, panels


def _labels(groups: list[Group], series: list[str]) -> list[str]:
    """Short labels: the strategy name and the series keys that vary among its own groups.

    Options at the same value in every group of one strategy (its defaults,
    say) say nothing and are left out; so are options of other strategies.
    """
    from sims.report import NAME_KEY

    if NAME_KEY not in series:
        return [g.label(series) for g in groups]
    by_name: dict[str, list[Group]] = {}
    for g in groups:
        by_name.setdefault(json.dumps(g.values.get(NAME_KEY)), []).append(g)
    out = []
    for g in groups:
        same = by_name[json.dumps(g.values.get(NAME_KEY))]
        varying = [
            k for k in series
            if k != NAME_KEY and len({json.dumps(o.values.get(k)) for o in same}) > 1
        ]  # fmt: skip
        out.append(g.label([NAME_KEY, *varying]))
    return out


def _figure(n: int) -> tuple[Any, list[Any]]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = _pyplot().subplots(
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
    """``field`` per round of every run, shape (n_runs, n_rounds) (the shortest run's)."""
    n = min(len(r.rows) for r in group.runs)
    values = [[row.get(field) for row in r.rows[:n]] for r in group.runs]
    return np.array([[math.nan if v is None else v for v in run] for run in values], dtype=float)


def plot_curves(
    grouping: Grouping, out: Path, *, x: str, field: str = "accuracy", ylabel: str = ""
) -> Path:
    """Mean ``field`` per round (``x="round"``) or per cumulative MB (``x="bytes"``).

    One panel per combination of the non-strategy keys that vary; one line per
    strategy, with a band of ± one sample standard deviation over seeds.
    ``field`` is a per-round entry of ``metrics.jsonl`` (default: the global
    test accuracy; rounds without it are gaps).
    """
    series, panels = _panels(grouping)
    fig, axes = _figure(len(panels))
    from matplotlib.ticker import MaxNLocator  # imported with pyplot by now

    colors = _pyplot().get_cmap("tab10")
    for ax, (title, members) in zip(axes, panels.items(), strict=True):
        for i, (g, label) in enumerate(zip(members, _labels(members, series), strict=True)):
            acc = _curves(g, field)
            if x == "round":
                xs = _curves(g, "round")[0]
            else:
                step = _curves(g, "bytes_down") + _curves(g, "bytes_up")
                xs = np.cumsum(step, axis=1).mean(axis=0) / 1e6
            _band(ax, xs, acc, f"{label} (n={len(g.runs)})", colors(i % 10))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round" if x == "round" else "cumulative MB communicated (down + up)")
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel or "global test accuracy")
    fig.suptitle("mean over seeds ± 1 sample std", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


#: Bars of :func:`plot_fusion`: the ``summarize`` column and its legend text.
FUSION_BARS = (
    ("fused_accuracy", "merged model"),
    ("client_mean_accuracy", "clients (mean)"),
    ("ensemble_accuracy", "ensemble"),
)


def plot_fusion(grouping: Grouping, rows: list[dict[str, Any]], out: Path) -> Path:
    """Bars per group of one-shot fusion: fused model, clients' mean, ensemble (± std).

    ``rows[i]`` is :func:`sims.report.summarize`'s row of ``grouping.groups[i]``.
    A group without a fused round (another strategy in the same regime, e.g.
    ``rounds = 1`` of a merge operator) shows its final accuracy as the
    merged model's, and no client or ensemble bar.
    """
    series, panels = _panels(grouping)
    index = {id(g): i for i, g in enumerate(grouping.groups)}
    fig, axes = _figure(len(panels))
    colors = _pyplot().get_cmap("tab10")
    width = 0.8 / len(FUSION_BARS)
    for ax, (title, members) in zip(axes, panels.items(), strict=True):
        xs = np.arange(len(members))
        for b, (key, label) in enumerate(FUSION_BARS):
            picked = [rows[index[id(g)]] for g in members]
            keys = [
                "final_accuracy" if key == "fused_accuracy" and f"{key}_mean" not in r else key
                for r in picked
            ]
            means = [r.get(f"{k}_mean", math.nan) for r, k in zip(picked, keys, strict=True)]
            stds = [r.get(f"{k}_std", math.nan) for r, k in zip(picked, keys, strict=True)]
            errs = [0.0 if math.isnan(e) else e for e in stds]
            ax.bar(xs + (b - 1) * width, means, width, yerr=errs, capsize=2, label=label,
                   color=colors(b))  # fmt: skip
        ax.set_xticks(xs, _labels(members, series), fontsize=7, rotation=30, ha="right")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy (all classes)")
    fig.suptitle("one-shot fusion: mean over seeds ± 1 sample std", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_client_accuracy(grouping: Grouping, per_client: list[list[float]], out: Path) -> Path:
    """Box plot per group of per-client accuracy at the end, pooled over seeds.

    ``per_client[i]`` holds the accuracies of ``grouping.groups[i]``.
    """
    series, panels = _panels(grouping)
    index = {id(g): i for i, g in enumerate(grouping.groups)}
    fig, axes = _figure(len(panels))
    rng = np.random.default_rng(0)  # jitter of the dots only
    for ax, (title, members) in zip(axes, panels.items(), strict=True):
        data = [per_client[index[id(g)]] for g in members]
        ax.boxplot(data, showmeans=True)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=8, alpha=0.5)
        ax.set_xticks(range(1, len(members) + 1), _labels(members, series), fontsize=7)
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
    rows = read_rows(run_dir)
    final = run_dir / "tensorboard"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tensorboard."))
    try:
        writer = SummaryWriter(log_dir=str(tmp))
        config_path = run_dir / CONFIG_FILE
        config = config_path.read_text() if config_path.exists() else ""
        writer.add_text("scenario", f"```\n{config}\n```", 0)
        total = 0
        for row in rows:
            step = int(row["round"])
            total += row["bytes_down"] + row["bytes_up"]
            if row["accuracy"] is not None:  # None: no client evaluated (evaluation.server)
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
