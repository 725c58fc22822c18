"""Shared fixtures: one Ray cluster and one SuperLink per test session for the end-to-end tests."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sims.engine_wake import wait_for_raylet
from sims.launch import shared_runtimes
from sims.ray_head import last_words
from tests.ray_support import start_ray_head, stop_ray_head

#: The test files that take longest (seconds of one `make test` run). They are collected
#: first, and `make test` hands files out in collection order (``--no-loadscope-reorder``;
#: pytest-xdist would otherwise hand out the files with the most tests first, and these
#: few-test, long files last), so that the two workers finish together instead of one
#: waiting for the other's last long file. The deployment files mostly wait (a SuperNode
#: asks for messages every 3 s): each goes first beside one that keeps a core busy.
SLOW_FILES = (
    "tests/e2e/test_deployment.py",  # 150 s
    "tests/sims/test_compare.py",  # 85 s
    "tests/e2e/test_deployment_nodes.py",  # 120 s
    "tests/e2e/test_strategies.py",  # 55 s
    "tests/e2e/test_simulation.py",  # 50 s
    "tests/e2e/test_references.py",  # 50 s
    "tests/e2e/test_merge_operators.py",  # 45 s
    "tests/e2e/test_federation_up_down.py",  # 40 s
    "tests/e2e/test_process_lifetime.py",  # 45 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect :data:`SLOW_FILES` first, in their order; every other file keeps its place."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}

    def key(item: pytest.Item) -> int:
        return rank.get(item.nodeid.split("::", 1)[0], len(SLOW_FILES))

    items.sort(key=key)  # stable: the order within a file, and of the other files, stays


def cores_per_worker() -> int:
    """The machine's cores shared among pytest's workers (``make test`` runs two)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


def limit_threads() -> None:
    """Give this test process :func:`cores_per_worker` PyTorch threads.

    PyTorch otherwise runs a thread per core in each of pytest's workers: on
    two cores, the kernel tests of one worker would run two threads beside the
    other worker's, and a parallel region waits for its thread that the other
    worker holds off its core. With a thread per worker, the unit tests
    (``tests/merge tests/align tests/models tests/data``, ``-n 2``) took 1 min
    34 s of machine CPU instead of 2 min 22 s. The processes a test starts keep
    PyTorch's default: giving the runs' ServerApps one thread too made the
    end-to-end tests slower (``tests/e2e/test_merge_operators.py`` and
    ``test_references.py``, ``-n 2``: 2 min 44 s of wall time against 2 min 9 s).
    """
    torch.set_num_threads(cores_per_worker())


limit_threads()


def ray_head_cpus() -> int:
    """CPUs of this test process's Ray head: the machine's cores shared among pytest's workers.

    ``make test`` runs the suite in two pytest-xdist workers, each with its
    own Ray head and SuperLink; on two cores every head has one CPU, so a
    run's clients train on one Ray actor while the other worker's run uses the
    other core. Without xdist the head has two CPUs (two actors per run).
    """
    return min(2, cores_per_worker())


@pytest.fixture(scope="session")
def ray_head() -> Iterator[tuple[str, int]]:
    """Start a local Ray head (:func:`ray_head_cpus` CPUs) once; stop it by its PID at the end.

    Yields its address and the PID of ``ray start`` (Ray's daemons run below
    that process; a run's workers run below its runtime's warm process,
    :mod:`sims.warm`, or below the head when they are started cold).
    """
    tmp = Path(tempfile.mkdtemp(prefix="fmray-"))
    proc, address = start_ray_head(tmp, ray_head_cpus())
    try:
        if not wait_for_raylet(address):  # the GCS port opens before the raylet is ready
            raise RuntimeError(
                f"the Ray head's raylet was not up in time{last_words(tmp / 'ray.log')}"
            )
        yield address, proc.pid
    finally:
        stop_ray_head(proc, tmp)


@pytest.fixture(scope="session")
def ray_address(ray_head: tuple[str, int]) -> str:
    """The session's Ray head, which end-to-end simulations join (``simulation.ray_address``).

    The suite pays Ray's start-up once instead of once per run.
    """
    return ray_head[0]


@pytest.fixture(scope="session", autouse=True)
def one_superlink_per_ray_cluster() -> Iterator[None]:
    """Simulations in this session share a SuperLink per Ray cluster (started on first use).

    As ``fedmerge compare`` does for a sweep; a run that fails gets a fresh
    runtime for the next one. Tests that run ``fedmerge simulate`` in a
    subprocess still start their own.
    """
    with shared_runtimes():
        yield
