"""Fixtures of the deployment tests (:mod:`tests.e2e.deployment_support`)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sims.runtime import stage_app
from tests.e2e.deployment_support import Warm, deployment_of, warm_process


@pytest.fixture(scope="session")
def deployment_warm() -> Iterator[Warm]:
    """One warm process for every deployment of this test process (it imports PyTorch and
    Flower once: about 10 s of CPU here); see :func:`tests.e2e.deployment_support.warm_process`."""
    with warm_process() as warm:
        yield warm


@pytest.fixture
def deployment(
    tmp_path: Path, deployment_warm: Warm
) -> Iterator[tuple[dict[str, str], list[subprocess.Popen]]]:
    """A SuperLink on loopback; see :func:`tests.e2e.deployment_support.deployment_of`."""
    with deployment_of(tmp_path, deployment_warm) as running:
        yield running


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Flower App's own files, staged once (``flwr run`` builds its FAB from them)."""
    return stage_app(tmp_path_factory.mktemp("app"))
