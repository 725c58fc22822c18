"""Write files through a temp file and a rename, so no reader sees half a file."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], object], *, mode: int | None = None
) -> None:
    """Call ``write`` on a temp file beside ``path``, fsync it, rename it to ``path``.

    On any error the temp file is removed and ``path`` is left as it was.
    A symbolic link is followed: the file it names is written and the link
    stays. A ``path`` that is neither a file nor a directory (a FIFO, a
    device such as ``/dev/stdout``) is written in place, as a shell
    redirection would, for no rename could replace it without destroying it.

    Parameters
    ----------
    path : Path
        The file to write; its directory is created.
    write : callable
        Called once with the temp file, opened ``"wb"``.
    mode : int or None (default: None)
        Permissions of the file, exactly (the umask does not apply). The temp
        file is created ``0o600`` and gets ``mode`` before the rename, so with
        ``mode=0o600`` (a private key) no other user can read it at any
        moment. None: the usual permissions (``0o666`` minus the umask).
    """
    if mode is not None and not 0 <= mode <= 0o777:
        raise ValueError(f"mode: got {mode!r}; allowed: 0o000 to 0o777")
    path = Path(path)
    try:
        kind = path.stat().st_mode  # of what a link names
    except FileNotFoundError:
        kind = stat.S_IFREG
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
        try:
            with path.open("wb") as f:
                write(f)
        except OSError as exc:
            if exc.filename is None:  # a failed write names no file: say which
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            raise
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``mode`` as in :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode()), mode=mode)
