"""Shared fixtures: how tests find the checkout and the installed `lrpilot` command."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def lrpilot_exe() -> str:
    """The `lrpilot` console script of the interpreter running the tests."""
    candidate = Path(sys.executable).parent / "lrpilot"
    found = str(candidate) if candidate.exists() else shutil.which("lrpilot")
    assert found, "the `lrpilot` command is not installed: run `bash scripts/test`"
    return found
