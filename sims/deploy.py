"""Deployment helpers of the CLI: Flower's processes with TLS and authentication, run status.

:func:`superlink_command` and :func:`supernode_command` build the command
lines of ``fedmerge superlink`` / ``fedmerge supernode``: Flower's own
``flower-superlink`` / ``flower-supernode`` with TLS (certificates from
``fedmerge certs``) and SuperNode authentication on, telemetry and update
checks off (:data:`sims.processes.FLOWER_ENV`). ``--insecure`` is refused
unless every address involved is loopback, or ``force`` says so.

``flwr run --stream`` exits 0 whatever the ServerApp did; ``summary.json``
says what happened (see :mod:`strategies.deployment`). :func:`run_status`
turns it into one line and an exit code, for ``fedmerge status RUN_DIR``.
"""

from __future__ import annotations

import ipaddress
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sims.runs import SUMMARY_FILE, read_json
from sims.warm import shim

#: Exit codes of ``fedmerge status`` by ``summary.json`` status.
STATUS_EXIT: dict[str, int] = {"completed": 0, "degraded": 3, "failed": 1}
#: Exit code when there is no readable summary (a run still going, or killed).
NO_SUMMARY_EXIT = 4


def status_line(summary: dict[str, Any]) -> str:
    """One line that says how a run ended, from its ``summary.json``."""
    status = summary.get("status")
    if status == "failed":
        return f"failed ({summary.get('stage')}): {summary.get('error')}"
    if status == "degraded":
        lost = summary.get("lost")
        lost = lost if isinstance(lost, list) else []
        head = lost[0] if lost and isinstance(lost[0], dict) else {}
        first = f"; first: round {head.get('round')}, {head.get('reason')}" if lost else ""
        return (
            f"degraded: lost partitions {summary.get('lost_partitions', [])} "
            f"({len(lost)} skipped replies, {summary.get('failures', 0)} failures, "
            f"{summary.get('missing', 0)} missing, {summary.get('refused', 0)} refused){first}"
        )
    return (
        f"{status}: final accuracy {summary.get('final_accuracy')}, {summary.get('rounds')} rounds"
    )


