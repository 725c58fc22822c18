"""Atomic writes: whole files or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from fedmerge.atomic import atomic_write, atomic_write_text


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
def test_new_file_gets_umask_permissions(tmp_path, mask, expected):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == expected
    assert (tmp_path / "a.json").read_text() == "{}\n"


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize(("mask", "mode"), [(0o077, 0o640), (0o022, 0o600), (0o000, 0o400)])
def test_atomic_write_text_mode_is_exact_whatever_the_umask(
    tmp_path: Path, mask: int, mode: int
) -> None:
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "f", "x", mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode


def test_atomic_write_refuses_a_bad_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^mode: got 4096; allowed: 0o000 to 0o777$"):
        atomic_write_text(tmp_path / "f", "x", mode=0o10000)
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_stays_and_the_file_it_names_is_written(tmp_path):
    target = tmp_path / "real.toml"
    target.write_text("old")
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.toml", "real.toml"]


def test_a_fifo_is_written_into_not_replaced(tmp_path):
    """A rename over a FIFO (or /dev/full, /dev/stdout) replaced it with a file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    atomic_write_text(fifo, "through the pipe")
    reader.join(timeout=10)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
