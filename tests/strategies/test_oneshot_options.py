"""Tests of the oneshot plugin's options and checks."""

from __future__ import annotations

import pytest

from fedmerge.errors import ConfigError
from strategies.config import run_config_from_dict
from strategies.plugins import get_plugin
from strategies.plugins.oneshot import OneShotOptions


def test_defaults() -> None:
    o = OneShotOptions()
    assert (o.method, o.proxy_samples, o.reset_bn) == ("weight", 0, True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "mean"}, r"^method: got 'mean'; allowed: average, weight, activation, "),
        ({"method": "activation"}, r"^proxy_samples: got 0; allowed: > 0 with method "),
        ({"method": "ot-activation"}, r"^proxy_samples: got 0; allowed: > 0 with method "),
        ({"proxy_samples": -1}, r"^proxy_samples: got -1; allowed: >= 0$"),
        ({"client_widths": (1, 0)}, r"^client_widths: got \[1, 0\]; allowed: a list of integers"),
    ],
)
def test_bad_options_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OneShotOptions(**kwargs)


def test_activation_methods_accept_proxy_data() -> None:
    assert OneShotOptions(method="ot-activation", proxy_samples=64).proxy_samples == 64


def test_robust_aggregation_is_refused() -> None:
    config = run_config_from_dict({"strategy": {"name": "oneshot"}})
    plugin = get_plugin("oneshot")
    plugin.check(config.strategy.options, config)
    with pytest.raises(
        ConfigError, match=r"^strategy.robust: got 'median'; allowed for oneshot: 'none' "
    ):
        run_config_from_dict({"strategy": {"name": "oneshot", "robust": "median"}})


def test_independent_init_never_acts_for_peers() -> None:
    from sims.checks import check_scenario

    train = {"independent_init": True}
    check_scenario(run_config_from_dict({"strategy": {"name": "fedavg"}, "train": train}))
    peer = run_config_from_dict({"strategy": {"name": "dimat"}, "train": train})
    with pytest.raises(ConfigError, match=r"^train.independent_init: got True; allowed: false"):
        check_scenario(peer)


WIDE = {"name": "oneshot", "method": "ot-weight", "client_widths": [1, 2]}


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ({"strategy": {**WIDE, "client_widths": [2, 1]}},
         r"^strategy.client_widths: got \[2, 1\]; allowed: a list whose first width is "
         r"model.width \(1\)"),
        ({"strategy": {**WIDE, "method": "weight"}},
         r"^strategy.method: got 'weight' with client_widths \[1, 2\]; allowed: 'ot-weight' "),
        ({"strategy": WIDE, "train": {"independent_init": False}},
         r"^train.independent_init: got false with strategy.client_widths \[1, 2\]; "),
        ({"strategy": WIDE, "clients_per_round": 2},
         r"^clients_per_round: got 2 with strategy.client_widths \[1, 2\]; allowed: "
         r"num_clients \(10\)"),
    ],
)  # fmt: skip
def test_other_widths_need_ot_weight_an_anchor_of_the_model_width_and_every_client(
    scenario: dict, message: str
) -> None:
    base = {"num_clients": 10, "clients_per_round": 10, "train": {"independent_init": True}}
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict({**base, **scenario})


def test_clients_of_other_widths_start_from_their_own_width() -> None:
    config = run_config_from_dict(
        {"num_clients": 3, "clients_per_round": 3, "train": {"independent_init": True},
         "strategy": WIDE}
    )  # fmt: skip
    plugin = get_plugin("oneshot")
    widths = [plugin.client_width(config.strategy.options, p, 1) for p in range(3)]
    assert widths == [1, 2, 1]  # cycled over partition ids
    assert get_plugin("fedavg").client_width(config.strategy.options, 1, 1) == 1
