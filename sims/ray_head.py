"""``ray start`` whose raylet starts its Python processes without a cold import of Ray first.

Ray starts a head's Python processes (each worker by the raylet; the Client
server by ``ray start``, though a head started here has none: see
:func:`main`) as ``PYTHON setup_worker.py PROGRAM ARGS --language=PYTHON
[--serialized-runtime-env-context=JSON]``, where ``PYTHON`` is the
interpreter of ``ray start``. ``setup_worker.py`` imports Ray (about 0.9 s of
CPU here) only to apply the runtime environment's variables and ``exec``
the environment's Python on ``PROGRAM ARGS``. The Ray workers of a run then
start through the warm process (:data:`sims.warm.RAY_WORKER`), which makes
that cold import most of a worker's start.

``python -m sims.ray_head PYTHON start ARGS`` runs ``ray start ARGS`` with
``sys.executable`` set to ``PYTHON``, a script written by
:func:`write_python`. That script (:func:`python_main`, standard library
only) does what ``setup_worker.py`` does for a plain runtime environment
(variables and ``py_executable``) and execs the real interpreter for
everything else, ``setup_worker.py`` included where the environment asks
for more (a container, a command prefix, another language).

Where the head belongs to a :class:`sims.runtime.Runtime`, whose warm process
has imported Flower's and PyTorch's dependencies (gRPC, protobuf, NumPy)
already, the script hands Ray's own Python programs of the head
(:data:`RAY_PROGRAMS`: its log monitor and the raylet's two agents) to that
warm process, which runs each in a fork of itself: about 1.4 s of CPU less
per head here (1.30 and 1.03 s for the agents instead of 1.88 and 1.45 s,
0.56 s for the log monitor instead of 0.92 s).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

#: The name of the interpreter script that a head's raylet starts its processes with.
PYTHON = "fedmerge-ray-python"

#: Ray's script that sets up a runtime environment, then execs the worker.
SETUP_WORKER = "setup_worker.py"

#: The keys of Ray's serialized runtime environment context that :func:`worker_argv`
#: applies itself. With any other key set, Ray's own ``setup_worker.py`` runs.
_CONTEXT_KEYS = frozenset(
    {"command_prefix", "env_vars", "py_executable", "override_worker_entrypoint", "java_jars"}
)

_CONTEXT = "--serialized-runtime-env-context"
_LANGUAGE = "--language"


def write_python(bin_dir: Path) -> Path:
    """Write the :data:`PYTHON` script into ``bin_dir``; return its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / PYTHON
    source = Path(__file__).resolve().parent.parent
    script.write_text(
        f"#!{sys.executable} -S\n"
        "import sys\n"
        f"sys.path.insert(0, {str(source)!r})\n"
        "from sims.ray_head import python_main\n"
        "sys.exit(python_main())\n"
    )
    script.chmod(0o755)
    return script


#: What a head that fedmerge starts adds to its environment. When the first driver
#: connects, the raylet starts a worker per CPU for tasks without a runtime environment;
#: the runs' actors have one (the warm process's shim) and never use them: that was
#: about 0.7 s of CPU each, cold, just as the actors start.
HEAD_ENV = {"RAY_prestart_worker_first_driver": "0"}


def head_command(
    bin_dir: Path, port: int, num_cpus: int, temp_dir: Path, num_gpus: int | None = None
) -> list[str]:
    """``ray start --head`` on 127.0.0.1:``port`` as fedmerge starts a Ray head.

    Its interpreter is the :data:`PYTHON` script (written into ``bin_dir``);
    ``num_gpus`` ``None`` lets Ray count them. Run it with :data:`HEAD_ENV` in
    its environment and the repository root as its working directory (it
    imports :mod:`sims`).
    """
    python = write_python(bin_dir)
    gpus = [] if num_gpus is None else ["--num-gpus", str(num_gpus)]
    return [
        sys.executable, "-m", "sims.ray_head", str(python),
        "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", str(num_cpus), *gpus,
        "--include-dashboard", "false", "--disable-usage-stats",
        # the autoscaler's monitor: nothing here autoscales
        "--no-monitor",
        "--temp-dir", str(temp_dir),
    ]  # fmt: skip


def last_words(log: Path, lines: int = 12) -> str:
    """What a stopped ``ray start`` printed into ``log``: its last ``lines`` lines, indented.

    Ray's start-up notes (its INFO lines) are left out: what remains names
    what went wrong, e.g. ``Some Ray subprocesses exited unexpectedly:`` and
    ``raylet [exit code=-9]``, or the traceback of a head that did not start.
    """
    said = log.read_text(errors="replace").splitlines() if log.exists() else []
    said = [line for line in said if line.strip() and "\tINFO " not in line]
    return "".join(f"\n  {line}" for line in said[-lines:])


