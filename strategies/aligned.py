"""Permutation-aligned FedAvg and OT-fusion aggregation as Flower strategies."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmerge.align import (
    activation_matching,
    apply_permutation,
    apply_transport,
    collect_activation_stats,
    count_moved_units,
    ot_align,
    permutation_spec_for,
    weight_matching,
)
from fedmerge.merge import has_batchnorm, reset_bn_stats, weighted_average
from strategies.merging import MergingStrategy
from strategies.replies import ClientUpdate

logger = logging.getLogger(__name__)


class _ProxyMixin:
    """Holds the architecture, its spec and the server's optional proxy batches."""

    def _setup(self, model: nn.Module, proxy: list[torch.Tensor], reset_bn: bool) -> None:
        self.model = model
        self.spec = permutation_spec_for(model)
        self.proxy = proxy
        self.reset_bn = reset_bn

    def _scratch(self, state: dict[str, torch.Tensor]) -> nn.Module:
        m = copy.deepcopy(self.model)
        m.load_state_dict(state)
        return m

    def _finish(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Re-estimate BatchNorm statistics on the proxy data, when there is some."""
        if not (self.reset_bn and self.proxy and has_batchnorm(self.model)):
            return state
        model = self._scratch(state)
        reset_bn_stats(model, self.proxy)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


class AlignedFedAvg(_ProxyMixin, MergingStrategy):
    """FedAvg after aligning every client to the global model's hidden units.

    Every round each client model is permuted to match the current global
    model (Git Re-Basin weight matching, or activation matching on the
    server's proxy data), then the aligned models are averaged with
    sample-count weights; BatchNorm statistics are re-estimated on the proxy
    data when there is some. Git Re-Basin: https://arxiv.org/abs/2209.04836

    Parameters
    ----------
    model : nn.Module
        The architecture (its spec is derived once).
    method : {"weight", "activation"} (default: "weight")
        Alignment: weight matching, or activation matching on ``proxy``.
    proxy : list of Tensor
        Input batches held by the server (may be empty for weight matching).
    reset_bn : bool (default: True)
        Re-estimate BatchNorm statistics on ``proxy`` after averaging.
    seed : int (default: 0)
        Seeds the coordinate-descent order of weight matching.
    **kwargs
        Flower's FedAvg options.

    Notes
    -----
    Clients start every round from the global model, so after a few local
    steps most units stay where they were: the per-round report
    ``units_permuted`` (per permutation group, summed over clients) shows how
    much alignment actually changed.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        method: str = "weight",
        proxy: list[torch.Tensor] | None = None,
        reset_bn: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if method not in ("weight", "activation"):
            raise ValueError(f"strategy.align_method: got {method!r}; allowed: weight, activation")
        if method == "activation" and not proxy:
            raise ValueError(
                "strategy.proxy_samples: got 0; allowed: > 0 with align_method 'activation'"
            )
        self._setup(model, proxy or [], reset_bn)
        self.method = method
        self.seed = seed

    def summary(self) -> None:
        """Log the configuration once."""
        super().summary()
        logger.info(
            "Aligned FedAvg: %s matching, %d proxy batches, BN reset %s",
            self.method, len(self.proxy), self.reset_bn,
        )  # fmt: skip

    def merge(
        self, server_round: int, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """Align each update to ``global_state``, then take the weighted mean."""
        rng = np.random.default_rng([self.seed, server_round])
        aligned = []
        moved: dict[str, int] = {}
        global_model = self._scratch(global_state)
        for u in updates:
            if self.method == "weight":
                perm, _ = weight_matching(self.spec, global_state, u.state, rng=rng)
            else:
                perm, _ = activation_matching(
                    self.spec, global_model, self._scratch(u.state), self.proxy
                )
            aligned.append(apply_permutation(self.spec, perm, u.state))
            for group, count in count_moved_units(perm).items():
                moved[group] = moved.get(group, 0) + count
        self.report(units_permuted=moved)
        state = weighted_average(aligned, [float(u.num_examples) for u in updates])
        return self._finish(state)


class OTFusion(_ProxyMixin, MergingStrategy):
    """Average after soft-aligning every client to the global model by optimal transport.

    OTFusion (Singh & Jaggi, NeurIPS 2020, https://arxiv.org/abs/1910.05653):
    layer by layer, a transport plan between the client's and the global
    model's units (exact EMD or Sinkhorn; weight- or activation-based cost;
    uniform or activation-derived marginals) moves the client onto the
    global units; the moved clients are averaged with sample-count weights.
    Clients of *other widths* are accepted and fused into the server's width.

    Parameters
    ----------
    model : nn.Module
        The server's architecture and width.
    solver : {"emd", "sinkhorn"} (default: "emd")
    reg : float (default: 0.1)
        Sinkhorn regularisation (relative to the largest cost).
    cost : {"weight", "activation"} (default: "weight")
    marginals : {"uniform", "activation"} (default: "uniform")
    proxy : list of Tensor
        Server-held input batches (needed by activation cost or marginals, and
        for BatchNorm re-estimation).
    reset_bn : bool (default: True)
    **kwargs
        Flower's FedAvg options.
    """

    accepts_other_widths = True

    def __init__(
        self,
        *,
        model: nn.Module,
        solver: str = "emd",
        reg: float = 0.1,
        cost: str = "weight",
        marginals: str = "uniform",
        proxy: list[torch.Tensor] | None = None,
        reset_bn: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (cost == "activation" or marginals == "activation") and not proxy:
            raise ValueError(
                "strategy.proxy_samples: got 0; allowed: > 0 with activation cost or marginals"
            )
        self._setup(model, proxy or [], reset_bn)
        self.solver, self.reg, self.cost, self.marginals = solver, reg, cost, marginals

    def summary(self) -> None:
        """Log the configuration once."""
        super().summary()
        logger.info(
            "OT fusion: %s solver (reg %g), %s cost, %s marginals, %d proxy batches",
            self.solver, self.reg, self.cost, self.marginals, len(self.proxy),
        )  # fmt: skip

    def merge(
        self, server_round: int, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """Transport each update onto the global units, then take the weighted mean."""
        moved_states, costs = [], []
        needs_acts = "activation" in (self.cost, self.marginals)
        for u in updates:
            acts = None
            if needs_acts:
                acts = collect_activation_stats(
                    self.spec, self._scratch(global_state), self._client_model(u.state), self.proxy
                )
            plans, info = ot_align(
                self.spec, global_state, u.state, solver=self.solver, reg=self.reg,
                cost=self.cost, marginals=self.marginals, activations=acts,
            )  # fmt: skip
            moved_states.append(apply_transport(self.spec, plans, u.state))
            costs.append(float(sum(info.costs.values())))
        self.report(transport_cost_mean=float(np.mean(costs)))
        state = weighted_average(moved_states, [float(u.num_examples) for u in updates])
        return self._finish(state)

    def _client_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A model of the client's own widths, holding its weights."""
        shapes_match = all(
            state[k].shape == v.shape for k, v in self.model.state_dict().items() if k in state
        )
        if shapes_match:
            return self._scratch(state)
        raise ValueError(
            "strategy.ot_cost: activation-based OT needs clients of the server's width; "
            "use ot_cost = 'weight' for clients of other widths"
        )
