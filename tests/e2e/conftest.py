"""Fixtures of the deployment tests (:mod:`tests.e2e.deployment_support`)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sims.runtime import stage_app
from tests.e2e.deployment_support import deployment_of


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[dict[str, str], list[subprocess.Popen]]]:
    """A SuperLink on loopback; see :func:`tests.e2e.deployment_support.deployment_of`."""
    with deployment_of(tmp_path) as running:
        yield running


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Flower App's own files, staged once (``flwr run`` builds its FAB from them)."""
    return stage_app(tmp_path_factory.mktemp("app"))
