"""The ``fedmerge`` command: simulate scenarios, compare strategies, deploy a federation.

This module imports neither PyTorch nor Flower: the commands that start
Flower's processes or read a run's status (``supernode``, ``superlink``,
``certs``, ``status``) start in a fraction of a second. The others are in
:mod:`sims.commands`, imported when one of them runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from sims.certs import write_certs
from sims.deploy import check_port_free, run_status, superlink_command, supernode_command
from sims.errors import FederationError, SimulationError
from sims.local_federation import down
from sims.node import runtime_port, supernode_with_worker, supervise
from sims.processes import FAST_TASK_POLL, flower_environment
from sims.runs import DEFAULT_TARGET
from sims.runtime import prestarted_runtime

#: What ``fedmerge --help`` says the command does.
DESCRIPTION = (
    "The ``fedmerge`` command: simulate scenarios, compare strategies, deploy a federation."
)

# Wide output when piped (rich would wrap tables at 80 columns).
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2
#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

#: The commands that run simulations: their runtime's warm process starts before their imports.
RUNS_SIMULATIONS = frozenset({"cmd_simulate", "cmd_compare"})


def cmd_certs(args: argparse.Namespace) -> int:
    """Write a private CA, a SuperLink certificate and SuperNode key pairs."""
    for path in write_certs(Path(args.out), args.host, args.nodes, force=args.force):
        console.print(str(path), highlight=False, markup=False, soft_wrap=True)
    return 0


def _exec_flower(cmd: list[str], defaults: dict[str, str] | None = None) -> int:
    """Replace this process by Flower's (same PID), telemetry and update checks off.

    ``defaults``: environment variables the user's environment may override
    (:func:`sims.processes.flower_environment`).
    """
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, flower_environment(defaults))


def cmd_superlink(args: argparse.Namespace) -> int:
    """Start flower-superlink with TLS and SuperNode authentication."""
    certs = Path(args.certs) if args.certs else None
    cmd = superlink_command(
        certs=certs, host=args.host, port=args.port, insecure=args.insecure,
        force=args.force_insecure, auth=not args.no_auth, extra=args.extra,
    )  # fmt: skip
    check_port_free(args.host, args.port, "--port")
    return _exec_flower(cmd)


def cmd_supernode(args: argparse.Namespace) -> int:
    """Start flower-supernode with TLS and its key, and its long-lived ClientApp process."""
    cmd = supernode_command(
        superlink=args.superlink, node_config=args.node_config,
        certs=Path(args.certs) if args.certs else None,
        key=Path(args.key) if args.key else None, insecure=args.insecure,
        force=args.force_insecure, port=args.port, extra=args.extra,
    )  # fmt: skip
    check_port_free(
        "127.0.0.1", runtime_port(args.port),
        "--port" if args.port is not None else "--port (default)",
        "a free port (each SuperNode on one host needs its own)",
    )  # fmt: skip
    if args.isolation == "subprocess":  # Flower's default: a new process per message
        # that its SuperExec starts: it looks for one every 0.1 s, not every second
        return _exec_flower(cmd, FAST_TASK_POLL)
    return supervise(supernode_with_worker(cmd, args.port), flower_environment())


def cmd_federation(args: argparse.Namespace) -> int:
    """Stop (down) a TLS federation on this machine; start one (up) through :mod:`sims.commands`.

    ``down`` imports neither PyTorch nor Flower: it starts in a blink.
    """
    if args.action == "up":
        return _command("cmd_federation_up")(args)
    pids = down(Path(args.dir))
    console.print(
        f"federation down: stopped {len(pids)} processes {pids}", highlight=False, markup=False
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print how a run ended; exit 0 completed, 3 degraded, 1 failed, 4 no summary."""
    line, code = run_status(args.run_dir)
    console.print(line, highlight=False, markup=False, soft_wrap=True)
    return code


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE; see PROG --help`` and exit with code 2."""
        _error_line(f"error: {self.prog}: {message}; see {self.prog} --help")
        sys.exit(EXIT_BAD_INPUT)


def _path(text: str) -> str:
    """A path argument as given; the empty one is refused (``Path('')`` is ``.``)."""
    if not text:
        raise argparse.ArgumentTypeError("got ''; allowed: a non-empty path")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedmerge``."""
    parser = _Parser(prog="fedmerge", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    def scenario_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "scenario",
            nargs="?",
            type=_path,
            help="scenario TOML file or shipped name (default: default)",
        )
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a scenario key, e.g. --set train.lr=0.05 (repeatable)",
        )

    sim = sub.add_parser("simulate", help="run a scenario through Flower's simulation runtime")
    scenario_args(sim)
    sim.add_argument(
        "--run-dir",
        type=_path,
        help="write the run here (default: RUNS_ROOT/NAME-STRATEGY-SEED-TIME)",
    )
    sim.add_argument(
        "--runs-root",
        default="runs",
        type=_path,
        help="parent of new run directories (default: runs)",
    )
    sim.add_argument(
        "--force",
        action="store_true",
        help="delete the run in --run-dir first (another scenario's, or a damaged checkpoint)",
    )
    sim.set_defaults(func="cmd_simulate")

    part = sub.add_parser("partition", help="show a scenario's partition (table and PNG)")
    scenario_args(part)
    part.add_argument("--out", type=_path, help="PNG path (default: partition-NAME.png)")
    part.set_defaults(func="cmd_partition")

    cmp = sub.add_parser("compare", help="run a sweep of paired scenarios, then tables and plots")
    cmp.add_argument("sweep", type=_path, help="sweep TOML file (see sims/sweeps/)")
    cmp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key in every run, e.g. --set rounds=50 (repeatable)",
    )
    cmp.add_argument("--force", action="store_true", help="delete and re-run finished runs")
    cmp.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="runs at a time, each slot on a runtime (SuperLink, Ray head) of its own (default: 1)",
    )
    cmp.add_argument(
        "--runs-root",
        default="runs",
        type=_path,
        help="runs go to RUNS_ROOT/SWEEP_NAME/DIGEST (default: runs)",
    )
    cmp.add_argument(
        "--out", type=_path, help="report folder (default: RUNS_ROOT/SWEEP_NAME/report)"
    )
    cmp.add_argument(
        "--tensorboard", action="store_true", help="write RUN_DIR/tensorboard/ for every run"
    )
    cmp.set_defaults(func="cmd_compare")

    strat = sub.add_parser("strategies", help="list the strategies, their options and defaults")
    strat.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="also import this plugin module or .py file (repeatable)",
    )
    strat.add_argument(
        "--json", action="store_true", help="print the list as JSON (name, side, summary, options)"
    )
    strat.set_defaults(func="cmd_strategies")

    rep = sub.add_parser("report", help="tables and plots from existing run directories")
    rep.add_argument(
        "run_dirs",
        nargs="+",
        type=_path,
        metavar="RUN_DIR",
        help="finished run directories, or a sweep folder (RUNS_ROOT/SWEEP_NAME) for all its runs",
    )
    rep.add_argument(
        "--out", type=_path, help="report folder (default: PARENT/report if they share one)"
    )
    rep.add_argument(
        "--target",
        type=float,
        help=f"accuracy for 'rounds to target' (default: the sweep's target_accuracy, "
        f"else {DEFAULT_TARGET})",
    )
    rep.add_argument(
        "--tensorboard", action="store_true", help="also write RUN_DIR/tensorboard/ for every run"
    )
    rep.set_defaults(func="cmd_report")

    rc = sub.add_parser(
        "run-config", help="a scenario as a flat TOML file for flwr run --run-config"
    )
    scenario_args(rc)
    rc.add_argument("-o", "--out", type=_path, help="write it here (default: standard output)")
    rc.set_defaults(func="cmd_run_config")

    crt = sub.add_parser("certs", help="a private CA, a SuperLink certificate, node key pairs")
    crt.add_argument("out", metavar="DIR", type=_path, help="where to write them")
    crt.add_argument(
        "--host", action="append", required=True, help="SuperLink name or IP (repeatable)"
    )
    crt.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs (default: 0)")
    crt.add_argument(
        "--force",
        action="store_true",
        help="replace a CA and keys already in DIR (nodes holding the old ones stop working)",
    )
    crt.set_defaults(func=cmd_certs)

    def flower_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--certs", metavar="DIR", type=_path, help="directory written by fedmerge certs"
        )
        p.add_argument("--insecure", action="store_true", help="no TLS (loopback only)")
        p.add_argument(
            "--force-insecure", action="store_true", help="allow --insecure off loopback"
        )
        p.add_argument("extra", nargs="*", help="more Flower arguments, after --")

    sl = sub.add_parser("superlink", help="flower-superlink with TLS and node authentication")
    sl.add_argument("--host", default="0.0.0.0", help="listen address (default: 0.0.0.0)")
    sl.add_argument("--port", type=int, default=9091, help="the one port (default: 9091)")
    sl.add_argument("--no-auth", action="store_true", help="no --enable-supernode-auth")
    flower_args(sl)
    sl.set_defaults(func=cmd_superlink)

    sn = sub.add_parser("supernode", help="flower-supernode with TLS and its key")
    sn.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    sn.add_argument(
        "--node-config", required=True, help="e.g. \"partition-id=0 data-dir='/srv/data'\""
    )
    sn.add_argument("--key", type=_path, help="this node's private key (node-I of fedmerge certs)")
    sn.add_argument("--port", type=int, help="local ClientApp API port (default: 9094)")
    sn.add_argument(
        "--isolation",
        choices=["process", "subprocess"],
        default="process",
        help="process: one long-lived ClientApp process serves every message (default); "
        "subprocess: Flower's default, a new ClientApp process per message",
    )
    flower_args(sn)
    sn.set_defaults(func=cmd_supernode)

    fed = sub.add_parser(
        "federation", help="up: a TLS federation on this machine (SuperLink, nodes); down: stop it"
    )
    fed.add_argument("action", choices=["up", "down"])
    fed.add_argument(
        "dir", metavar="DIR", type=_path, help="its certificates, data, logs and state file"
    )
    fed.add_argument("--nodes", type=int, default=2, help="SuperNodes (default: 2)")
    fed.add_argument(
        "--dataset", default="digits", help="data set split among the nodes (default: digits)"
    )
    fed.add_argument("--dataset-root", type=_path, help="its files, if it is not generated")
    fed.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    fed.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    fed.set_defaults(func=cmd_federation)

    st = sub.add_parser("status", help="how a run ended (exit 0 completed, 3 degraded, 1 failed)")
    st.add_argument("run_dir", metavar="RUN_DIR", type=_path)
    st.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedmerge`` console script (``argv``: ``None``, the command line).

    As the console script (no ``argv``), the process ends here once the
    command has returned and its output is flushed: every file and process
    the command made is closed or stopped by then, and Python's own teardown
    of PyTorch's modules would take half a second more.
    """
    code = _run(argv)
    if argv is None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM, and SIGHUP (the terminal closed), exit through Python's unwinding,
    # so that `simulate` stops the SuperLink (and with it Ray) that it started,
    # and a `federation up` that has not finished stops what it has started.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    args = build_parser().parse_args(argv)
    try:
        if args.func in RUNS_SIMULATIONS and "sims.commands" not in sys.modules:
            # The warm process imports Flower and PyTorch while this process
            # imports the command and checks its input.
            with prestarted_runtime():
                return int(_command(args.func)(args))
        return int(_command(args.func)(args))
    except KeyboardInterrupt:
        resume = (
            "; finished rounds are kept (run the same command again to resume from the last "
            "checkpoint)"
            if args.func in RUNS_SIMULATIONS
            else ""
        )
        _error_line(f"interrupted: the processes it started are stopped{resume}")
        return EXIT_INTERRUPTED
    except SimulationError as exc:
        err_console.print(
            f"fedmerge: simulation failed: {exc}", highlight=False, markup=False, soft_wrap=True
        )
        return 1
    except FederationError as exc:
        _error_line(f"federation failed: {exc}")
        return 1
    except Exception as exc:  # one line for bad input; a traceback for bugs
        message = input_error(exc)
        if message is None:
            traceback.print_exc()
            _error_line(
                f"internal error ({type(exc).__name__}), a bug in fedmerge: please report it "
                f"with the traceback above"
            )
            return 1
        _error_line(f"error: {message}")
        return EXIT_BAD_INPUT


def _command(func: str | Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """A command's function: this module's own, or one of :mod:`sims.commands` by name."""
    if isinstance(func, str):
        return getattr(importlib.import_module("sims.commands"), func)  # type: ignore[no-any-return]
    return func


def _error_line(text: str) -> None:
    err_console.print(f"fedmerge: {text}", highlight=False, markup=False, soft_wrap=True)


def input_error(exc: BaseException) -> str | None:
    """The one-line message for an exception caused by the input; ``None`` for a bug.

    Bad input is a :class:`ValueError` (``ConfigError`` and the kernel's
    errors among them: their message is the line), an :class:`OSError` (a
    path that cannot be read or written: the path and the reason), a
    :class:`RecursionError` (input nested too deeply) or running out of
    memory (:class:`MemoryError`, or PyTorch's allocator failing). Anything
    else, e.g. a ``TypeError`` or ``KeyError`` in fedmerge's own code, is a
    bug and keeps its traceback.
    """
    if isinstance(exc, ValueError):
        text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        return text
    if isinstance(exc, OSError):
        if exc.filename is None and "; allowed: " in str(exc):  # fedmerge's own line
            return str(exc).splitlines()[0]
        where = exc.filename if exc.filename is not None else "input"
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{where}: got {reason}; allowed: a path this user can read and write"
    if isinstance(exc, RecursionError):
        return "input: got data nested too deeply; allowed: a few levels of tables and lists"
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    ):
        return "memory: got a scenario that does not fit in memory; allowed: a smaller one"
    return None


if __name__ == "__main__":
    sys.exit(main())
