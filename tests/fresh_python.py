"""Run a few lines in a fresh interpreter: what a new process imports, seen from inside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_fresh(code: str) -> str:
    """Run ``code`` with ``python -c`` in the repository root; return its standard output.

    Raises ``subprocess.CalledProcessError`` (with its standard error) if it fails.
    """
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout
