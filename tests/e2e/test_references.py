"""Every built-in strategy still gives the numbers it gave before the plugin restructuring.

The references in ``tests/references/`` were recorded by
``scripts/record_references.py`` with the code before the change; a run of the
same scenario must give the same ``metrics.jsonl`` in every field but wall
times. Fields that rows gained after a reference was recorded (screening
counts, for instance) are not in it, so they are not compared; no field of the
reference may be missing.

Bit for bit where the machine computes as the recording one did. PyTorch picks
its CPU kernels by processor (vector width, BLAS paths), and they round
differently: on an AMD EPYC with AVX2 only, the initial model's test loss
already differs from the reference's in the 8th digit, and a round's
train-loss spread by up to 1.1e-5 of itself (8e-8 absolute). So every discrete field
(rounds, sampled clients, answers, units moved) must be equal, every float
within :data:`FLOAT_TOLERANCE` (an accuracy step on the test set is 1/359),
and where every float is equal bit for bit the final model must be too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from sims.launch import simulate
from sims.scenario_files import load_scenario
from tests.references import REFERENCE_RUNS, WALL_TIME_FIELDS, reference_path

#: How far a float may be from the reference's on a machine that rounds differently.
FLOAT_TOLERANCE = {"rel": 1e-6, "abs": 1e-6}


def _approx(value: Any) -> Any:
    """``value`` with every float in it replaced by ``pytest.approx`` at :data:`FLOAT_TOLERANCE`."""
    if isinstance(value, float):
        return pytest.approx(value, **FLOAT_TOLERANCE)
    if isinstance(value, list):
        return [_approx(v) for v in value]
    if isinstance(value, dict):
        return {k: _approx(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name", sorted(REFERENCE_RUNS))
def test_same_numbers_as_the_reference(name: str, ray_address: str, tmp_path: Path) -> None:
    reference = json.loads(reference_path(name).read_text())
    assert reference["overrides"] == REFERENCE_RUNS[name]
    config = load_scenario(
        None, [*reference["overrides"], f"simulation.ray_address='{ray_address}'"]
    )
    simulate(config, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in WALL_TIME_FIELDS:
            row.pop(key)
    assert len(rows) == len(reference["rows"])
    exact = True
    for row, expected in zip(rows, reference["rows"], strict=True):
        assert set(expected) <= set(row), f"round {expected['round']}: fields lost"
        got = {k: row[k] for k in expected}
        # The old relay took the peers' train losses in arrival order, which varies from run
        # to run; they are now taken in partition order. Same values, so the statistics agree
        # to the last bits of a float64 (and now repeat exactly).
        loss, expected_loss = got.pop("train_loss"), expected.pop("train_loss")
        assert got == _approx(expected), f"round {expected['round']}"
        if expected_loss is None:
            assert loss is None
        else:
            assert loss == _approx(expected_loss), f"round {expected['round']}: train_loss"
            exact = exact and loss == pytest.approx(expected_loss, rel=1e-14, abs=0)
        exact = exact and got == expected
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    if exact:  # this machine rounds as the recording one did: the model is the same bytes
        assert digest == reference["model_sha256"]
