"""A plugin whose import fails is bad input: one ``plugins`` line with its own error, exit 2."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmerge.errors import ConfigError
from sims import cli, commands
from strategies.plugins import load_plugins

EXIT_BAD_INPUT = 2
PYTHON = shlex.quote(sys.executable)

# (id, the plugin's source, what its import raised as the line says it, the line it raised on)
BROKEN = [
    ("syntax-error", "x = 1\ndef (\n", "SyntaxError: invalid syntax", 2),
    ("indentation-error", "if 1:\n x = 1\n  y = 2\n", "IndentationError: unexpected indent", 3),
    ("runtime-error", "x = 1\nraise RuntimeError('kaput')\n", "RuntimeError: kaput", 2),
    ("zero-division", "x = 1 / 0\n", "ZeroDivisionError: division by zero", 1),
    ("two-line-message", "raise OSError('first\\nsecond')\n", "OSError: first second", 1),
    ("missing-dependency", "import no_such_dependency_xyz\n",
     "ModuleNotFoundError: No module named 'no_such_dependency_xyz'", 1),
    ("sys-exit-0", "import sys\nsys.exit(0)\n", "SystemExit: 0", 2),
    ("sys-exit-3", "import sys\n\nsys.exit(3)\n", "SystemExit: 3", 3),
    ("bare-sys-exit", "import sys\nsys.exit()\n", "SystemExit", 2),
]  # fmt: skip
BROKEN_IDS = [case[0] for case in BROKEN]


def _file_line(path: Path, raised: str, line: int) -> str:
    """The line for a broken plugin file, written out from the contract."""
    path = path.resolve()
    return (
        f"plugins: got {str(path)!r}, whose import raised {raised} ({path}:{line}); allowed: a "
        f"plugin that imports without error (`{PYTHON} {path}` shows the traceback)"
    )


def _loaded_from(path: Path) -> list[str]:
    """Names in ``sys.modules`` of modules loaded from ``path``."""
    path = path.resolve()
    return [
        name
        for name, module in list(sys.modules.items())
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path
    ]


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the Flower launch: the test fails if a run starts."""

    def fake_simulate(*args: object, **kwargs: object) -> dict:
        raise AssertionError("the simulation started despite bad input")

    monkeypatch.setattr(commands, "simulate", fake_simulate)


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on ``sys.path`` for plugin modules; any of them left in ``sys.modules`` goes."""
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [n for n in sys.modules if n.startswith("fm_broken_")]:
        del sys.modules[name]


@pytest.mark.parametrize(("case", "source", "raised", "line"), BROKEN, ids=BROKEN_IDS)
def test_a_broken_plugin_file_is_one_line_and_loads_once_mended(
    tmp_path: Path, case: str, source: str, raised: str, line: int
) -> None:
    plugin = tmp_path / f"broken_{case.replace('-', '_')}.py"
    plugin.write_text(source)
    with pytest.raises(ConfigError) as info:
        load_plugins([str(plugin)])
    assert str(info.value) == _file_line(plugin, raised, line)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert _loaded_from(plugin) == []  # not kept as loaded
    plugin.write_text("LOADED = True\n")
    load_plugins([str(plugin)])
    assert [sys.modules[name].LOADED for name in _loaded_from(plugin)] == [True]


def test_a_keyboard_interrupt_in_a_plugin_is_not_turned_into_bad_input(tmp_path: Path) -> None:
    plugin = tmp_path / "interrupted.py"
    plugin.write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_plugins([str(plugin)])
    assert _loaded_from(plugin) == []


def test_a_plugin_that_raises_value_error_still_refuses_to_load(tmp_path: Path) -> None:
    plugin = tmp_path / "refusing.py"
    plugin.write_text("raise ValueError('toy: bad option')\n")
    with pytest.raises(ConfigError) as info:
        load_plugins([str(plugin)])
    assert str(info.value) == f"plugins: {str(plugin)!r} refused to load: toy: bad option"


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("no_such_plugin_xyz", "No module named 'no_such_plugin_xyz'"),
        ("no_such_plugin_xyz.sub", "No module named 'no_such_plugin_xyz'"),
        ("json.no_such_sub_xyz", "No module named 'json.no_such_sub_xyz'"),
    ],
)
def test_a_missing_plugin_module_says_what_is_allowed(spec: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_plugins([spec])
    assert str(info.value) == (
        f"plugins: got {spec!r}; allowed: an importable module or an existing .py file ({reason})"
    )


def test_a_missing_plugin_file_says_what_is_allowed(tmp_path: Path) -> None:
    plugin = tmp_path / "absent.py"
    with pytest.raises(ConfigError) as info:
        load_plugins([str(plugin)])
    assert str(info.value) == (
        f"plugins: got {str(plugin)!r}; allowed: an importable module or an existing .py file "
        f"({plugin.resolve()})"
    )


@pytest.mark.parametrize(("case", "source", "raised", "line"), BROKEN, ids=BROKEN_IDS)
def test_a_broken_plugin_module_is_one_line_with_its_own_error(
    module_dir: Path, case: str, source: str, raised: str, line: int
) -> None:
    name = f"fm_broken_{case.replace('-', '_')}"
    path = module_dir / f"{name}.py"
    path.write_text(source)
    with pytest.raises(ConfigError) as info:
        load_plugins([name])
    command = shlex.quote(f"import {name}")
    assert str(info.value) == (
        f"plugins: got {name!r}, whose import raised {raised} ({path.resolve()}:{line}); "
        f"allowed: a plugin that imports without error (`{PYTHON} -c {command}` shows the "
        f"traceback)"
    )


@pytest.mark.parametrize(("case", "source", "raised", "line"), BROKEN, ids=BROKEN_IDS)
def test_strategies_with_a_broken_plugin_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    source: str,
    raised: str,
    line: int,
) -> None:
    plugin = tmp_path / f"cli_{case.replace('-', '_')}.py"
    plugin.write_text(source)
    assert cli.main(["strategies", "--plugin", str(plugin)]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert err == f"fedmerge: error: {_file_line(plugin, raised, line)}\n"
    assert out == ""


@pytest.mark.parametrize("case", ["syntax-error", "runtime-error", "sys-exit-0"])
def test_simulate_with_a_broken_plugin_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_simulation: None, case: str
) -> None:
    _, source, raised, line = BROKEN[BROKEN_IDS.index(case)]
    plugin = tmp_path / f"sim_{case.replace('-', '_')}.py"
    plugin.write_text(source)
    runs = tmp_path / "runs"
    argv = ["simulate", "--set", f"plugins=[{str(plugin)!r}]", "--runs-root", str(runs)]
    assert cli.main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == f"fedmerge: error: {_file_line(plugin, raised, line)}\n"
    assert not runs.exists()
