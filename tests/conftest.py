"""Shared fixtures: how tests find the checkout and the installed `lrpilot`
command, a safety net that keeps every test away from the user's store and
from a daemon the user may be running, the data the live trainings learn,
and the daemons and trainings a test starts (helpers: procs.py)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import DaemonProcess, daemon_process, free_address

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory) -> Iterator[Path]:
    """A safety net, not the isolation itself: each test that starts a daemon
    or a DataPlane gives it its own state dir and free ports. This makes sure
    a test that forgets never writes ~/.local/state/lrpilot (a later daemon
    would restore its runs) and never reaches a daemon on the default ports.
    Set in os.environ so that subprocesses inherit it."""
    state = tmp_path_factory.mktemp("lrpilot-state-fallback")
    patch = pytest.MonkeyPatch()
    patch.setenv("LRPILOT_STATE_DIR", str(state))
    patch.delenv("XDG_STATE_HOME", raising=False)
    patch.setenv("LRPILOT_CONTROL", free_address())
    patch.setenv("LRPILOT_DAEMON", free_address())
    # Daemons in tests never take the default metrics port (one may be in use).
    patch.setenv("LRPILOT_METRICS_ADDR", "127.0.0.1:0")
    # ... nor post to a Grafana the user's shell points at.
    for name in ("LRPILOT_GRAFANA_TOKEN", "LRPILOT_GRAFANA_USER", "LRPILOT_GRAFANA_PASSWORD"):
        patch.delenv(name, raising=False)
    try:
        yield state
    finally:
        patch.undo()


@pytest.fixture(scope="session")
def lrpilot_exe() -> str:
    """The `lrpilot` console script of the interpreter running the tests."""
    candidate = Path(sys.executable).parent / "lrpilot"
    found = str(candidate) if candidate.exists() else shutil.which("lrpilot")
    assert found, "the `lrpilot` command is not installed: run `bash scripts/test`"
    return found


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's bundled digits (no download) as an .npz with x and y,
    written once for the training processes of the live tests."""
    import numpy as np
    from sklearn.datasets import load_digits

    data = load_digits()
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=data.data, y=data.target)
    return path


@pytest.fixture
def running_daemon(lrpilot_exe, tmp_path) -> Iterator[DaemonProcess]:
    """A ready `lrpilot daemon` of the test's own: state dir and log under
    tmp_path, free ports; killed at the end."""
    with daemon_process(lrpilot_exe, tmp_path / "state", tmp_path / "daemon.log") as daemon:
        yield daemon


@pytest.fixture
def processes() -> Iterator[list]:
    """Daemons and trainings a test starts (anything with ``stop()``): stopped
    at the end whatever happened, the last started first."""
    started: list = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def make_plane(tmp_path: Path) -> Iterator:
    """``make(state_dir=tmp_path/"state", **config)``: a daemon's DataPlane
    (logic, no socket) on a store of its own; closed at the end."""
    from lrpilot.daemon.service.config import DaemonConfig
    from lrpilot.daemon.service.dataplane import DataPlane

    planes: list[DataPlane] = []

    def make(state_dir: Path = tmp_path / "state", **fields) -> DataPlane:
        plane = DataPlane(DaemonConfig(state_dir=state_dir, **fields))
        planes.append(plane)
        return plane

    yield make
    for plane in planes:
        if plane.store._writer.is_alive():
            plane.close()
