"""Every server-side strategy aggregates self-supervised networks (encoder + projector).

Real Flower messages; the strategies are built by their plugins from a
:class:`ServerContext` of a SimCLR or BYOL run, as the ServerApp builds them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmerge.align import apply_permutation, permutation_spec_for, random_permutation
from strategies.config import ConfigError, run_config_from_dict
from strategies.federation import Federation
from strategies.merging import MergingStrategy
from strategies.server_app import server_context

BASE = {"num_clients": 3, "clients_per_round": 3, "model": {"name": "mlp", "hidden": [24, 12]}}


def _reply(node: int, state: dict[str, torch.Tensor], n: int) -> Message:
    instruction = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content, reply_to=instruction)


def _setup(task: str, strategy: dict):  # type: ignore[no-untyped-def]
    config = run_config_from_dict(
        {**BASE, "task": {"name": task, "projection_hidden": 16, "projection_dim": 8},
         "strategy": strategy}
    )  # fmt: skip
    fed = Federation(config)
    ctx = server_context(config, fed)
    strat = config.strategy.plugin.strategy(config.strategy.options, ctx)  # type: ignore[attr-defined]
    strat.bind_nodes({p: 10 + p for p in range(3)}, clients_per_round=3,
                     rng=np.random.default_rng(0))  # fmt: skip
    return fed, strat


def _clients(g: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
         for k, v in g.items()}
        for _ in range(3)
    ]  # fmt: skip


STRATEGIES = [
    {"name": "fedavg"},
    {"name": "fedprox"},
    {"name": "ldawa"},
    {"name": "ldawa", "normalize": "weights", "negative": "clip", "bn": "average",
     "layer": "module", "sample_weighted": True, "warmup_rounds": 1},
    {"name": "aligned", "method": "weight"},
    {"name": "aligned", "method": "activation", "proxy_samples": 64},
    {"name": "ot", "solver": "emd"},
    {"name": "ot", "solver": "sinkhorn", "cost": "activation", "proxy_samples": 64},
    {"name": "task-arithmetic"},
    {"name": "ties"},
    {"name": "zipit"},
]  # fmt: skip


@pytest.mark.parametrize("task", ["simclr", "byol"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: "-".join(map(str, s.values())))
def test_strategy_aggregates_the_encoder_and_projector(task: str, strategy: dict) -> None:
    fed, strat = _setup(task, strategy)
    g = {k: v.clone() for k, v in fed.initial_model().state_dict().items()}
    assert any(k.startswith("projector.") for k in g) and not any("head" in k for k in g)
    clients = _clients(g)
    outcome = strat.aggregate_round(
        2, g, [_reply(10 + i, s, 10 * (i + 1)) for i, s in enumerate(clients)]
    )
    assert outcome.skipped == [] and outcome.state is not None
    assert set(outcome.state) == set(g)
    for key, value in outcome.state.items():
        assert value.shape == g[key].shape and torch.isfinite(value.float()).all(), key
    moved = [k for k in g if g[k].is_floating_point() and not torch.equal(outcome.state[k], g[k])]
    assert any(k.startswith("projector.") for k in moved) and any(
        k.startswith("encoder.") for k in moved
    )
    if strategy["name"] in ("fedavg", "fedprox"):
        for key in g:
            if g[key].is_floating_point():
                expected = sum(10 * (i + 1) * clients[i][key] for i in range(3)) / 60
                torch.testing.assert_close(outcome.state[key], expected)


def test_aligned_undoes_a_planted_permutation_of_the_whole_ssl_network() -> None:
    fed, strat = _setup("simclr", {"name": "aligned", "method": "weight", "reset_bn": False})
    assert isinstance(strat, MergingStrategy)
    model = fed.initial_model()
    g = {k: v.clone() for k, v in model.state_dict().items()}
    clients = _clients(g)[:2]
    spec = permutation_spec_for(model, fed.example_input)
    perm = random_permutation(spec, g, generator=torch.Generator().manual_seed(2))
    assert "projector" in " ".join(spec.axes)
    permuted = apply_permutation(spec, perm, clients[1])
    strat.bind_nodes({0: 10, 1: 11}, clients_per_round=2, rng=np.random.default_rng(0))
    outcome = strat.aggregate_round(1, g, [_reply(10, clients[0], 10), _reply(11, permuted, 30)])
    assert outcome.state is not None
    for key in g:  # the naive expectation: the weighted mean of the unpermuted clients
        if g[key].is_floating_point():
            expected = (10 * clients[0][key] + 30 * clients[1][key]) / 40
            torch.testing.assert_close(outcome.state[key], expected, rtol=1e-5, atol=1e-6)


SIMCLR, BYOL = {"name": "simclr"}, {"name": "byol"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"task": SIMCLR, "strategy": {"name": "gossip"}},
         "task.name: got 'simclr' with strategy 'gossip'"),
        ({"task": BYOL, "strategy": {"name": "fisher"}},
         "task.name: got 'byol' with strategy 'fisher'"),
        ({"task": SIMCLR, "strategy": {"name": "oneshot"}},
         "task.name: got 'simclr' with strategy 'oneshot'"),
        ({"task": SIMCLR, "strategy": {"name": "fedavg", "fraction_evaluate": 0.5}},
         "strategy.fraction_evaluate: got 0.5 with task 'simclr'; allowed: 0"),
        ({"task": {**BYOL, "temperature": 0.1}},
         "task.temperature: got 0.1; allowed: only with task 'simclr' (task is 'byol')"),
        ({"task": {**SIMCLR, "knn_k": 0}}, "task.knn_k: got 0; allowed: an integer >= 1"),
        ({"task": {"name": "dino"}}, "task.name: got 'dino'; allowed: byol, simclr, supervised"),
    ],
)  # fmt: skip
def test_ssl_configuration_errors_are_one_line(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        run_config_from_dict(data)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_supervised_default_keeps_the_digest_and_model() -> None:
    plain = run_config_from_dict({})
    explicit = run_config_from_dict({"task": {"name": "supervised"}})
    assert plain.digest() == explicit.digest()
    a, b = Federation(plain).initial_model(), Federation(explicit).initial_model()
    assert type(a).__name__ == "SimpleCNN"
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])


def test_self_supervised_tasks_need_image_inputs() -> None:
    config = run_config_from_dict(
        {"dataset": {"name": "mnist1d", "mnist1d_samples": 100}, "model": {"name": "mlp"},
         "task": SIMCLR}
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"task.name: got 'simclr' for inputs of shape \(1, 40\)"):
        Federation(config).initial_model()
