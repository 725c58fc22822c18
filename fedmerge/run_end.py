"""The line with which a run's ServerApp ends its log.

The ServerApp logs it once ``summary.json`` is written, whether the run
completed or failed. ``flwr run --stream`` shows the ServerApp's log some
tenths of a second after each line is written (Flower uploads and streams
it in batches), so whoever follows a run in that stream knows from this line
that the stream has caught up: :meth:`sims.runtime.Runtime.run` stops ``flwr
run`` only then. Standard library only: :mod:`sims.runtime` imports it.
"""

from __future__ import annotations

#: The start of the ServerApp's last log line; the summary's path follows it.
END_OF_RUN = "end of run, summary written to"
