"""``toy-loud-fedavg``: FedAvg whose clients print one line per round they train.

A scenario names this module in ``plugins``, so that every ClientApp imports
it too; each line names the client's partition, which is all that tells the
lines apart (Ray would fold them into one, see ``sims.runtime.RAY_LOG_DEFAULTS``).
"""

from __future__ import annotations

from typing import Any

from strategies.plugins import ClientContext, register
from strategies.plugins.base import ClientStart, StateDict
from strategies.plugins.fedavg import FedAvgPlugin

#: What each line starts with; the partition id follows.
LINE = "loud client of partition"


class LoudFedAvgPlugin(FedAvgPlugin):
    """FedAvg, with a line on the client's standard output each time it trains."""

    name = "toy-loud-fedavg"

    def client_start(
        self, options: Any, ctx: ClientContext, global_state: StateDict, kept: StateDict | None
    ) -> ClientStart:
        print(f"{LINE} {ctx.partition_id}", flush=True)
        return super().client_start(options, ctx, global_state, kept)


register(LoudFedAvgPlugin())
