"""PNG plots of run directories (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl``."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_accuracy(run_dir: Path, out: Path | None = None) -> Path:
    """Plot global test accuracy per round; returns the PNG's path."""
    rows = read_metrics(run_dir)
    out = out or Path(run_dir) / "accuracy.png"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_partition(counts: np.ndarray, out: Path, title: str) -> Path:
    """Stacked bar chart of a (clients, classes) label-count matrix."""
    clients, classes = counts.shape
    fig, ax = plt.subplots(figsize=(max(6, clients * 0.35), 4), dpi=100)
    bottom = np.zeros(clients)
    cmap = plt.get_cmap("tab20" if classes > 10 else "tab10")
    for c in range(classes):
        ax.bar(range(clients), counts[:, c], bottom=bottom, color=cmap(c % cmap.N), label=str(c))
        bottom += counts[:, c]
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    if classes <= 20:
        ax.legend(title="label", fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