def run_status(run_dir: str | Path) -> tuple[str, int]:
    """The status line of ``run_dir`` and the exit code of ``fedmerge status``.

    Raises
    ------
    ValueError
        One line, if ``run_dir`` is not a directory, or its ``summary.json``
        is not a run's summary (written by hand, or damaged).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(
            f"RUN_DIR: got {str(run_dir)!r}, which is not a directory; allowed: a run "
            "directory (of fedmerge simulate or compare, or a deployed run's runs/NAME-TIME)"
        )
    if not (path / SUMMARY_FILE).exists():
        return f"{run_dir}: no summary.json (the run is going on, or was killed)", NO_SUMMARY_EXIT
    if not (path / SUMMARY_FILE).is_file():
        raise ValueError(
            f"RUN_DIR: {str(path / SUMMARY_FILE)!r} is not a file; allowed: a summary.json "
            f"that fedmerge wrote"
        )
    summary = read_json(path / SUMMARY_FILE)
    status = summary.get("status")
    if not isinstance(status, str) or status not in STATUS_EXIT:
        allowed = ", ".join(repr(s) for s in STATUS_EXIT)
        raise ValueError(
            f"RUN_DIR: {str(path / SUMMARY_FILE)!r} has no status "
            f"({'got ' + repr(status) if status is not None else 'not a JSON object with one'}); "
            f"allowed: a summary.json that fedmerge wrote, with status {allowed}"
        )
    return status_line(summary), STATUS_EXIT[str(status)]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, no port) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _flower(name: str) -> str:
    """Flower's console script ``name``, from this Python's environment when it has one.

    Where a warm process serves the environment (:func:`sims.warm.shim`), its
    shim instead: the program is then forked from that process.
    """
    warm = shim(name)
    if warm is not None:
        return str(warm)
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def check_port_free(
    host: str, port: int, what: str, allowed: str = "a free port", host_key: str = "--host"
) -> None:
    """Refuse, in one line, a port that another process already listens on at ``host``.

    Flower's SuperLink and SuperNode find out only once they try to listen
    (a traceback, or a usage text); and a SuperNode's ClientApp process given
    the port of another node's Runtime API would serve that node's tasks. A
    ``host`` that is no address of this machine (or no name at all) is
    refused under ``host_key``.
    """
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ValueError(
                    f"{what}: got {port}, which another process holds on {host} ({reason}); "
                    f"allowed: {allowed}"
                ) from None
            raise ValueError(
                f"{host_key}: got {host!r} ({reason}); allowed: an address of this machine "
                f"to listen on, e.g. 0.0.0.0 (all), 127.0.0.1 or ::"
            ) from None


def _need(paths: Sequence[Path], what: str) -> None:
    for path in paths:
        if not path.is_file():
            raise ValueError(
                f"{what}: got {str(path)!r}, which is not a file; allowed: the files "
                f"fedmerge certs writes"
            )


def _insecure_ok(hosts: Sequence[str], force: bool, flag: str) -> None:
    bad = [h for h in hosts if not is_loopback(h)]
    if bad and not force:
        raise ValueError(
            f"--insecure: got {flag} {bad[0]}; allowed: loopback addresses only "
            f"(127.0.0.1, ::1, localhost), or add --force-insecure"
        )


def superlink_command(
    *,
    certs: Path | None,
    host: str,
    port: int,
    insecure: bool = False,
    force: bool = False,
    auth: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``flower-superlink`` command line.

    Parameters
    ----------
    certs : Path, optional
        Directory of ``ca.crt``, ``server.pem``, ``server.key`` (required
        unless ``insecure``).
    host, port : str, int
        Where the SuperLink listens: nodes, ``flwr run`` and ``flwr
        supernode register`` all use this one port.
    insecure : bool (default: False)
        Plain HTTP; refused for a non-loopback ``host`` unless ``force``.
    auth : bool (default: True)
        ``--enable-supernode-auth``: only registered SuperNode keys may join.
    extra : sequence of str
        More arguments for ``flower-superlink``.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"--port: got {port}; allowed: 1 to 65535")
    cmd = [_flower("flower-superlink"), "--host", host, "--port", str(port)]
    if insecure:
        _insecure_ok([host], force, "--host")
        if auth:  # Flower refuses it (exit code 104) once it starts
            raise ValueError(
                "--insecure: got it without --no-auth; allowed: --insecure --no-auth "
                "(authenticating SuperNodes needs TLS), or --certs"
            )
        cmd.append("--insecure")
    else:
        if certs is None:
            raise ValueError("--certs: got none; allowed: a directory written by fedmerge certs")
        files = [certs / "ca.crt", certs / "server.pem", certs / "server.key"]
        _need(files, "--certs")
        cmd += ["--ssl-ca-certfile", str(files[0])]
        cmd += ["--ssl-certfile", str(files[1]), "--ssl-keyfile", str(files[2])]
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd + list(extra)


#: A ``key=value`` pair of Flower's ``--node-config`` (as Flower's own parser finds them).
_NODE_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")

_NODE_ALLOWED = (
    "space-separated key=value pairs with partition-id, e.g. "
    "\"partition-id=0 data-dir='/srv/data'\", or a .toml file of them"
)


def check_node_config(node_config: str) -> dict[str, Any]:
    """Parse ``--node-config`` as Flower will; refuse what Flower would read as something else.

    Flower's parser keeps only the ``key=value`` pairs it finds and drops the
    rest without a word (``garbage`` is an empty config): the node would then
    join the federation without the ``partition-id`` that its ClientApp
    needs, and fail at its first message.
    """
    if node_config.endswith(".toml"):
        try:
            config = tomllib.loads(Path(node_config).expanduser().read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(
                f"--node-config: got {node_config!r} ({exc}); allowed: {_NODE_ALLOWED}"
            ) from None
    else:
        rest = _NODE_PAIR.sub("", node_config).strip()
        if rest:
            raise ValueError(
                f"--node-config: got {node_config!r}, in which {rest!r} is no key=value pair; "
                f"allowed: {_NODE_ALLOWED}"
            )
        pairs = _NODE_PAIR.findall(node_config)
        try:
            config = tomllib.loads("\n".join(f"{k} = {v}" for k, v in pairs))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(
                f"--node-config: got {node_config!r} ({exc}); allowed: {_NODE_ALLOWED}"
            ) from None
    pid = config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ValueError(
            f"--node-config: got partition-id {pid!r} in {node_config!r}; allowed: {_NODE_ALLOWED} "
            f"(partition-id an integer >= 0)"
        )
    return config


def supernode_command(
    *,
    superlink: str,
    node_config: str,
    certs: Path | None,
    key: Path | None,
    insecure: bool = False,
    force: bool = False,
    port: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``flower-supernode`` command line.

    Parameters
    ----------
    superlink : str
        ``HOST:PORT`` of the SuperLink.
    node_config : str
        Flower's ``--node-config``, e.g. ``"partition-id=0 data-dir='/srv/data'"``.
    certs : Path, optional
        Directory holding ``ca.crt`` (required unless ``insecure``).
    key : Path, optional
        This node's private key (``fedmerge certs``' ``node-I``; its
        ``.pub`` is registered on the SuperLink); ``None``: no authentication.
    insecure : bool (default: False)
        Plain HTTP; refused for a non-loopback SuperLink unless ``force``.
    port : int, optional
        The node's local ClientApp API port (default 9094; give each node
        on one host its own). It listens on 127.0.0.1 only.
    """
    host, sep, port_text = superlink.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"--superlink: got {superlink!r}; allowed: HOST:PORT, PORT 1 to 65535")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"--port: got {port}; allowed: 1 to 65535")
    check_node_config(node_config)
    cmd = [_flower("flower-supernode"), "--superlink", superlink, "--node-config", node_config]
    if insecure:
        _insecure_ok([host], force, "--superlink")
        cmd.append("--insecure")
    else:
        if certs is None:
            raise ValueError("--certs: got none; allowed: a directory written by fedmerge certs")
        _need([certs / "ca.crt"], "--certs")
        cmd += ["--root-certificates", str(certs / "ca.crt")]
    if key is not None:  # Flower 1.42 derives the public key (its flag is deprecated)
        _need([key], "--key")
        cmd += ["--auth-supernode-private-key", str(key)]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd + list(extra)