def _options(args: list[str]) -> tuple[dict[str, str], list[str]] | None:
    """``setup_worker.py``'s two options and the arguments it passes on; ``None`` if malformed."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in (_CONTEXT, _LANGUAGE):
            if not eq:
                if i + 1 == len(args):
                    return None
                i, value = i + 1, args[i + 1]
            found[name] = value
        else:
            rest.append(arg)
        i += 1
    return found, rest


def worker_argv(args: list[str]) -> tuple[list[str], dict[str, str]] | None:
    """What ``setup_worker.py ARGS`` would exec, and the variables it would set first.

    ``None`` where it would do more than that: another language, a
    container's entry point, a command prefix, a context this does not know.
    """
    parsed = _options(args)
    if parsed is None:
        return None
    found, rest = parsed
    if found.get(_LANGUAGE) != "PYTHON" or not rest:
        return None
    try:
        context = json.loads(found.get(_CONTEXT) or "{}")
    except ValueError:
        return None
    if not isinstance(context, dict) or not set(context) <= _CONTEXT_KEYS:
        return None
    if context.get("command_prefix") or context.get("override_worker_entrypoint"):
        return None
    variables = context.get("env_vars") or {}
    if not isinstance(variables, dict):
        return None
    return [context.get("py_executable") or sys.executable, *rest], variables


def set_variables(variables: dict[str, str]) -> None:
    """Set ``variables`` in this process's environment, in order, as Ray does.

    ``${X}`` in a value becomes X's value at that point, or nothing where X is unset.
    """
    for key, value in variables.items():
        os.environ[key] = re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(str(value)))


#: Ray's own Python programs of a head, under Ray's package: the log monitor (started by
#: ``ray start``), the dashboard agent and the runtime-environment agent (by the raylet).
RAY_PROGRAMS = (
    ("_private", "log_monitor.py"),
    ("dashboard", "agent.py"),
    ("_private", "runtime_env", "agent", "main.py"),
)


def forked_argv(args: list[str], socket_path: str) -> list[str] | None:
    """The warm process's command for ``python ARGS`` when ARGS run one of :data:`RAY_PROGRAMS`.

    ``ARGS`` is ``[-u] SCRIPT ARGS``, as Ray starts them; the command is
    :data:`sims.warm.RAY_WORKER`'s shim beside ``socket_path`` (the warm
    process runs ``SCRIPT ARGS`` in a fork of itself, unbuffered). ``None``
    for anything else, or where no warm process serves (``socket_path`` empty).
    """
    from sims.warm import RAY_WORKER, shim_dir

    rest = args[1:] if args[:1] == ["-u"] else args
    if not socket_path or not rest:
        return None
    parts = Path(rest[0]).parts
    if not any(parts[-len(p) - 1 :] == ("ray", *p) for p in RAY_PROGRAMS):
        return None
    return [str(shim_dir(Path(socket_path)) / RAY_WORKER), "-u", *rest]


def python_main() -> int:
    """The :data:`PYTHON` script: ``setup_worker.py``'s work where plain, else the real Python.

    Ray's own programs (:data:`RAY_PROGRAMS`) are forked from the runtime's warm
    process where one serves the head (:func:`forked_argv`).
    """
    args = sys.argv[1:]
    if args and Path(args[0]).name == SETUP_WORKER:
        plain = worker_argv(args[1:])
        if plain is not None:
            argv, variables = plain
            set_variables(variables)
            os.execv(argv[0], argv)
    from sims.warm import SOCKET_ENV  # here: not on every worker's way to its exec

    forked = forked_argv(args, os.environ.get(SOCKET_ENV, ""))
    if forked is not None:
        os.execv(forked[0], forked)
    os.execv(sys.executable, [sys.executable, *args])
    return 1  # not reached


#: The command groups that Ray's CLI adds when they import (``ray serve``, ``ray job``,
#: ``ray list`` and the rest of the state CLI); ``ray start`` uses none of them. Serve's
#: imports pandas and FastAPI: with them, Ray's CLI took about 3.3 s of CPU to import
#: here, without them 0.8 s.
CLI_EXTRAS = ("ray.serve.scripts", "ray.dashboard.modules.job.cli", "ray.util.state.state_cli")


def _no_ray_client() -> ImportError:
    return ImportError("a head that fedmerge starts runs no Ray Client server")


def _no_api_server(node: object, **options: object) -> None:
    """What ``ray start`` calls to start Ray's API server (``dashboard.py``): nothing."""


def main() -> None:
    """``python -m sims.ray_head PYTHON ARGS``: ``ray ARGS`` with ``PYTHON`` as its interpreter.

    Ray's CLI imports without :data:`CLI_EXTRAS` (it leaves out what fails to
    import), and a head that it starts has two Python processes fewer than
    ``ray start``'s own:

    - **no Ray Client server**, as where ``ray[client]`` is not installed:
      nothing of fedmerge's connects through Ray Client (``ray://``). The
      server was a cold Python process (about 0.9 s of CPU here) on a port that
      Ray otherwise shares among all heads (10001, with ``SO_REUSEPORT``) or,
      when told one, binds seconds after ``ray start`` began, long after any
      check that the port was free.
    - **no API server** (``dashboard.py``). With ``--include-dashboard false``
      it loads Ray's usage-stats module only (usage stats are off), and
      ``ray start`` waits until it has imported Ray and answers before it
      starts the raylet: about 1.8 s of CPU, on the way to the first actor.
      Nothing of a run uses it; Ray's job submission and state API (``ray
      job``, ``ray list``), which it serves, are not there.
    """
    sys.executable = sys.argv[1]
    sys.argv = ["ray", *sys.argv[2:]]
    for extra in CLI_EXTRAS:
        sys.modules[extra] = None  # type: ignore[assignment]  # an import of it fails
    from ray._private.node import Node
    from ray.scripts import scripts

    setattr(scripts, "get_ray_client_dependency_error", _no_ray_client)  # noqa: B010
    setattr(Node, "start_api_server", _no_api_server)  # noqa: B010
    scripts.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
