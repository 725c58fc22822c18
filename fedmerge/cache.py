"""A small on-disk cache of arrays (decoded data sets, partitions).

Every simulated client is a separate process that would otherwise decode
the same files and recompute the same partitions. Entries are ``.npz``
files keyed by a hash of everything that determines them, written through a
temp file and a rename, so concurrent writers never leave a half file.

The directory is ``$FEDMERGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedmerge``,
else ``~/.cache/fedmerge``. Set ``FEDMERGE_CACHE_DIR=off`` to disable it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedmerge.atomic import atomic_write

logger = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    """The cache directory, or ``None`` when caching is off."""
    env = os.environ.get("FEDMERGE_CACHE_DIR")
    if env == "off":
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedmerge"


def cache_key(*parts: object) -> str:
    """Hash of JSON-serialisable parts and arrays (24 hex digits)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
            h.update(str((part.dtype, part.shape)).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def cached_arrays(
    name: str, key: str, compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Return the arrays stored under ``name-key``, computing and storing them if absent."""
    root = cache_dir()
    if root is None:
        return compute()
    path = root / f"{name}-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:  # a corrupt entry: recompute it
            logger.warning("cache entry %s unreadable (%s); recomputing", path, exc)
    arrays = compute()
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    except OSError as exc:
        logger.warning("cannot write cache entry %s (%s)", path, exc)
    return arrays
