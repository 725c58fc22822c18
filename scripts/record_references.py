"""Record the reference runs that pin fedmerge's numbers across refactors.

Runs one short simulation per built-in strategy and writes
``tests/references/<strategy>.json``: the scenario overrides, every
``metrics.jsonl`` row without its wall times, and the SHA-256 of the final
``model.safetensors``. ``tests/e2e/test_references.py`` re-runs the same
scenarios and compares. Regenerate only when a change of numbers is meant:

    .venv/bin/python scripts/record_references.py [STRATEGY ...]
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.references import REFERENCE_RUNS, WALL_TIME_FIELDS, reference_path  # noqa: E402


def record(name: str, overrides: list[str]) -> dict:
    """Run one reference scenario; its rows (less wall times) and model hash."""
    from sims.launch import simulate
    from sims.scenario_files import load_scenario

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / name
        simulate(load_scenario(None, overrides), run_dir)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        digest = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    for row in rows:
        for key in WALL_TIME_FIELDS:
            row.pop(key, None)
    return {"overrides": overrides, "rows": rows, "model_sha256": digest}


def main(names: list[str]) -> None:
    """Record the named references (all when none is named)."""
    for name in names or sorted(REFERENCE_RUNS):
        data = record(name, REFERENCE_RUNS[name])
        path = reference_path(name)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {len(data['rows'])} rows, model {data['model_sha256'][:12]} -> {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
