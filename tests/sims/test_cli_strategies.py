"""``fedmerge strategies`` lists every registered strategy with its options and defaults."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sims import cli
from strategies.plugins import get_plugin, plugin_names


def test_every_strategy_option_and_default_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["strategies"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table wraps long cells
    for name in plugin_names():
        assert name in out
        for f in dataclasses.fields(get_plugin(name).Options):
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            assert f"{f.name} ({json.dumps(default)})" in out, (name, f.name)


def test_an_unknown_plugin_module_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["strategies", "--plugin", "no_such_module_x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "plugins: got 'no_such_module_x'" in err
