"""Checks that run before a simulation starts, and the lock on a run directory.

Everything here refuses an input with one :class:`ConfigError` line
(``key-or-path: got X; allowed: Y``) before any process starts or any file
is written:

- :func:`check_scenario`: what the machine or cluster must provide (a GPU for
  ``device = "cuda"``, the CPUs and GPUs the clients reserve, a reachable
  ``ray_address``) and options that could never take effect (topology options
  of a server-side strategy, ``inject_failures`` that never fire).
- :func:`check_run_dir`: the run directory can be written, holds no other
  scenario's run, and a checkpoint in it can be resumed.
- :func:`run_dir_lock`: one writer per run directory (``RUN_DIR/.lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from fedmerge.topology import TopologyConfig
from sims.runs import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, SWEEP_FILE, TIMING_FILE, read_json
from sims.runtime import head_cpus
from strategies.checkpoint import CHECKPOINT_JSON, CHECKPOINT_WEIGHTS, read_checkpoint, resume_rows
from strategies.config import ConfigError, RunConfig, run_config_from_dict

__all__ = [
    "LOCK_FILE",
    "RAY_CONNECT_TIMEOUT",
    "RUN_FILES",
    "check_run_dir",
    "check_run_path",
    "check_scenario",
    "clear_run_dir",
    "given_path",
    "run_dir_digest",
    "run_dir_lock",
]

#: The lock file of a run directory.
LOCK_FILE = ".lock"
#: What fedmerge writes into a run directory (``--force`` deletes these, nothing else).
RUN_FILES: tuple[str, ...] = (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    TIMING_FILE,
    CHECKPOINT_JSON,
    CHECKPOINT_WEIGHTS,
    "model.safetensors",
    "run_config.toml",
    "flower.log",
    "accuracy.png",
    "tensorboard",
)
#: Seconds to wait for a TCP connection to ``simulation.ray_address``.
RAY_CONNECT_TIMEOUT = 3.0
#: Longest file name most file systems accept.
_NAME_MAX = 255


# -- the scenario and this machine ---------------------------------------------
def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _ray_endpoint(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address; ``None`` for ``auto``/``local`` (Ray resolves those)."""
    if address in ("auto", "local"):
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, "6379"  # Ray's default GCS port
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"simulation.ray_address: got {address!r}; allowed: HOST:PORT or ray://HOST:PORT "
            f"of a running Ray cluster, 'auto', or '' (start one)"
        )
    return host, int(port)


def _answers_grpc(endpoint: tuple[str, int], timeout: float) -> str | None:
    """``None`` if a gRPC server answers at ``endpoint``, else the reason it did not.

    Ray's GCS and Ray Client servers speak gRPC. One call of a method that
    any answer settles (a GCS answers it; another gRPC server says the method
    is unknown) tells a gRPC server from a closed port, a silent host, or a
    proxy or web server that accepts any connection (it answers with an HTTP
    status, not a gRPC one).
    """
    import grpc

    host, port = endpoint
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary("/ray.rpc.NodeInfoGcsService/CheckAlive")(b"", timeout=timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), str(exc.details())
            if code == grpc.StatusCode.UNAVAILABLE:  # refused, no route, unknown host
                return f"unreachable: {details.rsplit(': ', 1)[-1].rstrip('])')[:80]}"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "no gRPC server answered"
            if "http2 header with status" in details:
                return "a server answered, but not a gRPC one"
    return None


def _check_ray_address(address: str) -> None:
    endpoint = _ray_endpoint(address)
    if endpoint is None or os.environ.get("RAY_USE_TLS", "0") not in ("", "0"):
        return
    reason = _answers_grpc(endpoint, RAY_CONNECT_TIMEOUT)
    if reason is not None:
        raise ConfigError(
            f"simulation.ray_address: got {address!r}, which did not answer as a Ray cluster "
            f"within {RAY_CONNECT_TIMEOUT:.0f} s ({reason}); allowed: the address of a running "
            f"Ray cluster, or '' to start one"
        )


