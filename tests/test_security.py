"""Keys and roles (daemon/service/auth.py, docs/security.md) with real
processes and sockets: a daemon started with --keys from `lrpilot keys init`,
clients with each kind of key, and each refusal: no key, an unknown key, a
trainer key writing another run, a viewer key calling set-lr; SIGHUP
reading allowed/ again; and a plane bound off loopback without keys."""

from __future__ import annotations

import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import (
    DaemonProcess,
    as_key,
    lrpilot,
    metric_value,
    ok,
    ok_json,
    one_line_error,
    trained,
    wait_for,
)


@pytest.fixture
def keyed(lrpilot_exe, tmp_path, monkeypatch) -> Iterator[tuple[DaemonProcess, Path]]:
    """A daemon with keys: operator and trainer (runs *) from init, a viewer,
    and a trainer limited to runs "mine-*"."""
    # No default key directory from the user's home can stand in for a key.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("LRPILOT_KEYS", raising=False)
    keys = tmp_path / "keys"
    ok(lrpilot(lrpilot_exe, "keys", "init", str(keys)))
    ok(lrpilot(lrpilot_exe, "keys", "add", str(keys), "viewer", "--role", "viewer"))
    ok(
        lrpilot(
            lrpilot_exe, "keys", "add", str(keys), "mine", "--role", "trainer", "--runs", "mine-*"
        )
    )
    daemon = DaemonProcess(
        lrpilot_exe, tmp_path / "state", tmp_path / "daemon.log", "--keys", str(keys)
    )
    try:
        yield daemon.wait_ready(), keys
    finally:
        daemon.stop()


def refused(daemon: DaemonProcess, reason: str) -> float:
    return metric_value(daemon.scrape(), "lrpilot_auth_refused_total", reason=reason) or 0.0


def test_each_key_does_what_its_role_allows_and_no_more(keyed):
    daemon, keys = keyed
    mine = trained(daemon, keys, "mine", "mine-1")
    yours = trained(daemon, keys, "mine", "yours")  # a trainer key outside its runs
    try:
        assert (mine.stats.sync_timeouts, mine.stats.daemon_errors) == (0, 0)
        assert yours.stats.daemon_errors >= 1
        runs = ok_json(as_key(daemon, keys, "viewer", "runs", "--json"))
        assert [r["run"] for r in runs] == ["mine-1"]  # nothing of "yours" reached the daemon
        done = as_key(daemon, keys, "viewer", "set-lr", "mine-1", "0.05")
        one_line_error(done, "set-lr", "forbidden", "'viewer'", "may not set_lr")
        done = as_key(daemon, keys, "trainer", "range-test", "mine-1")
        one_line_error(done, "range-test", "forbidden", "'trainer'", "may not range_test")
        changed = ok_json(as_key(daemon, keys, "operator", "set-lr", "mine-1", "0.05", "--json"))
        assert changed["actor"] == "operator"  # the key's name, not user@host
        history = ok_json(as_key(daemon, keys, "trainer", "history", "mine-1", "--json"))
        assert [e["actor"] for e in history] == ["operator"]
        assert refused(daemon, "forbidden") >= 1 and refused(daemon, "forbidden_control") == 2
    finally:
        for pilot in (mine, yours):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pilot.close()


def test_no_key_and_an_unknown_key_are_refused_in_the_handshake(keyed, lrpilot_exe, tmp_path):
    daemon, keys = keyed
    done = lrpilot(lrpilot_exe, "runs", "--control", daemon.control, "--timeout", "1")
    one_line_error(done, "runs", "no answer", "without keys")
    # A key made for this daemon but not (yet) read into its allowed keys.
    ok(lrpilot(lrpilot_exe, "keys", "add", str(keys), "stranger", "--role", "operator"))
    done = as_key(daemon, keys, "stranger", "runs", "--timeout", "1")
    one_line_error(done, "runs", "no answer", "with the keys in")
    # Keys of another daemon: the handshake cannot complete.
    other = tmp_path / "other-keys"
    ok(lrpilot(lrpilot_exe, "keys", "init", str(other)))
    stranger = trained(daemon, other, "trainer", "mine-2")
    try:
        assert stranger.stats.sync_timeouts == 1  # never answered
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stranger.close()
    wait_for(lambda: refused(daemon, "no_key") >= 1, what="the keyless handshake counted")
    wait_for(lambda: refused(daemon, "unknown_key") >= 1, what="the unknown key counted")
    assert ok_json(as_key(daemon, keys, "operator", "runs", "--json")) == []
    log = daemon.log()
    assert "refused a connection with a key not in allowed/" in log
    assert "offered no key" in log and "keys made for another daemon" in log


def test_sighup_reads_the_allowed_keys_again(keyed, lrpilot_exe):
    daemon, keys = keyed
    ok(lrpilot(lrpilot_exe, "keys", "add", str(keys), "late", "--role", "viewer"))
    done = as_key(daemon, keys, "late", "runs", "--timeout", "1")
    one_line_error(done, "runs", "no answer")  # not allowed until the daemon reads it
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: as_key(daemon, keys, "late", "runs", "--json").returncode == 0,
        what="the new key to be allowed after SIGHUP",
    )
    kept = keys.parent / "viewer-kept"  # the removed client still has its folder
    shutil.copytree(keys / "clients" / "viewer", kept)
    ok(lrpilot(lrpilot_exe, "keys", "remove", str(keys), "viewer"))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: "keys: 4 allowed client keys" in daemon.log(),
        what="the daemon to read allowed/ again without the removed key",
        detail=daemon.log,
    )
    # A key removed is refused from the next connection on; the others are not.
    done = lrpilot(
        lrpilot_exe,
        *("runs", "--control", daemon.control, "--timeout", "1", "--keys", str(kept)),
    )
    one_line_error(done, "runs", "no answer")
    assert as_key(daemon, keys, "late", "runs", "--json").returncode == 0


def test_off_loopback_needs_keys_or_insecure(lrpilot_exe, tmp_path):
    for flag, address in (
        ("--address", "tcp://0.0.0.0:0"),
        ("--control-address", "tcp://0.0.0.0:0"),
    ):
        done = lrpilot(lrpilot_exe, "daemon", flag, address, "--state-dir", str(tmp_path / "s"))
        one_line_error(done, "daemon", "reachable from other machines", "--keys DIR", "--insecure")
    keys = tmp_path / "keys"
    ok(lrpilot(lrpilot_exe, "keys", "init", str(keys)))
    daemon = DaemonProcess(
        lrpilot_exe,
        tmp_path / "state",
        tmp_path / "daemon.log",
        "--keys",
        str(keys),
        address="tcp://0.0.0.0:0",
    )
    try:
        daemon.wait_ready()  # with keys it serves off loopback
        assert "--insecure" not in daemon.log()
    finally:
        daemon.stop()
