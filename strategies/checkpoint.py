"""A run's checkpoint as one unit, and the checks that a resume may trust it.

The checkpoint of round ``R`` is ``checkpoint.safetensors``: the weights plus,
in the safetensors header, ``{"round", "digest", "sampler_state"}`` under the
metadata key :data:`METADATA_KEY`. It is written through a temp file and a
rename, so weights and round always belong together. ``checkpoint.json``
repeats that metadata with the SHA-256 of the weights file, for readers that
do not parse safetensors (``fedmerge compare`` finds resumable runs by it);
it is written after the weights, so a run stopped between the two writes
leaves a ``checkpoint.json`` one round behind: that one case resumes from
the weights file (which holds its own round), with a warning.

:func:`read_checkpoint` and :func:`resume_rows` check a run directory before
it resumes: the two files must describe the same checkpoint, and
``metrics.jsonl`` must hold the rows of rounds 0 to ``R`` in order. Anything
else is a :class:`CheckpointError` naming the file (and line) and what to do.
Both run in the ServerApp and, before anything starts, in ``fedmerge
simulate`` and ``fedmerge compare``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from fedmerge.errors import ConfigError, one_line

__all__ = [
    "CHECKPOINT_JSON",
    "CHECKPOINT_WEIGHTS",
    "METADATA_KEY",
    "CheckpointError",
    "CheckpointInfo",
    "checkpoint_metadata",
    "read_checkpoint",
    "resume_rows",
]

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
METRICS = "metrics.jsonl"
#: Key of the checkpoint's metadata (JSON text) in the safetensors header.
METADATA_KEY = "fedmerge.checkpoint"

logger = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A run directory's checkpoint or metrics cannot be resumed; the message says why."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``checkpoint.safetensors`` says about itself.

    Attributes
    ----------
    round : int
        The last round the checkpoint holds.
    digest : str
        :meth:`~strategies.config.RunConfig.digest` of the run that wrote it.
    sampler_state : dict
        The client sampler's state after ``round``.
    sha256 : str
        SHA-256 of the weights file (hex).
    """

    round: int
    digest: str
    sampler_state: dict[str, Any]
    sha256: str


def _restart(run_dir: Path) -> str:
    return f"delete {str(run_dir)!r} or rerun with --force (force=True from Python) to start over"


def checkpoint_metadata(round: int, digest: str, sampler_state: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of a checkpoint (string values, as safetensors requires)."""
    meta = {"round": round, "digest": digest, "sampler_state": sampler_state}
    return {METADATA_KEY: json.dumps(meta, sort_keys=True)}


def read_checkpoint(run_dir: Path) -> CheckpointInfo | None:
    """The checkpoint of ``run_dir``, checked; ``None`` if it has none.

    Raises
    ------
    CheckpointError
        If ``checkpoint.json`` exists without weights, if the weights file
        is damaged or carries no metadata, or if ``checkpoint.json`` does not
        describe that weights file (another round, other weights), unless it
        is the previous checkpoint of the same run (stopped between writes).
    """
    run_dir = Path(run_dir)
    weights, meta_path = run_dir / CHECKPOINT_WEIGHTS, run_dir / CHECKPOINT_JSON
    if not weights.exists():
        if meta_path.exists():
            raise CheckpointError(
                f"{weights}: got no such file beside {meta_path}; allowed: both files of "
                f"one checkpoint (delete {meta_path.name} or rerun with --force, force=True from "
                f"Python, to start over)"
            )
        return None
    try:
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        with safe_open(str(weights), framework="pt") as f:
            header = (f.metadata() or {}).get(METADATA_KEY)
            for key in f.keys():
                f.get_tensor(key)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(
            f"{weights}: got a damaged file ({str(exc).splitlines()[0]}); "
            f"allowed: a checkpoint written by fedmerge ({_restart(run_dir)})"
        ) from None
    try:
        meta: Any = json.loads(header) if header is not None else {}
        info = CheckpointInfo(
            int(meta["round"]), str(meta["digest"]), dict(meta["sampler_state"]), sha
        )
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(
            f"{weights}: got no fedmerge checkpoint metadata in its header; allowed: a "
            f"checkpoint written by this version of fedmerge ({_restart(run_dir)})"
        ) from None
    if meta_path.exists():
        try:
            mirror = json.loads(meta_path.read_text())
            mirror_round, mirror_sha = mirror["round"], mirror["weights_sha256"]
            mirror_digest = mirror["digest"]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(
                f"{meta_path}: got no checkpoint record ({type(exc).__name__}: "
                f"{one_line(exc, 80)}); allowed: the JSON that fedmerge writes "
                f"beside {weights.name} (delete {meta_path.name} to resume from "
                f"{weights.name}, or {_restart(run_dir)})"
            ) from None
        if mirror_round == info.round - 1 and mirror_digest == info.digest:
            # Stopped between the two writes: the weights file (one unit with
            # its round) is the newer checkpoint, and resuming from it is exact.
            logger.warning(
                "%s is one round behind %s (the run stopped between the two writes); "
                "resuming from round %d",
                meta_path,
                weights.name,
                info.round,
            )
        elif mirror_sha != sha or mirror_round != info.round:
            raise CheckpointError(
                f"{meta_path}: got round {mirror_round!r} with weights {str(mirror_sha)[:12]}, but "
                f"{weights.name} holds round {info.round} with weights {sha[:12]}; allowed: "
                f"the two files of one checkpoint (delete {meta_path.name} to resume from "
                f"{weights.name}, or {_restart(run_dir)})"
            )
    return info


def resume_rows(run_dir: Path, last_round: int) -> list[dict[str, Any]]:
    """Rows 0 to ``last_round`` of ``run_dir/metrics.jsonl``, checked; later rows dropped.

    Rows after ``last_round`` (written before the run stopped, not yet
    checkpointed) are dropped: the resumed run computes them again. A
    half-written last line is such a row.

    Raises
    ------
    CheckpointError
        If a row up to ``last_round`` is missing, is no JSON object, or is
        not the row of the round its place says; the message names the
        file and line.
    """
    path = Path(run_dir) / METRICS
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path}: cannot be read ({exc}); allowed: a readable metrics file "
            f"({_restart(Path(run_dir))})"
        ) from None
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, 1):
        if len(rows) > last_round:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        expected = len(rows)
        if not isinstance(row, dict) or row.get("round") != expected:
            raise CheckpointError(
                f"{path}:{lineno}: got {line[:60]!r}; allowed: the JSON row of round {expected} "
                f"(the checkpoint holds rounds 0 to {last_round}; {_restart(Path(run_dir))})"
            )
        rows.append(row)
    if len(rows) <= last_round:
        raise CheckpointError(
            f"{path}: got {len(rows)} rows; allowed: the rows of rounds 0 to "
            f"{last_round}, as the checkpoint holds ({_restart(Path(run_dir))})"
        )
    return rows
