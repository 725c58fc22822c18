"""A simulated run's log in ``flwr run --stream`` a few hundredths of a second after it is written.

Flower sends a ServerApp's log to ``flwr run --stream`` in two batched steps:
the simulation process uploads its new lines to the SuperLink every 0.2 s
(``flwr.supercore.logger``), and the SuperLink looks for new lines for the
stream every 0.5 s (``flwr.superlink.servicer.control.control_handlers``). A
runtime stops ``flwr run`` once the ServerApp's last line has reached it
(:meth:`sims.runtime.Runtime.run`), which took 0.15-0.73 s after the summary
here. :func:`install`, called in the simulation processes and SuperLinks
that the warm process forks (:mod:`sims.warm`), sets both intervals to
:data:`INTERVAL`: 0.06-0.15 s then, for about 0.05 s more of the SuperLink's
CPU in a run of ten seconds. Other processes keep Flower's intervals.
"""

from __future__ import annotations

import importlib

#: Seconds between two uploads of the log, and between two looks for new lines.
INTERVAL = 0.05

#: Flower's module and the name of its interval, for the upload and for the stream.
_INTERVALS = (
    ("flwr.supercore.logger", "LOG_UPLOAD_INTERVAL"),
    ("flwr.superlink.servicer.control.control_handlers", "LOG_STREAM_INTERVAL"),
)


def install() -> None:
    """Set Flower's intervals of the log's upload and stream to :data:`INTERVAL` in this process.

    A Flower release without one of them keeps its own.
    """
    for module_name, name in _INTERVALS:
        module = importlib.import_module(module_name)
        if isinstance(getattr(module, name, None), int | float):
            setattr(module, name, INTERVAL)
