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


def test_what_is_not_a_run_directory_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("x")
    for path in (tmp_path / "nowhere", tmp_path / "a-file"):
        assert main(["status", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"fedmerge: error: RUN_DIR: got {str(path)!r}, which is not a directory; allowed: "
            "a run directory (of fedmerge simulate or compare, or a deployed run's "
            "runs/NAME-TIME)"
        )


@pytest.mark.parametrize(
    ("text", "got"),
    [('{"status": "compl', "not a JSON object with one"), ("[1, 2]", "not a JSON object with one"),
     ('{"status": "finished"}', "got 'finished'"),
     # a list or an object was looked up in a dict: TypeError, unhashable
     ('{"status": ["completed"]}', "got ['completed']"), ('{"status": {"a": 1}}', "got {'a': 1}")],
)  # fmt: skip
def test_a_damaged_summary_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, got: str
) -> None:
    (tmp_path / "summary.json").write_text(text)
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"summary.json' has no status ({got}); allowed: a summary.json that fedmerge " in err


@pytest.mark.parametrize("lost", [[{"round": 2}], "x", [5]])
def test_a_degraded_summary_with_odd_lost_entries_still_gets_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lost: object
) -> None:
    _write(tmp_path / "run", {"status": "degraded", "lost_partitions": [2], "lost": lost})
    assert main(["status", str(tmp_path / "run")]) == 3
    assert capsys.readouterr().out.startswith("degraded: lost partitions [2] (")


def test_a_summary_that_is_a_folder_is_named_as_not_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "summary.json").mkdir()
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedmerge: error: RUN_DIR: {str(tmp_path / 'summary.json')!r} is not a file; "
        "allowed: a summary.json that fedmerge wrote\n"
    )
