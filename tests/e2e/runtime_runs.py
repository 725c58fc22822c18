"""A scenario run on a :class:`sims.runtime.Runtime` directly, as ``simulate`` submits it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sims.launch import federation_config, run_config_toml
from sims.runtime import Runtime
from strategies.config import RunConfig


def submit(
    runtime: Runtime,
    scenario: RunConfig,
    run_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> bool:
    """Run ``scenario`` into ``run_dir`` (made if missing) on ``runtime``; whether it ended well.

    It ended well if it wrote its summary. ``on_round`` gets every row of its
    ``metrics.jsonl`` while it runs.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    ended = runtime.run(
        run_dir, run_config_toml(scenario, run_dir), federation_config(scenario), on_round
    )
    return ended is None
