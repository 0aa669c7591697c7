"""mypy over the package (client/ and daemon/), with [tool.mypy] in pyproject.toml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: `bash scripts/test` installs it (the test extra)")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            # A stale cache (.mypy_cache) once reported errors a fresh run
            # does not: every run here is a fresh one.
            "--no-incremental",
            "--config-file",
            str(ROOT / "pyproject.toml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"mypy failed:\n{done.stdout}{done.stderr}"
