"""The on-disk array cache: whole entries or none, memory-mapped reads, damaged entries redone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmerge import cache


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path))
    return tmp_path


def _arrays() -> dict[str, np.ndarray]:
    return {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([7, 8], np.int64)}


def test_an_entry_is_computed_once_then_read_memory_mapped(root: Path) -> None:
    calls = []

    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return _arrays()

    first = cache.cached_arrays("t", "k1", compute)
    second = cache.cached_arrays("t", "k1", compute)
    assert len(calls) == 1
    for got in (first, second):
        assert set(got) == {"a", "b"}
        np.testing.assert_array_equal(got["a"], _arrays()["a"])
        np.testing.assert_array_equal(got["b"], _arrays()["b"])
        assert isinstance(got["a"], np.memmap) and got["a"].dtype == np.float32
    assert sorted(p.name for p in (root / "t-k1").iterdir()) == ["a.npy", "b.npy"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_writing_to_a_read_array_changes_neither_the_file_nor_other_readers(root: Path) -> None:
    cache.cached_arrays("t", "k2", _arrays)
    mine = cache.cached_arrays("t", "k2", _arrays)
    mine["a"][0, 0] = -1.0  # copy-on-write: private to this mapping
    again = cache.cached_arrays("t", "k2", _arrays)
    assert again["a"][0, 0] == 0.0
    assert np.load(root / "t-k2" / "a.npy")[0, 0] == 0.0


def test_a_damaged_entry_is_recomputed(root: Path) -> None:
    cache.cached_arrays("t", "k3", _arrays)
    (root / "t-k3" / "a.npy").write_bytes(b"not an npy file")
    calls = []

    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return _arrays()

    got = cache.cached_arrays("t", "k3", compute)
    assert calls == [1]
    np.testing.assert_array_equal(got["a"], _arrays()["a"])
    np.testing.assert_array_equal(np.load(root / "t-k3" / "a.npy"), _arrays()["a"])


def test_a_concurrent_writer_that_finished_first_wins(root: Path) -> None:
    other = {"a": np.zeros(3, np.float32)}
    calls = []

    def compute() -> dict[str, np.ndarray]:
        # Another process stores the same entry while this one computes it.
        cache._store(root / "t-k4", other)
        calls.append(1)
        return other

    got = cache.cached_arrays("t", "k4", compute)
    assert calls == [1]
    np.testing.assert_array_equal(got["a"], other["a"])
    assert [p.name for p in root.iterdir()] == ["t-k4"]


def test_off_computes_every_time_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", "off")
    monkeypatch.chdir(tmp_path)
    got = cache.cached_arrays("t", "k5", _arrays)
    assert not isinstance(got["a"], np.memmap)
    assert list(tmp_path.iterdir()) == []


def test_keys_that_are_not_file_names_are_refused(root: Path) -> None:
    with pytest.raises(ValueError, match="cache key: got '../x'"):
        cache.cached_arrays("t", "k6", lambda: {"../x": np.zeros(1)})
