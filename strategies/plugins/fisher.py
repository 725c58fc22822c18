"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022) as a server-side strategy.

Each client computes the diagonal Fisher of its trained model on its local
data (:func:`fedmerge.merge.diagonal_fisher`) and sends it with its update
(:meth:`~strategies.plugins.base.ServerPlugin.reply_arrays`); the server
averages the models parameter by parameter, weighted by the Fishers
(:func:`fedmerge.merge.fisher_merge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedmerge.merge import FISHER_FLOORS, FISHER_LABELS, diagonal_fisher, fisher_merge
from strategies import protocol
from strategies.plugins.base import ClientContext, ServerContext, ServerPlugin, StateDict
from strategies.plugins.fedavg import ServerOptions
from strategies.plugins.task_arithmetic import client_weights

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from strategies.replies import ClientUpdate

#: Inputs per batch of the clients' Fisher computation.
FISHER_BATCH = 64


@dataclass(frozen=True)
class FisherOptions(ServerOptions):
    r"""Options of ``strategy.name = "fisher"``.

    Attributes
    ----------
    fisher_samples : int (default: 256)
        Local training inputs (drawn with the client's round seed) on which
        each client computes the diagonal Fisher of its trained model; >= 1.
    fisher_labels : {"sampled", "exact", "empirical"} (default: "sampled")
        Labels of the squared gradients: drawn from the model's predictive
        distribution (the paper), the exact expectation over classes (the
        reference code), or the data's labels (the empirical Fisher).
    fisher_floor : float (default: 1e-6)
        :math:`\epsilon`, the floor of the Fisher values (the reference code's
        ``fisher_floor``); > 0.
    floor_models : {"all", "first"} (default: "all")
        Floor every client's Fisher, or only the first client's (the
        reference code's ``favor_target_model``).
    normalise_fishers : bool (default: True)
        Divide each client's Fisher by its L2 norm first (the reference code's
        default).
    sample_weighted : bool (default: False)
        Client weights :math:`w_k` proportional to sample counts, else equal
        (the paper).
    """

    fisher_samples: int = 256
    fisher_labels: str = "sampled"
    fisher_floor: float = 1e-6
    floor_models: str = "all"
    normalise_fishers: bool = True
    sample_weighted: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.fisher_samples, int) and self.fisher_samples >= 1):
            raise ValueError(
                f"fisher_samples: got {self.fisher_samples!r}; allowed: an integer >= 1"
            )
        if self.fisher_labels not in FISHER_LABELS:
            raise ValueError(
                f"fisher_labels: got {self.fisher_labels!r}; allowed: {', '.join(FISHER_LABELS)}"
            )
        if not (isinstance(self.fisher_floor, int | float) and math.isfinite(self.fisher_floor)
                and self.fisher_floor > 0):  # fmt: skip
            raise ValueError(f"fisher_floor: got {self.fisher_floor!r}; allowed: a number > 0")
        if self.floor_models not in FISHER_FLOORS:
            raise ValueError(
                f"floor_models: got {self.floor_models!r}; allowed: {', '.join(FISHER_FLOORS)}"
            )


@dataclass(frozen=True)
class FisherMerge:
    """One round of Fisher-weighted averaging of the clients' models."""

    options: FisherOptions

    def __call__(
        self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[str, Any]]:
        """The new global state and the clients' mean Fisher value (``fisher_mean``)."""
        o = self.options
        fishers = []
        for u in updates:
            record = u.message.content.array_records.get(protocol.FISHER)
            if record is None:
                raise ValueError(
                    f"{protocol.FISHER}: the reply of partition {u.partition} has no Fisher; "
                    "allowed: replies of clients running strategy 'fisher'"
                )
            fishers.append(record.to_torch_state_dict())
        new = fisher_merge(
            [u.state for u in updates], fishers, client_weights(updates, o.sample_weighted),
            eps=o.fisher_floor, floor=o.floor_models, normalise_fishers=o.normalise_fishers,
        )  # fmt: skip
        values = torch.cat([f.reshape(-1).double() for fisher in fishers for f in fisher.values()])
        return new, {"fisher_mean": float(values.mean())}


class FisherPlugin(ServerPlugin):
    """Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022, https://arxiv.org/abs/2111.09832)."""

    name = "fisher"
    Options = FisherOptions
    robust = False
    summary = "clients send their diagonal Fisher; per-parameter Fisher-weighted mean"

    def strategy(self, options: Any, ctx: ServerContext) -> Strategy:
        """A merging strategy whose aggregation is :func:`fedmerge.merge.fisher_merge`."""
        from strategies.merging import MergingStrategy

        return MergingStrategy(
            merge=FisherMerge(options),
            description=f"Fisher-weighted averaging: {options}",
            fraction_evaluate=options.fraction_evaluate,
            **ctx.flower_options,
        )

    def reply_arrays(
        self,
        options: Any,
        ctx: ClientContext,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        seed: int,
    ) -> dict[str, StateDict]:
        """The trained model's diagonal Fisher on ``fisher_samples`` local inputs."""
        gen = torch.Generator().manual_seed(seed)
        sample = torch.randperm(len(y), generator=gen)[: options.fisher_samples]
        device = next(model.parameters()).device
        xs, ys = x[sample].to(device), y[sample].to(device)
        batches = list(
            zip(torch.split(xs, FISHER_BATCH), torch.split(ys, FISHER_BATCH), strict=True)
        )
        fisher = diagonal_fisher(model, batches, labels=options.fisher_labels, generator=gen)
        return {protocol.FISHER: {k: v.cpu() for k, v in fisher.items()}}
