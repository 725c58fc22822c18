"""``fedmerge status``: one line and an exit code per summary.json status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sims.cli import main


def _write(run_dir: Path, summary: dict) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize(
    ("summary", "code", "line"),
    [
        ({"status": "completed", "final_accuracy": 0.9, "rounds": 2}, 0,
         "completed: final accuracy 0.9, 2 rounds"),
        ({"status": "failed", "stage": "discovery", "error": "NodeDiscoveryError: x"}, 1,
         "failed (discovery): NodeDiscoveryError: x"),
        ({"status": "degraded", "lost_partitions": [2], "failures": 1, "missing": 0,
          "refused": 0, "lost": [{"round": 2, "reason": "partition 2 (node 5): error gone"}]}, 3,
         "degraded: lost partitions [2] (1 skipped replies, 1 failures, 0 missing, 0 refused); "
         "first: round 2, partition 2 (node 5): error gone"),
    ],
)  # fmt: skip
def test_status_line_and_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], summary: dict, code: int, line: str
) -> None:
    _write(tmp_path / "run", summary)
    assert main(["status", str(tmp_path / "run")]) == code
    assert capsys.readouterr().out.strip() == line


def test_no_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(tmp_path)]) == 4
    assert "no summary.json" in capsys.readouterr().out
