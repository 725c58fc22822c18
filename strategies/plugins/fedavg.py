"""FedAvg and FedProx: Flower's own aggregation with seeded sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedmerge.merge import RobustConfig
from strategies.plugins.base import ServerContext, ServerPlugin

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


@dataclass(frozen=True)
class ServerOptions(RobustConfig):
    """Options every server-side strategy has.

    The robust section (:class:`fedmerge.merge.RobustConfig`: ``robust``,
    ``clip_norm``, ``clip_to_median``, ``trim_fraction``, ``krum_f``,
    ``krum_m``; documented and checked there) applies where the strategy
    averages client models (see :mod:`strategies.robust`), plus:

    Attributes
    ----------
    fraction_evaluate : float (default: 0.0)
        Share of the clients that evaluate the new global model on their local
        data after every round (client-side evaluation; 0 turns it off); in
        [0, 1].
    screen_norm_ratio : float (default: 0.0)
        Refuse a training reply whose update norm ``||W_k - W_g||`` exceeds
        this many times the median update norm of the round (0: off); 0 or
        >= 1.
    """

    fraction_evaluate: float = 0.0
    screen_norm_ratio: float = 0.0

    def __post_init__(self) -> None:
        RobustConfig.__post_init__(self)
        if not 0 <= self.fraction_evaluate <= 1:
            raise ValueError(
                f"fraction_evaluate: got {self.fraction_evaluate!r}; allowed: a number in [0, 1]"
            )
        ratio = self.screen_norm_ratio
        if not (math.isfinite(ratio) and (ratio == 0 or ratio >= 1)):
            raise ValueError(f"screen_norm_ratio: got {ratio!r}; allowed: 0 (off) or a number >= 1")

    @property
    def screening(self) -> dict[str, Any]:
        """Keyword arguments of fedmerge's strategies for the shared screening options."""
        return {"screen_norm_ratio": self.screen_norm_ratio}


@dataclass(frozen=True)
class FedProxOptions(ServerOptions):
    r"""Options of ``strategy.name = "fedprox"``.

    Attributes
    ----------
    prox_mu : float (default: 0.01)
        :math:`\mu` of the proximal term :math:`\frac{\mu}{2}\lVert w - w_g\rVert^2`
        that clients add to their loss (Flower sends it as ``proximal-mu``); >= 0.
    """

    prox_mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.prox_mu) and self.prox_mu >= 0):
            raise ValueError(f"prox_mu: got {self.prox_mu!r}; allowed: a number >= 0")


class FedAvgPlugin(ServerPlugin):
    """FedAvg (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629)."""

    name = "fedavg"
    Options = ServerOptions
    summary = "sample-count-weighted mean of the client models (Flower's FedAvg)"

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """Flower's FedAvg with seeded sampling."""
        from strategies.sampling import SeededFedAvg

        return SeededFedAvg(
            robust=options,
            fraction_evaluate=options.fraction_evaluate,
            **options.screening,
            **ctx.flower_options,
        )


class FedProxPlugin(ServerPlugin):
    """FedProx (Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127)."""

    name = "fedprox"
    Options = FedProxOptions
    summary = "FedAvg aggregation; clients add a proximal term to their loss (Flower's FedProx)"

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """Flower's FedProx with seeded sampling."""
        from strategies.sampling import SeededFedProx

        return SeededFedProx(
            proximal_mu=options.prox_mu,
            robust=options,
            **options.screening,
            fraction_evaluate=options.fraction_evaluate,
            **ctx.flower_options,
        )
