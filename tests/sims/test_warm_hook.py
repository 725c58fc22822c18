"""Which runs get Ray workers from the warm process, and what Ray is asked for."""

from __future__ import annotations

import pytest

from sims.runtime import _on_this_machine
from sims.warm import RAY_WORKER, SOCKET_ENV, ray_runtime_env


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("", True),  # the runtime starts its own head
        ("127.0.0.1:6379", True),
        ("127.0.1.1:6379", True),
        ("localhost:6379", True),
        ("[::1]:6379", True),
        ("10.0.0.5:6379", False),
        ("ray-head.example.org:6379", False),
        ("auto", False),
    ],
)
def test_only_a_cluster_on_this_machine_starts_workers_through_the_shim(
    address: str, local: bool
) -> None:
    assert _on_this_machine(address) is local


def test_the_hook_adds_the_shim_and_the_socket_and_keeps_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SOCKET_ENV, "/tmp/fm-x/warm.sock")
    asked = {"env_vars": {"PYTHONPATH": "/app"}, "working_dir": "/w"}
    got = ray_runtime_env(asked)
    assert got == {
        "env_vars": {"PYTHONPATH": "/app", SOCKET_ENV: "/tmp/fm-x/warm.sock"},
        "working_dir": "/w",
        "py_executable": f"/tmp/fm-x/bin/{RAY_WORKER}",
    }
    assert asked == {"env_vars": {"PYTHONPATH": "/app"}, "working_dir": "/w"}  # not modified


def test_the_hook_leaves_a_job_alone_without_a_warm_process_or_with_its_own_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    assert ray_runtime_env({"env_vars": {"A": "1"}}) == {"env_vars": {"A": "1"}}
    assert ray_runtime_env(None) == {}
    monkeypatch.setenv(SOCKET_ENV, "/tmp/fm-x/warm.sock")
    own = {"py_executable": "python -X importtime"}
    assert ray_runtime_env(own) == own
