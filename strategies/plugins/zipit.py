"""ZipIt! (Stoica et al., ICLR 2024) as a server-side strategy.

The server zips the clients' models feature by feature, matching features
within and across models on the correlations of their activations on the
server's proxy data (:func:`fedmerge.merge.zipit_merge`), then re-estimates
BatchNorm statistics on the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedmerge.merge import zipit_merge
from strategies.plugins.aligned import ServerModel
from strategies.plugins.base import ServerContext, ServerPlugin, StateDict
from strategies.plugins.fedavg import ServerOptions

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.replies import ClientUpdate


@dataclass(frozen=True)
class ZipItOptions(ServerOptions):
    r"""Options of ``strategy.name = "zipit"``; the defaults are the reference code's.

    Attributes
    ----------
    alpha : float (default: 0.3)
        :math:`\alpha`: a merged feature's similarities are multiplied by it
        (0: never merged again with its models' features); in [0, 1].
    beta : float (default: 0.125)
        :math:`\beta`: the share of its merges a model may spend within
        itself; in [0, 1].
    zip_samples : int (default: 256)
        Training inputs the server holds (drawn with the run seed) on which
        activations are correlated and BatchNorm statistics re-estimated; >= 1.
    reset_bn : bool (default: True)
        Re-estimate BatchNorm statistics of the zipped model on those inputs
        (the paper resets them).
    """

    alpha: float = 0.3
    beta: float = 0.125
    zip_samples: int = 256
    reset_bn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"{key}: got {value!r}; allowed: a number in [0, 1]")
        if not (isinstance(self.zip_samples, int) and self.zip_samples >= 1):
            raise ValueError(f"zip_samples: got {self.zip_samples!r}; allowed: an integer >= 1")


@dataclass
class ZipItMerge:
    """One round of ZipIt! over the clients' models."""

    server: ServerModel
    options: ZipItOptions

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The zipped model and the features merged within one client (``zipit_within``)."""
        if len(updates) == 1:
            return self.server.finish(dict(updates[0].state)), {"zipit_within": 0}
        result = zipit_merge(
            self.server.spec,
            [self.server.holding(u.state) for u in updates],
            self.server.proxy,
            alpha=self.options.alpha,
            beta=self.options.beta,
        )
        within = sum(result.within.values())
        return self.server.finish(result.states[0]), {"zipit_within": within}


class ZipItPlugin(ServerPlugin):
    """ZipIt! (Stoica et al., ICLR 2024, https://arxiv.org/abs/2305.03053).

    Notes
    -----
    The server needs one model of the global architecture, so every layer is
    zipped; the kernel's partial zipping (``stop``), which yields one head
    per model, is not offered here. Clients weigh equally (ZipIt! averages
    the members of a merged feature).
    """

    name = "zipit"
    aligns = True
    Options = ZipItOptions
    robust = False
    summary = "clients' features zipped within and across models on proxy activations (ZipIt!)"

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """A merging strategy whose aggregation is :func:`fedmerge.merge.zipit_merge`."""
        from strategies.merging import MergingStrategy

        server = ServerModel.for_context(ctx, options.zip_samples, options.reset_bn)
        return MergingStrategy(
            merge=ZipItMerge(server, options),
            description=f"ZipIt!: {options}, {len(server.proxy)} proxy batches",
            fraction_evaluate=options.fraction_evaluate,
            **ctx.flower_options,
        )
