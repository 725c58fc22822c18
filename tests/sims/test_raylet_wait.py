"""A run's Ray driver connects once the raylet is up (:func:`sims.engine_wake.wait_for_raylet`).

Ray's own driver, finding no raylet registered yet, sleeps a whole second
before it looks again. The head here is a real one, started as a runtime
starts its own; whether its raylet is alive is read back through Ray's
global state, which Ray's ``ray start`` itself waits on.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sims import engine_wake
from sims.processes import free_port
from tests.ray_support import start_ray_head, stop_ray_head


def _alive_nodes(address: str) -> list[dict[str, Any]]:
    """The cluster's nodes that Ray's global state (``ray._private.state``) reports alive."""
    from ray._private.services import _get_gcs_client_options
    from ray._private.state import GlobalState

    state = GlobalState()
    state._initialize_global_state(_get_gcs_client_options(address))  # as `ray start` does
    try:
        return [node for node in state.node_table() if node["Alive"]]
    finally:
        state.disconnect()


@pytest.fixture
def fresh_head() -> Iterator[str]:
    """A Ray head whose GCS listens and whose raylet may not have registered yet."""
    tmp = Path(tempfile.mkdtemp(prefix="fmray-"))
    proc, address = start_ray_head(tmp, num_cpus=1)
    try:
        yield address
    finally:
        stop_ray_head(proc, tmp)


def test_it_returns_once_the_raylet_is_alive(fresh_head: str) -> None:
    assert engine_wake.wait_for_raylet(fresh_head)
    assert len(_alive_nodes(fresh_head)) == 1


def test_nothing_listening_is_left_to_rays_own_connect() -> None:
    """No GCS at the address: it returns at once, where Ray's client would wait half a minute."""
    assert not engine_wake.wait_for_raylet(f"127.0.0.1:{free_port()}", timeout=30.0)


@pytest.mark.parametrize(
    ("address", "waits"),
    [("127.0.0.1:6379", True), ("", False), ("auto", False), ("ray://127.0.0.1:10001", False)],
)
def test_the_backend_waits_only_for_a_head_address(
    address: str, waits: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(engine_wake, "wait_for_raylet", lambda a: calls.append(f"wait {a}"))
    monkeypatch.setenv("RAY_ADDRESS", address)
    init = engine_wake._after_raylet(lambda backend, config: calls.append("init"))
    init(None, {})  # type: ignore[arg-type]  # the backend is only handed through
    assert calls == ([f"wait {address}"] if waits else []) + ["init"]
