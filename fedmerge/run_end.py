"""How a run ends: its summary's statuses, and the line with which its ServerApp ends its log.

The ServerApp logs that line once ``summary.json`` is written, whether the run
completed or failed. ``flwr run --stream`` shows the ServerApp's log a little
after each line is written (Flower uploads and streams it in batches, see
:mod:`sims.log_stream`), so whoever follows a run in that stream knows from
this line that the stream has caught up: :meth:`sims.runtime.Runtime.run` stops ``flwr
run`` only then. Standard library only: :mod:`sims.runtime` and :mod:`sims.runs`
import it.
"""

from __future__ import annotations

#: The start of the ServerApp's last log line; the summary's path follows it.
END_OF_RUN = "end of run, summary written to"

#: ``summary.json`` statuses of a run that ran to its end ("degraded": it lost or
#: refused clients; the other status, "failed", is a run that stopped with an error).
FINISHED_STATUSES: tuple[str, ...] = ("completed", "degraded")
