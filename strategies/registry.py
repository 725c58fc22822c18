"""Build a server-side strategy from a scenario."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedmerge.merge.ldawa import LDAWAConfig
from fedmerge.scenario import STRATEGY_NAMES, Scenario
from strategies.ldawa import LDAWA
from strategies.sampling import SeededFedAvg, SeededFedProx


def build_strategy(scenario: Scenario) -> Strategy:
    """Return the strategy named by ``scenario.strategy.name``.

    Every strategy waits for all ``num_clients`` nodes, trains on
    ``clients_per_round`` of them per round, and evaluates on a
    ``fraction_evaluate`` share of them (0 turns client-side evaluation off).
    """
    st = scenario.strategy
    common = dict(
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
    raise ValueError(
        f"strategy.name: unknown strategy {st.name!r}; allowed: {', '.join(STRATEGY_NAMES)}"
    )