def check_scenario(config: RunConfig) -> None:
    """Refuse what this machine (or the Ray cluster) cannot run, and options that never act.

    Raises
    ------
    ConfigError
        One line: the key, the value, and what is allowed here.
    """
    gpus = _cuda_devices()
    if config.device != "cpu":
        index = int(config.device.partition(":")[2] or 0)
        if index >= gpus:
            allowed = f"'cpu' or 'cuda:0' to 'cuda:{gpus - 1}'" if gpus else "'cpu'"
            raise ConfigError(
                f"device: got {config.device!r}; allowed: {allowed} "
                f"(torch sees {gpus} CUDA device{'s' * (gpus != 1)})"
            )
    sim = config.simulation
    if sim.ray_address:
        _check_ray_address(sim.ray_address)
    else:  # the run starts its own Ray on this machine
        cores = os.cpu_count() or 1
        if sim.ray_num_cpus > cores:
            raise ConfigError(
                f"simulation.ray_num_cpus: got {sim.ray_num_cpus}; allowed: 0 (all) to {cores}, "
                f"the cores of this machine"
            )
        ray_cpus = head_cpus(sim.ray_num_cpus)
        if sim.num_cpus_per_client > ray_cpus:
            raise ConfigError(
                f"simulation.num_cpus_per_client: got {sim.num_cpus_per_client}; allowed: 1 to "
                f"{ray_cpus}, the CPUs of the Ray cluster this run starts"
            )
        if sim.num_gpus_per_client > gpus:
            raise ConfigError(
                f"simulation.num_gpus_per_client: got {sim.num_gpus_per_client}; allowed: 0 to "
                f"{gpus}, the GPUs of this machine (or set simulation.ray_address)"
            )
    plugin = config.strategy.plugin
    if plugin.peer and config.train.independent_init:
        raise ConfigError(
            f"train.independent_init: got True; allowed: false with peer strategy "
            f"{config.strategy.name!r} (peers choose with strategy.peer_init)"
        )
    if not plugin.peer and config.topology != TopologyConfig():
        key = next(
            f.name
            for f in dataclasses.fields(TopologyConfig)
            if getattr(config.topology, f.name) != getattr(TopologyConfig(), f.name)
        )
        raise ConfigError(
            f"topology.{key}: got {getattr(config.topology, key)!r}; allowed: only with a "
            f"peer-side strategy (strategy is {config.strategy.name!r}, which aggregates on "
            f"the server)"
        )
    for pid, rnd in sorted(sim.failures()):
        if pid >= config.num_clients or not 1 <= rnd <= config.rounds:
            raise ConfigError(
                f"simulation.inject_failures: got {pid}@{rnd}; allowed: PARTITION@ROUND with "
                f"PARTITION 0 to {config.num_clients - 1} and ROUND 1 to {config.rounds}, "
                f"which can fire"
            )


# -- the run directory ------------------------------------------------------------
def given_path(value: object, key: str) -> Path:
    """``value``, a path given from Python, as a :class:`Path`.

    Raises
    ------
    TypeError
        If it is neither a ``str`` nor a path-like object.
    ConfigError
        If it is empty: ``Path('')`` is the working directory, where a run
        (and ``force=True``'s clearing) does not belong unasked.
    """
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{key}: got {type(value).__name__} {value!r}; allowed: a str or a path")
    if os.fspath(value) == "":
        raise ConfigError(f"{key}: got ''; allowed: a non-empty path ('.' for this directory)")
    return Path(value)


