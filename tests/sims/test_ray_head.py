"""The interpreter script of a Ray head (``sims.ray_head``) starts what Ray's
``setup_worker.py`` would start, with the same arguments and environment.

Each case runs the same command line twice, once through Ray's own
``setup_worker.py`` and once through the script, and compares what the
started program saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray._private.workers import setup_worker

from sims.ray_head import PYTHON, forked_argv, worker_argv, write_python

SETUP = setup_worker.__file__
ROOT = Path(__file__).resolve().parent.parent.parent

#: The program that the cases start: it prints what it was given.
PROGRAM = """
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "executable": sys.executable,
                  "env": {k: v for k, v in os.environ.items() if k.startswith("FM_T_")}}))
"""


def _context(**fields: object) -> str:
    return "--serialized-runtime-env-context=" + json.dumps(
        {"command_prefix": [], "env_vars": {}, "py_executable": None,
         "override_worker_entrypoint": None, "java_jars": [], **fields}
    )  # fmt: skip


def _seen(python: str, program: Path, args: list[str]) -> dict[str, object]:
    env = {**os.environ, "FM_T_HOME": "/home/here"}
    env.pop("FM_T_UNSET", None)
    out = subprocess.run(
        [python, SETUP, str(program), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return seen


CASES = {
    # a run's Ray worker: variables (one refers to the environment, one to an unset
    # variable, one to a variable set just before) and the warm process's Python
    "worker": ["--node-ip-address=127.0.0.1", "plain", "--language=PYTHON",
               _context(env_vars={"FM_T_A": "a", "FM_T_B": "${FM_T_HOME}/b",
                                  "FM_T_C": "${FM_T_UNSET}c", "FM_T_D": "${FM_T_A}d"},
                        py_executable=sys.executable)],
    # Ray's Client server: no runtime environment at all
    "no-context": ["--port=1", "--language=PYTHON"],
    # the options as two words each, ahead of the program's own
    "two-words": ["--language", "PYTHON", "--serialized-runtime-env-context",
                  _context(env_vars={"FM_T_A": "x y"})[len("--serialized-runtime-env-context="):],
                  "--after"],
    # a command prefix: the script leaves the work to Ray's setup_worker.py
    "prefix": ["--language=PYTHON", _context(command_prefix=["FM_T_P=1"])],
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_the_script_starts_what_rays_setup_worker_starts(case: str, tmp_path: Path) -> None:
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    script = write_python(tmp_path / "bin")
    assert script.name == PYTHON
    args = CASES[case]
    ray_saw = _seen(sys.executable, program, args)
    script_saw = _seen(str(script), program, args)
    assert script_saw == ray_saw
    assert ray_saw["executable"] == sys.executable  # the case reached the program
    if case == "worker":
        expected = {"FM_T_A": "a", "FM_T_B": "/home/here/b", "FM_T_C": "c", "FM_T_D": "ad"}
        assert ray_saw["env"] == {"FM_T_HOME": "/home/here", **expected}


@pytest.mark.parametrize("case", CASES)
def test_options_are_taken_out_as_rays_parser_takes_them(case: str) -> None:
    args = CASES[case]
    parsed, rest = setup_worker.parser.parse_known_args(args)
    plain = worker_argv(["program.py", *args])
    if case == "prefix":
        assert plain is None  # left to Ray
        return
    assert plain is not None
    argv, variables = plain
    context = json.loads(parsed.serialized_runtime_env_context or "{}")
    assert argv == [context.get("py_executable") or sys.executable, "program.py", *rest]
    assert variables == context.get("env_vars", {})


@pytest.mark.parametrize(
    "args",
    [
        ["--language=JAVA", "--serialized-runtime-env-context={}"],  # another language
        ["--language=PYTHON", '--serialized-runtime-env-context={"container": {}}'],
        ["--language=PYTHON", "--serialized-runtime-env-context=not json"],
        ["--language=PYTHON", _context(override_worker_entrypoint="/other/worker.py")],
        ["--language"],  # an option without its value
    ],
)
def test_what_the_script_does_not_know_goes_to_ray(args: list[str]) -> None:
    assert worker_argv(["program.py", *args]) is None


RAY_DIR = Path(setup_worker.__file__).resolve().parents[2]  # where Ray's services look


@pytest.mark.parametrize(
    "script",
    [
        # the scripts as ray._private.services starts them (log monitor, the raylet's agents)
        RAY_DIR / "_private" / "log_monitor.py",
        RAY_DIR / "dashboard" / "agent.py",
        RAY_DIR / "_private" / "runtime_env" / "agent" / "main.py",
    ],
)
def test_rays_own_programs_are_forked_where_a_warm_process_serves(script: Path) -> None:
    for unbuffered in ([], ["-u"]):
        argv = forked_argv([*unbuffered, str(script), "--session-dir=/s"], "/tmp/fm-x/warm.sock")
        assert argv == ["/tmp/fm-x/bin/fedmerge-ray-worker", "-u", str(script), "--session-dir=/s"]
    assert forked_argv(["-u", str(script)], "") is None  # no warm process here


@pytest.mark.parametrize(
    "args",
    [
        [str(RAY_DIR / "_private" / "workers" / "default_worker.py")],  # through setup_worker
        [str(RAY_DIR / "dashboard" / "dashboard.py")],
        ["/elsewhere/agent.py"],  # an agent.py that is not Ray's
        ["-c", "print(1)"],
        [],
    ],
)
def test_anything_else_is_not_forked(args: list[str]) -> None:
    assert forked_argv(args, "/tmp/fm-x/warm.sock") is None


def test_any_other_command_runs_in_the_real_interpreter(tmp_path: Path) -> None:
    script = write_python(tmp_path / "bin")
    out = subprocess.run(
        [str(script), "-c", "import sys; print(sys.executable, sys.argv[1:])", "x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [sys.executable, "['x']"]


def test_rays_cli_starts_without_its_serve_job_and_state_commands(tmp_path: Path) -> None:
    """``python -m sims.ray_head`` has ``ray start`` but imports neither Serve nor pandas."""
    script = write_python(tmp_path / "bin")
    probe = (
        "import json, sys\n"
        "from sims import ray_head\n"
        f"sys.argv = ['ray_head', {str(script)!r}, '--help']\n"
        "try:\n"
        "    ray_head.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(m for m in ('pandas', 'fastapi', 'ray.serve', 'ray') "
        "if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    help_text, imported = out.stdout.rstrip("\n").rsplit("\n", 1)
    listed = help_text.split("Commands:")[1].splitlines()
    commands = {line.split()[0] for line in listed if line.strip()}
    assert {"start", "stop", "status"} <= commands, commands
    assert not {"serve", "job", "list"} & commands, commands
    assert json.loads(imported) == ["ray"]  # Ray, but none of the CLI's extras' imports
