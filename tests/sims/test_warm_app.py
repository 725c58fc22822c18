"""A warm process started with an app imports it once; what it forks starts with it imported.

A real warm process (``python -m sims.warm serve SOCKET APP``), asked the way
a Ray worker's shim asks it: the child runs a probe script in place of Ray's
``default_worker.py``. The app is a toy whose modules write a line (module,
PID) to a file when they are imported, so who imported what is on record.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sims.processes import command_line, descendants, stop_tree
from sims.warm import RAY_WORKER, prepare_drivers
from tests.sims.warm_requests import ask, start_warm

#: What the probe prints: for each of the toy app's modules, its file if imported, else null;
#: then what Flower's own load_app returns for the ServerApp, loaded from another copy.
PROBE = """
import json, sys
from flwr.supercore.object_ref import load_app
names = ("toyapp.server", "toyapp.client")
seen = {n: getattr(sys.modules.get(n), "__file__", None) for n in names}
app = load_app("toyapp.server:app", ValueError, project_dir=sys.argv[1])
print(json.dumps({"modules": seen, "app": app, "path": sys.path}))
"""


def _toy_app(root: Path, marker: Path, *, tag: str = "staged", broken: bool = False) -> Path:
    """A Flower App directory whose two modules record their import in ``marker``."""
    (root / "toyapp").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        "[tool.flwr.app.components]\n"
        'serverapp = "toyapp.server:app"\nclientapp = "toyapp.client:app"\n'
    )
    (root / "toyapp" / "__init__.py").write_text("")
    for module in ("server", "client"):
        text = (
            "import os\n"
            f"with open({str(marker)!r}, 'a') as f:\n"
            f"    f.write(f'toyapp.{module} {{os.getpid()}}\\n')\n"
            f"app = {tag!r}\n"
        )
        if broken and module == "client":
            text += "raise RuntimeError('this app does not import')\n"
        (root / "toyapp" / f"{module}.py").write_text(text)
    return root


def _start(tmp_path: Path, app: Path | None) -> tuple[dict[str, str], subprocess.Popen[bytes]]:
    # what is tested is the app's import, not Flower's and PyTorch's
    return start_warm(tmp_path / "warm", tmp_path / "warm.log", app, bare=True)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The warm processes a test starts; each stopped with all it forked."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop_tree([proc.pid], 1.0)
        proc.wait()


def _probe(env: dict[str, str], tmp_path: Path, other_copy: Path) -> tuple[int, dict]:
    """Run :data:`PROBE` in a child of the warm process, as a Ray worker's shim asks for one.

    Returns the child's PID and what it printed.
    """
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = tmp_path / "probe.out"
    with out.open("wb") as sink, open(os.devnull, "wb") as null:
        conn, pid = ask(env, RAY_WORKER, [str(script), str(other_copy)],
                        [null.fileno(), sink.fileno(), sink.fileno()])  # fmt: skip
    with conn:
        while conn.recv(1 << 16):  # the connection closes when the child has exited
            pass
    lines = out.read_text().splitlines()
    assert lines, "the probe printed nothing"
    try:
        return pid, dict(json.loads(lines[-1]))
    except json.JSONDecodeError:
        raise AssertionError(out.read_text()) from None


def _imports(marker: Path) -> list[tuple[str, int]]:
    if not marker.exists():
        return []
    return [(m, int(p)) for m, p in (line.split() for line in marker.read_text().splitlines())]


def test_the_app_is_imported_once_by_the_warm_process_and_used_as_imported(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    marker = tmp_path / "imports.txt"
    app = _toy_app(tmp_path / "app", marker)
    # another copy, as Flower installs a run's FAB: what imports it is on record too
    fab = _toy_app(tmp_path / "fab", tmp_path / "fab-imports.txt", tag="fab")
    env, proc = _start(tmp_path, app)
    started.append(proc)
    prepare_drivers(env)  # before any child: the drivers' process imports the app itself
    first_pid, first = _probe(env, tmp_path, fab)  # the warm process's first child
    _, second = _probe(env, tmp_path, fab)

    # the first child was forked before the warm process imported the app: Flower's
    # load_app imported the ServerApp's module from the FAB's copy
    assert first["modules"] == {"toyapp.server": None, "toyapp.client": None}
    assert first["app"] == "fab"
    assert _imports(tmp_path / "fab-imports.txt") == [("toyapp.server", first_pid)]
    # then the warm process imported both modules, once, from the staged copy; every later
    # child has them, and load_app takes them as they are instead of the FAB's copy
    assert second["modules"] == {
        "toyapp.server": str(app / "toyapp" / "server.py"),
        "toyapp.client": str(app / "toyapp" / "client.py"),
    }
    assert second["app"] == "staged"
    assert str(app) not in second["path"]  # sys.path is the program's own
    assert _imports(tmp_path / "fab-imports.txt") == [("toyapp.server", first_pid)]
    # the drivers' process, forked before that, imported them too (after Ray)
    deadline = time.monotonic() + 60
    while len(_imports(marker)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    drivers = [p for p in descendants(proc.pid) if "sims.warm drivers" in command_line(p)]
    assert len(drivers) == 1
    assert sorted(_imports(marker)) == sorted(
        (f"toyapp.{m}", pid) for m in ("server", "client") for pid in (proc.pid, drivers[0])
    )


def test_an_app_that_fails_to_import_is_forgotten_and_the_warm_process_serves_on(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    marker = tmp_path / "imports.txt"
    app = _toy_app(tmp_path / "app", marker, broken=True)
    fab = _toy_app(tmp_path / "fab", tmp_path / "fab-imports.txt", tag="fab")
    env, proc = _start(tmp_path, app)
    started.append(proc)
    _probe(env, tmp_path, fab)
    _, later = _probe(env, tmp_path, fab)
    # the warm process tried (server imported, client raised), then forgot the package
    assert _imports(marker) == [("toyapp.server", proc.pid), ("toyapp.client", proc.pid)]
    assert later["modules"] == {"toyapp.server": None, "toyapp.client": None}
    assert later["app"] == "fab"
    assert "this app does not import" in (tmp_path / "warm.log").read_text()
    assert proc.poll() is None
