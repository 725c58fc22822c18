"""Build a server-side strategy from a scenario."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedmerge.federation import initial_model, proxy_batches
from fedmerge.merge.ldawa import LDAWAConfig
from fedmerge.scenario import STRATEGY_NAMES, Scenario
from strategies.aligned import AlignedFedAvg, OTFusion
from strategies.ldawa import LDAWA
from strategies.sampling import SeededFedAvg, SeededFedProx


def build_strategy(scenario: Scenario) -> Strategy:
    """Return the strategy named by ``scenario.strategy.name``.

    Every strategy waits for all ``num_clients`` nodes, trains on
    ``clients_per_round`` of them per round, and evaluates on a
    ``fraction_evaluate`` share of them (0 turns client-side evaluation off).
    """
    st = scenario.strategy
    common: dict[str, Any] = dict(
        fraction_train=scenario.clients_per_round / scenario.num_clients,
        fraction_evaluate=st.fraction_evaluate,
        min_train_nodes=scenario.clients_per_round,
        min_evaluate_nodes=0,
        min_available_nodes=scenario.num_clients,
    )
    if st.name == "fedavg":
        return SeededFedAvg(**common)
    if st.name == "fedprox":
        return SeededFedProx(proximal_mu=st.prox_mu, **common)
    if st.name == "ldawa":
        config = LDAWAConfig(
            normalize=st.ldawa_normalize,
            negative=st.ldawa_negative,
            bn=st.ldawa_bn,
            layer=st.ldawa_layer,
            sample_weighted=st.ldawa_sample_weighted,
        )
        return LDAWA(config=config, warmup_rounds=st.ldawa_warmup_rounds, **common)
    if st.name == "aligned":
        return AlignedFedAvg(
            model=initial_model(scenario),
            method=st.align_method,
            proxy=proxy_batches(scenario),
            reset_bn=st.reset_bn,
            seed=scenario.seed,
            **common,
        )
    if st.name == "ot":
        return OTFusion(
            model=initial_model(scenario),
            solver=st.ot_solver,
            reg=st.ot_reg,
            cost=st.ot_cost,
            marginals=st.ot_marginals,
            proxy=proxy_batches(scenario),
            reset_bn=st.reset_bn,
            **common,
        )
    raise ValueError(
        f"strategy.name: unknown strategy {st.name!r}; allowed: {', '.join(STRATEGY_NAMES)}"
    )
