"""The run directory: resolved config, per-round metrics, summary, final weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from fedmerge.atomic import atomic_write, atomic_write_text


class RunLog:
    """Writes one run's files.

    Parameters
    ----------
    run_dir : Path
        Created if missing. Holds ``config.json``, ``metrics.jsonl`` (one JSON
        object per round, appended and flushed as each round ends),
        ``checkpoint.safetensors``/``checkpoint.json`` (after every round),
        ``summary.json`` and ``model.safetensors``, all but the metrics written
        through a temp file and a rename.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def read_metrics(self) -> list[dict[str, Any]]:
        """Rows already in ``metrics.jsonl`` (a resumed run keeps them)."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` with ``rows`` atomically."""
        atomic_write_text(
            self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        )

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Write ``name`` (e.g. ``config.json``) atomically."""
        atomic_write_text(self.run_dir / name, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one round's metrics as a JSON line."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_tensors(
        self, name: str, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> str:
        """Save tensors as safetensors (temp file, then rename); return the file's SHA-256."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        blob = save(tensors, metadata=metadata)
        atomic_write(self.run_dir / name, lambda f: f.write(blob))
        return hashlib.sha256(blob).hexdigest()
