"""Whether the simulation engine's workers are up: the engine says so, the ServerApp waits.

In a simulation, Flower's engine and the ServerApp run in one process, and
the engine starts its Ray actors while the ServerApp starts. A first round
sent before the actors are up waits for them, and its ``round_time`` holds
their start (about 0.6 s on two cores). fedmerge's simulation engine
(:mod:`sims.engine_wake`) calls :func:`expect` before either starts and sets
the event once its actors are up; the ServerApp calls :func:`wait` before it
scores the initial model, so that the actors' start counts as start-up.
Where nothing called :func:`expect` (a deployment, or Flower's own
simulation engine), :func:`wait` returns at once.

The workers' own output (a ClientApp's ``print`` or log lines) reaches the
ServerApp's process through Ray's log monitor, up to a tenth of a second
after it was printed. The same engine hands over a way to wait for it
(:func:`offer_flush`), which the ServerApp calls before its last log line
(:func:`flush_output`), so that a run's log holds its last round's client
output too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

_ready: threading.Event | None = None
_flush: Callable[[float], bool] | None = None


def expect() -> threading.Event:
    """An event for :func:`wait` to wait for; the caller sets it when its workers are up."""
    global _ready
    _ready = threading.Event()
    return _ready


def wait(timeout: float) -> float | None:
    """Wait up to ``timeout`` seconds for this process's engine's workers.

    After ``timeout`` seconds it logs a warning and returns: the first round
    then meets the workers as they are (Flower's engine reports an actor
    that failed to start).

    Returns
    -------
    float or None
        Seconds waited, or ``None`` when no engine in this process said it
        would report (:func:`expect`).
    """
    ready = _ready
    if ready is None:
        return None
    started = time.perf_counter()
    if not ready.wait(timeout):
        logger.warning(
            "the simulation engine's actors were not up after %g s; the first round starts",
            timeout,
        )
    return time.perf_counter() - started


def offer_flush(flush: Callable[[float], bool]) -> None:
    """Let :func:`flush_output` call ``flush(timeout)``: whether the output arrived in time."""
    global _flush
    _flush = flush


def flush_output(timeout: float) -> bool | None:
    """Wait up to ``timeout`` seconds until the workers' output so far is in this process's log.

    Returns
    -------
    bool or None
        Whether it arrived in time, or ``None`` when no engine in this process
        offered a way to wait (:func:`offer_flush`).
    """
    flush = _flush
    if flush is None:
        return None
    try:
        arrived = flush(timeout)
    except Exception as exc:  # the engine is gone (a run that failed): its output with it
        logger.debug("the workers' output could not be waited for: %s", exc)
        return False
    if not arrived:
        logger.debug("the workers' output did not all arrive within %g s", timeout)
    return arrived
