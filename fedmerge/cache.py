"""A small on-disk cache of arrays (decoded data sets, partitions).

Every simulated client is a separate process that would otherwise decode
the same files and recompute the same partitions. Entries are directories
of ``.npy`` files keyed by a hash of everything that determines them, written
through a temporary directory and a rename, so concurrent writers never leave
half an entry, and read memory-mapped, so the processes of a machine share one
copy.

The directory is ``$FEDMERGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedmerge``,
else ``~/.cache/fedmerge``. Set ``FEDMERGE_CACHE_DIR=off`` to disable it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

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
    """Return the arrays stored under ``name-key``, computing and storing them if absent.

    An entry is a directory ``NAME-KEY/`` of ``.npy`` files, one per array,
    written under a temporary name and renamed into place, so a reader finds
    a whole entry or none. Arrays come back memory-mapped copy-on-write: every
    process on the machine (each Ray actor, the ServerApp) reads the same
    pages of the page cache instead of holding a private copy, and a process
    that writes to an array changes only its own copy of the touched pages.
    """
    root = cache_dir()
    if root is None:
        return compute()
    path = root / f"{name}-{key}"
    if path.is_dir():
        try:
            return {f.stem: np.load(f, mmap_mode="c") for f in sorted(path.glob("*.npy"))}
        except (OSError, ValueError) as exc:  # a damaged entry: recompute it
            logger.warning("cache entry %s unreadable (%s); recomputing", path, exc)
            shutil.rmtree(path, ignore_errors=True)
    arrays = compute()
    try:
        _store(path, arrays)
    except OSError as exc:
        logger.warning("cannot write cache entry %s (%s)", path, exc)
        return arrays
    return {k: np.load(path / f"{k}.npy", mmap_mode="c") for k in arrays}


def _store(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as ``path/KEY.npy`` through a temporary directory and a rename."""
    for k in arrays:
        if not k or "/" in k or k.startswith("."):
            raise ValueError(f"cache key: got {k!r}; allowed: a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        for k, array in arrays.items():
            with (tmp / f"{k}.npy").open("wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # not a concurrent writer that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
