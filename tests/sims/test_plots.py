"""Figures are written through a temp file and a rename: a failed save leaves the old figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from sims import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _broken_savefig(self: Any, fname: str | Path | IO[bytes], *args: Any, **kwargs: Any) -> None:
    """Write half a figure, then fail, as a full disk or an interrupt would."""
    if hasattr(fname, "write"):
        fname.write(b"half a figure")
    else:
        Path(fname).write_bytes(b"half a figure")
    raise OSError("No space left on device")


def test_a_failed_save_leaves_the_partition_figure_that_was_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "partition.png"
    out.write_bytes(b"the figure before")
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", _broken_savefig)
    with pytest.raises(OSError, match="No space left"):
        plots.plot_partition(np.array([[1, 2], [3, 0]]), out, "two clients")
    assert out.read_bytes() == b"the figure before"
    assert [p.name for p in tmp_path.iterdir()] == ["partition.png"]  # no temp file left


def test_a_failed_save_leaves_the_accuracy_figure_that_was_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"round": r, "accuracy": 0.1 * r} for r in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "accuracy.png"
    out.write_bytes(b"the figure before")
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", _broken_savefig)
    with pytest.raises(OSError, match="No space left"):
        plots.plot_accuracy(tmp_path)
    assert out.read_bytes() == b"the figure before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "metrics.jsonl"]


def test_figures_are_pngs(tmp_path: Path) -> None:
    out = plots.plot_partition(np.array([[1, 2], [3, 0]]), tmp_path / "p.png", "two clients")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    rows = [{"round": r, "accuracy": 0.1 * r} for r in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plots.plot_accuracy(tmp_path).read_bytes()[:8] == PNG_SIGNATURE
