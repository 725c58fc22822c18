"""Adversarial clients of a simulated run: who they are and what they do to their replies.

``[simulation]`` declares them (``adversary_fraction`` or
``adversary_partitions``, ``adversary_behaviour``, ``adversary_factor``; see
:class:`~strategies.config.SimulationConfig`). The ServerApp and every
ClientApp derive the same set from the run configuration: a fraction is
drawn with a generator seeded by the run seed, so a scenario always has the
same adversaries. An adversary trains like any client and then tampers with
what it sends back (``label-flip`` tampers with its labels before training).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from strategies.config import RunConfig

StateDict = dict[str, torch.Tensor]

#: Values of ``simulation.adversary_behaviour``.
ADVERSARY_BEHAVIOURS: tuple[str, ...] = (
    "scale",
    "replace",
    "sign-flip",
    "label-flip",
    "inflate-count",
)
#: Random stream of the adversaries' draw (``SeedSequence([seed, stream])``; see federation.py).
ADVERSARY_STREAM = 4


@lru_cache(maxsize=8)
def adversarial_partitions(config: RunConfig) -> frozenset[int]:
    """Partition ids of the run's adversarial clients.

    ``adversary_partitions`` as given; otherwise ``round(adversary_fraction x
    num_clients)`` partitions (at least one for a fraction > 0) drawn without
    replacement by ``numpy.random.default_rng([seed, ADVERSARY_STREAM])``.
    """
    sim = config.simulation
    if sim.adversary_partitions:
        return frozenset(sim.adversary_partitions)
    if sim.adversary_fraction == 0:
        return frozenset()
    k = min(config.num_clients, max(1, round(sim.adversary_fraction * config.num_clients)))
    rng = np.random.default_rng([config.seed, ADVERSARY_STREAM])
    return frozenset(int(p) for p in rng.choice(config.num_clients, size=k, replace=False))


@dataclass(frozen=True)
class Adversary:
    r"""What an adversarial client does.

    With :math:`W_g` the model it received, :math:`W` the model it trained,
    :math:`n` its sample count and :math:`c` the ``factor``:

    - ``scale``: it sends :math:`c\,W` (every floating tensor multiplied).
    - ``replace``: model replacement, :math:`W_g + c\,(W - W_g)`.
    - ``sign-flip``: :math:`W_g - (W - W_g)` (the factor is not used).
    - ``label-flip``: it trains on labels :math:`(y + 1) \bmod C` and sends the
      result honestly (the factor is not used).
    - ``inflate-count``: it sends :math:`W` honestly and reports
      :math:`\mathrm{round}(c\,n)` samples.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are sent unchanged.

    Attributes
    ----------
    behaviour : str
        One of :data:`ADVERSARY_BEHAVIOURS`.
    factor : float
        :math:`c`.
    """

    behaviour: str
    factor: float

    def __post_init__(self) -> None:
        if self.behaviour not in ADVERSARY_BEHAVIOURS:
            raise ValueError(
                f"adversary_behaviour: got {self.behaviour!r}; "
                f"allowed: {', '.join(ADVERSARY_BEHAVIOURS)}"
            )

    def labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels it trains on (``label-flip``: every label moved to the next class)."""
        if self.behaviour != "label-flip":
            return y
        return (y + 1) % num_classes

    def reply(
        self, start: StateDict, trained: StateDict, num_examples: int
    ) -> tuple[StateDict, int]:
        """The model and the sample count it sends instead of ``trained`` and ``num_examples``."""
        c, b = self.factor, self.behaviour
        if b == "inflate-count":
            return trained, round(c * num_examples)
        if b == "label-flip":
            return trained, num_examples
        out: StateDict = {}
        for key, w in trained.items():
            if not w.is_floating_point():
                out[key] = w
            elif b == "scale":
                out[key] = w * c
            else:
                g = start[key].to(w.dtype)
                out[key] = g + c * (w - g) if b == "replace" else g - (w - g)
        return out, num_examples


def adversary_for(config: RunConfig, partition_id: int) -> Adversary | None:
    """The :class:`Adversary` of ``partition_id`` in this run, ``None`` for an honest client."""
    if partition_id not in adversarial_partitions(config):
        return None
    sim = config.simulation
    return Adversary(sim.adversary_behaviour, sim.adversary_factor)