def check_run_path(run_dir: Path, key: str = "run_dir") -> None:
    """Refuse a path that cannot become a writable directory (``key`` names it in the error).

    Commands check their output folders with it too (``--out``), before any run.

    Raises
    ------
    ConfigError
        If a path component is too long, the path is or lies under a file,
        or the deepest existing directory on it is not writable.
    """
    for part in run_dir.parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise ConfigError(
                f"{key}: got a path component of {len(os.fsencode(part))} bytes "
                f"({part[:20]}...); allowed: at most {_NAME_MAX}"
            )
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(
            f"{key}: got {str(run_dir)!r}, but {str(existing)!r} is a file; "
            f"allowed: a directory or a path that can become one"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}: got {str(run_dir)!r}, but {str(existing)!r} is not writable; "
            f"allowed: a directory this user can write"
        )


def run_dir_digest(run_dir: Path) -> str | None:
    """Digest of the scenario whose files are in ``run_dir``; ``None`` if it holds none.

    From ``summary.json``, else ``checkpoint.json``, else ``config.json``
    (``"unreadable"`` if that cannot be read as a scenario).
    """
    for name in (SUMMARY_FILE, CHECKPOINT_JSON):
        digest = read_json(run_dir / name).get("digest")
        if isinstance(digest, str):
            return digest
    if (run_dir / CONFIG_FILE).exists():
        try:
            return run_config_from_dict(read_json(run_dir / CONFIG_FILE)).digest()
        except (ValueError, TypeError):
            return "unreadable"
    if (run_dir / METRICS_FILE).exists():
        return "unreadable"
    return None


def check_run_dir(run_dir: Path, config: RunConfig, *, force: bool = False) -> str:
    """Check ``run_dir`` before ``config`` runs in it; say whether the run is new or resumes.

    Parameters
    ----------
    run_dir : Path
        The run directory (need not exist).
    config : RunConfig
        The scenario that will run there.
    force : bool (default: False)
        The caller deletes the run's files first: only the path is checked.

    Returns
    -------
    str
        ``"resume"`` if a checkpoint of ``config`` is there, else ``"new"``.

    Raises
    ------
    ConfigError
        If the path cannot become a writable directory, if the directory
        holds a run of another scenario, or if its checkpoint or metrics
        cannot be resumed (:mod:`strategies.checkpoint`).

    Notes
    -----
    While the calling thread holds the directory's lock (:func:`run_dir_lock`),
    no one else writes there: the answer for a scenario is kept until the lock
    is let go, and a second check (``fedmerge simulate`` checks, then
    :func:`sims.launch.simulate` under the same lock) reads nothing again.
    """
    key, digest, me = Path(run_dir).resolve(), config.digest(), threading.get_ident()
    with _HELD_LOCK:
        held = _HELD.get(key, (None, 0))[0] == me
        known = _CHECKED.get(key) if held and not force else None
    if known is not None and known[0] == digest:
        return known[1]
    answer = _check_run_dir(Path(run_dir), digest, force)
    if held and not force:
        with _HELD_LOCK:
            _CHECKED[key] = (digest, answer)
    return answer


def _check_run_dir(run_dir: Path, digest: str, force: bool) -> str:
    """:func:`check_run_dir`, every time."""
    check_run_path(run_dir)
    if (run_dir / SWEEP_FILE).is_file():
        raise ConfigError(
            f"run_dir: got {str(run_dir)!r}, the folder of a sweep (it holds {SWEEP_FILE}); "
            f"allowed: a run directory of its own (the sweep's runs are its DIGEST folders)"
        )
    if force or not run_dir.is_dir():
        return "new"
    other = run_dir_digest(run_dir)
    if other is not None and other != digest:
        raise ConfigError(
            f"run_dir: {str(run_dir)!r} holds a run of another scenario (digest {other}, this "
            f"one {digest}); allowed: a new directory, or --force (force=True from Python) "
            f"to delete that run"
        )
    info = read_checkpoint(run_dir)
    if info is None:
        return "new"
    if info.digest != digest:
        raise ConfigError(
            f"{run_dir / CHECKPOINT_WEIGHTS}: got a checkpoint of another scenario (digest "
            f"{info.digest}, this one {digest}); allowed: this scenario's checkpoint (delete "
            f"{str(run_dir)!r} or rerun with --force (force=True from Python) to start over)"
        )
    resume_rows(run_dir, info.round)
    return "resume"


