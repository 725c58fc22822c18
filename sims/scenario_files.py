"""Scenario files: TOML tables, ``--set`` overrides and the scenarios fedmerge ships.

A scenario file holds the tables of a :class:`~strategies.config.RunConfig`
(``[dataset]``, ``[partition]``, ``[model]``, ``[train]``, ``[strategy]``,
``[topology]``, ``[simulation]`` and top-level keys). Missing keys take their
defaults; unknown keys and bad values are errors.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from strategies.config import ConfigError, RunConfig, run_config_from_dict, set_dotted

#: The shipped scenarios (``fedmerge simulate NAME``).
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
#: The scenario ``fedmerge simulate`` runs without arguments.
DEFAULT_SCENARIO = "default"
#: A ``--set`` key: TOML bare keys joined by dots.
_DOTTED_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")

__all__ = [
    "DEFAULT_SCENARIO",
    "SCENARIO_DIR",
    "apply_overrides",
    "load_scenario",
    "read_toml",
    "resolve_scenario_path",
    "shipped_scenarios",
]


def shipped_scenarios() -> list[str]:
    """Names of the shipped scenarios, sorted."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def resolve_scenario_path(spec: str | None) -> Path:
    """Map ``None`` or a shipped scenario's name to its file; keep explicit paths."""
    if spec is None:
        return SCENARIO_DIR / f"{DEFAULT_SCENARIO}.toml"
    path = Path(spec)
    if path.suffix != ".toml" and (SCENARIO_DIR / f"{spec}.toml").exists():
        return SCENARIO_DIR / f"{spec}.toml"
    if not path.is_file():
        raise ConfigError(
            f"scenario: {spec!r} is not a file; allowed: a TOML file or one of "
            f"{', '.join(shipped_scenarios())}"
        )
    return path


def read_toml(path: Path, what: str = "scenario") -> dict[str, Any]:
    """The tables of a TOML file; one :class:`ConfigError` line if it cannot be read."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM, as Notepad writes
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: {str(path)!r} is not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{what}: {str(path)!r} cannot be read ({exc.strerror})") from None
    except RecursionError:
        raise ConfigError(f"{what}: {str(path)!r} is nested too deeply") from None


def _parse_value(text: str) -> Any:
    """The right-hand side of ``--set key=value`` as a TOML value, else the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, TOML values) to nested tables."""
    dotted: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not _DOTTED_KEY.fullmatch(key.strip()):
            raise ConfigError(
                f"--set: got {item!r}; allowed: key=value with a dotted key of letters, digits, "
                f"'_' and '-', e.g. train.lr=0.05"
            )
        dotted[key.strip()] = _parse_value(text.strip())
    return set_dotted(data, dotted)


def check_overrides(overrides: object) -> None:
    """Refuse ``overrides`` from Python that are not a list of ``key=value`` strings.

    One string would be read letter by letter (``--set: got 'r'``).
    """
    if (
        isinstance(overrides, str)
        or not isinstance(overrides, Sequence)
        or not all(isinstance(o, str) for o in overrides)
    ):
        raise ConfigError(
            f"overrides: got {overrides!r}; allowed: a list of 'key=value' strings, as --set "
            f"takes them (e.g. ['rounds=3'])"
        )


def load_scenario(spec: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a scenario (a shipped name or a TOML path), apply ``--set`` overrides, validate.

    ``overrides``: ``key=value`` strings, as ``--set`` takes them (a list, not one string).
    """
    check_overrides(overrides)
    data = read_toml(resolve_scenario_path(spec))
    return run_config_from_dict(apply_overrides(data, overrides))
