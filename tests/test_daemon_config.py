"""The daemon's options as a user gives them: where it binds (the same
environment variables the clients read), and that a plane bound off
loopback needs keys or an explicit --insecure."""

from __future__ import annotations

import subprocess

import pytest
from pydantic import ValidationError

from lrpilot.daemon.service.config import DaemonConfig


def test_the_daemon_binds_the_addresses_the_clients_read(monkeypatch, tmp_path):
    monkeypatch.setenv("LRPILOT_DAEMON", "tcp://127.0.0.1:17311")
    monkeypatch.setenv("LRPILOT_CONTROL", "tcp://127.0.0.1:17313")
    config = DaemonConfig(state_dir=tmp_path)
    assert (config.address, config.control_address) == (
        "tcp://127.0.0.1:17311",
        "tcp://127.0.0.1:17313",
    )


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:7311", "tcp://*:7311", "tcp://10.1.2.3:7311"])
def test_an_exposed_data_plane_needs_insecure(address, tmp_path):
    with pytest.raises(ValidationError, match="--insecure"):
        DaemonConfig(address=address, state_dir=tmp_path)
    assert DaemonConfig(address=address, insecure=True, state_dir=tmp_path).insecure


@pytest.mark.parametrize(
    "address", ["tcp://127.0.0.1:7311", "tcp://localhost:7311", "ipc:///tmp/x"]
)
def test_a_local_data_plane_needs_nothing(address, tmp_path):
    assert DaemonConfig(address=address, state_dir=tmp_path).address == address


def test_the_command_line_refuses_an_exposed_data_plane_in_one_line(lrpilot_exe, tmp_path):
    done = subprocess.run(
        [lrpilot_exe, "daemon", "--address", "tcp://0.0.0.0:0", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--insecure" in lines[0], done.stderr
    assert not (tmp_path / "lrpilot.sqlite3").exists()  # refused before anything opened


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-message-bytes", str(10**17)),
        ("--silence-timeout", "1e300"),
        ("--max-step-gap", "0"),
        ("--max-runs", "-1"),
    ],
)
def test_absurd_daemon_limits_are_refused(lrpilot_exe, tmp_path, flag, value):
    done = subprocess.run(
        [lrpilot_exe, "daemon", flag, value, "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:7313", "tcp://10.1.2.3:7313"])
def test_an_exposed_control_plane_needs_keys_or_insecure(address, tmp_path):
    with pytest.raises(ValidationError, match=r"--control-address .* --keys DIR"):
        DaemonConfig(control_address=address, state_dir=tmp_path)
    assert DaemonConfig(control_address=address, insecure=True, state_dir=tmp_path).insecure
    keyed = DaemonConfig(control_address=address, keys=tmp_path / "keys", state_dir=tmp_path)
    assert keyed.keys == tmp_path / "keys"