def clear_run_dir(run_dir: Path, *, everything: bool = False) -> None:
    """Delete what fedmerge wrote into ``run_dir`` (:data:`RUN_FILES`), or all but the lock.

    Parameters
    ----------
    run_dir : Path
        A run directory (missing: nothing to do).
    everything : bool (default: False)
        Delete every entry but :data:`LOCK_FILE` (a sweep's own run
        directories), not only :data:`RUN_FILES`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    names = [p.name for p in run_dir.iterdir()] if everything else list(RUN_FILES)
    for name in names:
        if name == LOCK_FILE:
            continue
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


#: The run directories whose lock a thread of this process holds: directory -> the
#: holding thread's id and how many :func:`run_dir_lock` blocks of it are open.
_HELD: dict[Path, tuple[int, int]] = {}
#: What :func:`check_run_dir` found in a run directory whose lock is held: (digest, answer).
_CHECKED: dict[Path, tuple[str, str]] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[Path]:
    """Hold ``RUN_DIR/.lock`` (``flock``, exclusive) while the block runs.

    Creates ``run_dir``. The lock goes with the process: a killed writer
    leaves no stale lock behind. A block inside another one of the same
    thread, for the same directory, holds what the outer one holds
    (``fedmerge simulate`` takes the lock, then :func:`sims.launch.simulate`,
    which takes it for a caller from Python); another thread of this process
    is refused as another process is.

    Raises
    ------
    ConfigError
        If another process, or another thread of this one, holds the lock.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key, me = run_dir.resolve(), threading.get_ident()
    with _HELD_LOCK:
        thread, depth = _HELD.get(key, (None, 0))
        if thread == me:
            _HELD[key] = (me, depth + 1)
    if thread == me:
        try:
            yield run_dir
        finally:
            with _HELD_LOCK:  # unless the outer block has already let go (out of order)
                if _HELD.get(key) == (me, depth + 1):
                    _HELD[key] = (me, depth)
        return
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            # empty: the holder has the lock but has not written its PID yet
            holder = f"process {pid}" if pid else "another process"
            if thread is not None:  # a thread of this process holds it
                holder = f"{holder} (another of its threads)"
            raise ConfigError(
                f"run_dir: {str(run_dir)!r} is in use by {holder} ({path} is locked); "
                f"allowed: one writer per run directory (wait for it, or use another directory)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            with _HELD_LOCK:
                _HELD[key] = (me, 1)
            yield run_dir
        finally:
            with _HELD_LOCK:
                _HELD.pop(key, None)
                _CHECKED.pop(key, None)
    finally:
        os.close(fd)  # releases the lock


def model_allocation_error(
    config: RunConfig, exc: BaseException, key: str = "model", got: str | None = None
) -> BaseException:
    """A :class:`ConfigError` for a model that could not be allocated; other errors unchanged.

    ``exc`` is a :class:`MemoryError`, or a :class:`RuntimeError` from
    PyTorch's allocator (its message says "allocate"); any other
    ``RuntimeError`` is returned as it is (a bug, not an input). The error
    names ``key`` and what it got (default: the ``model`` section).
    """
    text = str(exc)
    if isinstance(exc, RuntimeError) and "alloc" not in text.lower():
        return exc
    found = re.search(r"allocate (\d+) bytes", text)
    size = f"{int(found.group(1)) / 2**30:.1f} GiB" if found else "more memory than there is"
    if got is None:
        got = ", ".join(f"{k}={v!r}" for k, v in config.to_dict()["model"].items())
    return ConfigError(
        f"{key}: got {got}, which needs {size}; allowed: a model that fits in this "
        f"machine's memory (a smaller width or hidden size)"
    )
