"""``fedmerge strategies`` lists every registered strategy with its options and defaults."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from sims import cli
from strategies.plugins import get_plugin, plugin_names


def _declared_defaults(name: str) -> dict[str, object]:
    """Each option's default as its dataclass declares it (tuples as JSON lists)."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(get_plugin(name).Options):
        out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    return out


def test_json_lists_every_strategy_option_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["strategies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == plugin_names()
    for row in rows:
        assert row["options"] == _declared_defaults(row["name"]), row["name"]
        assert row["side"] == ("peer" if get_plugin(row["name"]).peer else "server")


def test_the_table_shows_every_option_on_its_own_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["strategies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in plugin_names():
        assert any(f" {name} " in line for line in lines), name
        for option, default in _declared_defaults(name).items():
            cell = f"{option} ({json.dumps(default)})"
            assert any(cell in line for line in lines), (name, cell)


def test_an_unknown_plugin_module_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["strategies", "--plugin", "no_such_module_x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "plugins: got 'no_such_module_x'" in err


def test_a_plugin_that_refuses_to_load_is_named_and_can_be_loaded_once_mended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = tmp_path / "refusing_plugin.py"
    plugin.write_text('raise ValueError("boom")\n')
    assert cli.main(["strategies", "--plugin", str(plugin)]) == 2
    err = capsys.readouterr().err
    assert err == f"fedmerge: error: plugins: {str(plugin)!r} refused to load: boom\n"
    plugin.write_text("LOADED = True\n")  # mended: loaded now, not skipped as loaded before
    assert cli.main(["strategies", "--plugin", str(plugin)]) == 0
    assert [m for m in sys.modules.values() if getattr(m, "LOADED", False)]
