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
