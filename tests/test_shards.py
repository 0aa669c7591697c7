"""`lrpilot daemon --shards N` (daemon/service/front.py, sharding.py) with real
processes: the front and its shard processes, real pilots that are moved to
their run's shard, operators through the front, one /metrics for all, a
shard killed and started again, keys, and the shard count a state directory
holds. Lock-step equality and every rank at one step under shards are in
tests/test_ddp.py (its 2-shard case)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from procs import (
    DIGITS_PLATEAU,
    DaemonProcess,
    as_key,
    first_difference,
    free_address,
    free_ports,
    lrpilot,
    metric_stream,
    metric_value,
    ok,
    one_line_error,
    read_jsonl,
    simulate,
    start_digits,
    store_records,
    store_row,
    stored_records,
    train_step,
    trained,
    two_groups,
    wait_for,
)

import lrpilot as lrpilot_hook
from lrpilot.daemon.cli.control_client import ControlClientError
from lrpilot.daemon.service.front import request_targets
from lrpilot.daemon.service.schema import DB_NAME, open_readonly
from lrpilot.daemon.service.sharding import shard_of, shard_state_dir
from lrpilot.protocol import Error, GroupInfo, Hello, Moved, decode, encode
from lrpilot.transport import redirected

SHARDS = 2
STEP_POLICY = {"kind": "step", "step_size": 3, "gamma": 0.5}


def sharded(exe: str, where: Path, *flags: str, shards: int = SHARDS) -> DaemonProcess:
    base = free_ports(shards)
    daemon = DaemonProcess(
        exe,
        where / "state",
        where / "daemon.log",
        "--shards",
        str(shards),
        "--shard-base-port",
        str(base),
        *flags,
    )
    daemon.shard_base = base  # type: ignore[attr-defined]
    return daemon


@pytest.fixture
def front(lrpilot_exe, tmp_path) -> Iterator[DaemonProcess]:
    daemon = sharded(lrpilot_exe, tmp_path)
    try:
        yield daemon.wait_ready()
    finally:
        daemon.stop()


def runs_on_each_shard(count: int, shards: int = SHARDS) -> list[str]:
    """``count`` run ids, each shard serving at least one."""
    names = [f"run-{i}" for i in range(count)]
    assert {shard_of(n, shards) for n in names} == set(range(shards)), names
    return names


def shard_pids(daemon: DaemonProcess) -> dict[int, int]:
    """{shard index: pid} of the front's shard processes (named in /proc)."""
    pid = daemon.proc.pid
    found = {}
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    for child in children:
        try:
            name = Path(f"/proc/{child}/comm").read_text().strip()
        except OSError:
            continue
        if name.startswith("lrpilot-shard"):
            found[int(name[len("lrpilot-shard") :])] = child
    return found


def quietly_close(*pilots: lrpilot_hook.Pilot) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pilot in pilots:
            pilot.close()


def test_runs_are_served_by_their_shards_behind_the_front_s_addresses(front):
    runs = runs_on_each_shard(6)
    pilots, optimizers = [], []
    try:
        for run in runs:
            optimizer = two_groups()
            pilot = lrpilot_hook.attach(
                optimizer, run=run, daemon=front.address, sync=True, policy=STEP_POLICY
            )
            for _ in range(5):
                train_step(optimizer)
                pilot.step(loss=1.0)
            pilots.append(pilot)
            optimizers.append(optimizer)
        for pilot in pilots:
            assert (pilot.stats.sync_timeouts, pilot.stats.daemon_errors) == (0, 0)
        # Each run's rows are in its shard's store, and only there.
        for run in runs:
            home = shard_of(run, SHARDS)
            assert store_row(front.state_dir, run) is not None  # read where it hashes to
            assert stored_in(shard_state_dir(front.state_dir, home), run)
            assert not stored_in(shard_state_dir(front.state_dir, 1 - home), run)
            assert [r[0] for r in stored_records(front.state_dir, run, 5)] == [1, 2, 3, 4, 5]
        listed = front.cli("runs")
        assert sorted(r["run"] for r in listed) == sorted(runs)
        # The operator's change reaches a run of either shard through the front.
        for run, optimizer, pilot in zip(runs, optimizers, pilots):
            if run not in (runs_of(runs, 0)[0], runs_of(runs, 1)[0]):
                continue
            changed = front.cli("set-lr", run, "0.05", "--group", "body")
            assert changed["lrs"][0] == 0.05
            train_step(optimizer)
            pilot.step(loss=1.0)
            assert optimizer.param_groups[0]["lr"] == 0.05
            history = front.cli("history", run)
            assert [e["actor"] for e in history][-1] == changed["actor"]
        # One /metrics: every run's series with its shard, the front's own.
        text = front.scrape()
        for run in runs:
            step = metric_value(text, "lrpilot_run_step", run=run, shard=str(shard_of(run, 2)))
            assert step is not None and step >= 5, (run, step)
        assert metric_value(text, "lrpilot_shards", shard="front") == SHARDS
        assert metric_value(text, "lrpilot_hellos_moved_total", shard="front") == len(runs)
        for k in range(SHARDS):
            assert metric_value(text, "lrpilot_shard_up", shard="front", index=str(k)) == 1
        checked = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        # A run's recorded stream replays from its shard's store, through the
        # front or read directly from the state dir.
        for run in (runs_of(runs, 0)[0], runs_of(runs, 1)[0]):
            policy = json.dumps(STEP_POLICY)
            via_front = ok(
                lrpilot(front.exe, "simulate", "--from-run", run, "--policy", policy,
                        "--control", front.control)
            )  # fmt: skip
            direct = ok(
                lrpilot(front.exe, "simulate", "--from-run", run, "--policy", policy,
                        "--state-dir", str(front.state_dir))
            )  # fmt: skip
            assert via_front == direct and len(via_front.splitlines()) >= 5, via_front
        # A request that names no run's store is refused; one that does is answered.
        with pytest.raises(ControlClientError, match="each with a store"):
            front.ask({"op": "store"})
        run = runs[0]
        path = front.ask({"op": "store", "run": run})["path"]
        assert f"shard-{shard_of(run, SHARDS)}" in path
        # What the front cannot read is refused by a shard, as a daemon does.
        with pytest.raises(ControlClientError, match="op"):
            front.ask({"op": "nonsense"})
        with pytest.raises(ControlClientError, match="unknown run"):
            front.ask({"op": "show", "run": "nobody"})
    finally:
        quietly_close(*pilots)


def stored_in(store_dir: Path, run: str) -> bool:
    db = open_readonly(store_dir / DB_NAME)
    try:
        return db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run,)).fetchone() is not None
    finally:
        db.close()


def runs_of(runs: list[str], shard: int) -> list[str]:
    return [r for r in runs if shard_of(r, SHARDS) == shard]


def test_a_shard_that_dies_is_started_again_and_its_runs_lose_nothing(front):
    run = runs_on_each_shard(4)[0]
    home = shard_of(run, SHARDS)
    optimizer = two_groups()
    pilot = lrpilot_hook.attach(optimizer, run=run, daemon=front.address, policy=STEP_POLICY)
    steps = 0

    def step(n: int) -> None:
        nonlocal steps
        for _ in range(n):
            train_step(optimizer)
            steps += 1
            pilot.step(loss=1.0 / steps)
            time.sleep(0.002)

    try:
        step(50)

        def stored_while_stepping() -> bool:
            step(1)  # the hook sends from step(): a loop that waits still steps
            return len(store_records(front.state_dir, run)) >= 40

        wait_for(stored_while_stepping, 10, "40 records stored")
        front.cli("set-lr", run, "0.07", "--group", "body")
        os.kill(shard_pids(front)[home], signal.SIGKILL)
        step(100)  # while the shard is down and as it comes back: queued, then sent

        def back() -> bool:
            text = front.scrape()
            return (
                metric_value(text, "lrpilot_shard_restarts_total", index=str(home)) == 1
                and metric_value(text, "lrpilot_shard_up", index=str(home)) == 1
            )

        wait_for(back, 20, f"shard {home} started again", front.log)
        step(50)
        assert optimizer.param_groups[0]["lr"] == 0.07  # held across the restart
        quietly_close(pilot)  # sends what is queued, then says bye
        wait_for(
            lambda: len(store_records(front.state_dir, run)) >= steps,
            20,
            f"all {steps} records stored",
            front.log,
        )
        assert [r[0] for r in store_records(front.state_dir, run)] == list(range(1, steps + 1))
        history = front.cli("history", run)
        assert [e["actor"] for e in history if e["actor"] != "policy"] != []
        assert f"shard {home} stopped (exit code -9)" in front.log()
    finally:
        quietly_close(pilot)


def test_the_front_checks_keys_and_the_shard_the_key_s_role(lrpilot_exe, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("LRPILOT_KEYS", raising=False)
    keys = tmp_path / "keys"
    ok(lrpilot(lrpilot_exe, "keys", "init", str(keys)))
    ok(lrpilot(lrpilot_exe, "keys", "add", str(keys), "viewer", "--role", "viewer"))
    ok(lrpilot(lrpilot_exe, "keys", "add", str(keys), "mine", "--role", "trainer", "--runs", "m*"))
    daemon = sharded(lrpilot_exe, tmp_path, "--keys", str(keys))
    pilots = []
    try:
        daemon.wait_ready()
        pilots += [trained(daemon, keys, "mine", run) for run in ("mine", "yours")]
        mine, yours = pilots
        assert (mine.stats.sync_timeouts, mine.stats.daemon_errors) == (0, 0)
        assert yours.stats.daemon_errors >= 1  # refused at the front: never moved
        refused = metric_value(
            daemon.scrape(), "lrpilot_auth_refused_total", shard="front", reason="forbidden"
        )
        assert refused is not None and refused >= 1
        listed = ok(as_key(daemon, keys, "viewer", "runs"))
        assert "mine" in listed and "yours" not in listed
        done = as_key(daemon, keys, "viewer", "set-lr", "mine", "0.05")
        one_line_error(done, "set-lr", "forbidden", "'viewer'", "may not set_lr")
        ok(as_key(daemon, keys, "operator", "set-lr", "mine", "0.05"))
        no_key = lrpilot(lrpilot_exe, "runs", "--control", daemon.control, "--timeout", "1")
        assert no_key.returncode != 0
    finally:
        quietly_close(*pilots)
        daemon.stop()


def test_the_shard_count_is_fixed_for_a_state_directory(lrpilot_exe, tmp_path):
    daemon = sharded(lrpilot_exe, tmp_path).wait_ready()
    shards = shard_pids(daemon)
    assert sorted(shards) == [0, 1]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    for pid in shards.values():  # the front stopped its shards before it exited
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()

    def start(*flags: str, state: Path = tmp_path / "state") -> subprocess.CompletedProcess:
        return lrpilot(
            lrpilot_exe,
            "daemon",
            "--state-dir",
            str(state),
            "--address",
            free_address(),
            "--control-address",
            free_address(),
            "--metrics-addr",
            "off",
            *flags,
            timeout=60,
        )

    one_line_error(start("--shards", "3", "--shard-base-port", "30000"), "daemon", "holds 2 shards")
    one_line_error(start(), "daemon", "holds 2 shards", "--shards 2")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "lrpilot.sqlite3").write_bytes(b"")
    one_line_error(start("--shards", "2", state=plain), "daemon", "unsharded daemon")


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--shards", "2", "--address", "inproc://x"], "tcp:// or ipc://"),
        (["--shards", "2", "--address", "tcp://127.0.0.1:0"], "--shard-base-port"),
        (["--shards", "65"], "shards"),
        (["--shards", "3", "--shard-base-port", "65534"], "past 65535"),
    ],
)
def test_a_shard_layout_the_shards_cannot_bind_is_refused(lrpilot_exe, tmp_path, flags, says):
    done = lrpilot(lrpilot_exe, "daemon", "--state-dir", str(tmp_path), *flags)
    one_line_error(done, "daemon", says)


def test_a_metrics_port_in_use_is_refused_before_any_shard_starts(lrpilot_exe, tmp_path):
    """The front binds all three of its addresses before it starts a shard:
    one line naming the port, and no shard ever ran (no shard store)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"127.0.0.1:{taken.getsockname()[1]}"
        done = lrpilot(
            lrpilot_exe, "daemon", "--state-dir", str(tmp_path / "state"),
            "--address", free_address(), "--control-address", free_address(),
            "--metrics-addr", metrics, "--shards", "2", "--shard-base-port", str(free_ports(2)),
        )  # fmt: skip
    one_line_error(done, "daemon", f"cannot serve metrics on {metrics}")
    assert not list((tmp_path / "state").glob("shard-*"))


def test_shards_stop_when_their_front_is_killed(lrpilot_exe, tmp_path):
    daemon = sharded(lrpilot_exe, tmp_path).wait_ready()
    shards = shard_pids(daemon)
    daemon.proc.kill()
    daemon.proc.wait(10)

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() for pid in shards.values())

    wait_for(gone, 20, "the shards to stop after their front was killed")


def test_the_front_answers_hostile_data_messages_and_keeps_serving(front):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(front.address)
    try:
        hostile = [
            [b"not json"],
            [b"{}"],
            [b'{"v":1,"t":"hello"}'],
            [b"\xff" * 100],
            [encode(Hello(run="x", groups=[GroupInfo(name="0", lr=0.1)])), b"extra"],
            [b'{"v":1,"t":"bye","run":"x"}'],  # no answer: nothing to tell
            [b'{"v":1,"t":"persisted","run":"x","seq":1}'],  # the daemon's, not a client's
        ]
        for frames in hostile:
            sock.send_multipart(frames)
        sock.send(encode(Hello(run="x", groups=[GroupInfo(name="0", lr=0.1)])))
        answers = []
        while len(answers) < len(hostile):
            assert sock.poll(5000), answers
            answers.append(decode(sock.recv_multipart()))
        assert all(isinstance(a, Error) for a in answers[:-1]), answers
        moved = answers[-1]
        assert isinstance(moved, Moved) and moved.run == "x"
        # The port of run x's shard, on the host the pilot was given.
        home = front.shard_base + shard_of("x", SHARDS)
        assert redirected(front.address, moved.address) == f"tcp://127.0.0.1:{home}"
    finally:
        sock.close()
        ctx.term()


def test_a_moved_answer_takes_the_host_the_pilot_was_given_and_only_the_port():
    assert redirected("tcp://trainer-gw:7311", "tcp://0.0.0.0:8312") == "tcp://trainer-gw:8312"
    assert redirected("tcp://[::1]:7311", "tcp://[::]:8312") == "tcp://[::1]:8312"
    assert redirected("ipc:///run/lrpilot", "ipc:///run/lrpilot-shard-1") == (
        "ipc:///run/lrpilot-shard-1"
    )
    assert redirected("tcp://h:7311", "tcp://evil:99999") is None
    assert redirected("tcp://h:7311", "tcp://evil:port") is None


def test_a_pilot_follows_one_move_and_refuses_a_loop_of_them():
    """A stand-in daemon (real sockets) that moves the run from one port to
    the next, forever: the pilot follows, then stops following and says so."""
    ctx = zmq.Context()
    routers = []
    for _ in range(8):
        sock = ctx.socket(zmq.ROUTER)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        routers.append((sock, port))
    optimizer = two_groups()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pilot = lrpilot_hook.attach(
            optimizer, run="loop", daemon=f"tcp://127.0.0.1:{routers[0][1]}", policy=None
        )
        try:
            moves = 0
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and pilot.stats.daemon_errors == 0:
                train_step(optimizer)
                pilot.step(loss=1.0)
                for i, (sock, _) in enumerate(routers):
                    while sock.poll(0):
                        identity, frame = sock.recv_multipart()[:2]
                        if b'"hello"' in frame:
                            following = routers[(i + 1) % len(routers)][1]
                            sock.send_multipart(
                                [
                                    identity,
                                    encode(Moved(run="loop", address=f"tcp://x:{following}")),
                                ]
                            )
                            moves += 1
                time.sleep(0.005)
            assert pilot.stats.daemon_errors == 1
            assert moves == 5  # MAX_MOVES followed, the fifth refused
            assert any("move" in str(w.message) for w in caught), [str(w.message) for w in caught]
        finally:
            pilot.close()
            for sock, _ in routers:
                sock.close(linger=0)
            ctx.term()


def test_lock_step_under_shards_equals_simulate(front, digits, tmp_path, lrpilot_exe):
    """Two lock-step plateau runs of one real training, one on each shard:
    each run's LRs step by step are `lrpilot simulate`'s on its metrics."""
    runs = [runs_of(runs_on_each_shard(6), k)[0] for k in range(SHARDS)]
    base = [0.2, 0.1]
    config = {
        "address": front.address,
        "data": str(digits),
        "steps": 205,
        "summary": str(tmp_path / "summary.json"),
        "deadline_s": 90,
        "trainers": [
            {
                "run": run,
                "policy": DIGITS_PLATEAU,
                "sync": True,
                "lrs": base,
                "out": str(tmp_path / f"{run}.jsonl"),
                "report_every": 10,
            }
            for run in runs
        ],
    }
    training = start_digits(config, tmp_path)
    try:
        training.wait(120)
    finally:
        if training.poll() is None:
            training.kill()
    assert training.returncode == 0, (tmp_path / "train.out").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    for run in runs:
        steps = [line for line in read_jsonl(tmp_path / f"{run}.jsonl") if "event" not in line]
        assert [s["step"] for s in steps] == list(range(1, 206))
        want = simulate(lrpilot_exe, DIGITS_PLATEAU, metric_stream(steps), base)
        got = [s["lrs"] for s in steps]
        assert got == want, first_difference(got, want, "live", "simulate")
        assert any(lrs != base for lrs in want), "the training was meant to plateau"
        stats = summary["stats"][run]
        assert (stats["sync_timeouts"], stats["commands_late"], stats["daemon_errors"]) == (0, 0, 0)


# Derandomized, as the other fuzz tests: CI runs the same examples every time.
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.sampled_from(["op", "run", "x"]), inner, max_size=3)
            ),
            max_leaves=10,
        ).map(lambda value: json.dumps(value).encode()),
    ),
    count=st.integers(1, 64),
)
def test_any_control_request_goes_to_shards_that_exist(raw, count):
    op, targets = request_targets(raw, count)
    assert isinstance(op, str) and targets and all(0 <= k < count for k in targets)


# Derandomized, as the other fuzz tests: CI runs the same examples every time.
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(given_=st.text(max_size=60), moved=st.text(max_size=60))
def test_any_moved_address_is_a_tcp_or_ipc_address_or_refused(given_, moved):
    for address in (moved, "tcp://" + moved, "ipc://" + moved):
        target = redirected("tcp://" + given_, address)
        assert target is None or target.startswith(("tcp://", "ipc://"))


def test_a_move_to_an_address_zeromq_refuses_is_ignored_with_a_warning():
    """A hostile or broken daemon's moved answer must not raise out of
    pilot.step(): the pilot warns, counts it and stays where it is."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    optimizer = two_groups()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pilot = lrpilot_hook.attach(optimizer, run="r", daemon=f"tcp://127.0.0.1:{port}")
        try:
            train_step(optimizer)
            pilot.step(loss=1.0)
            assert sock.poll(5000)
            identity = sock.recv_multipart()[0]
            sock.send_multipart([identity, encode(Moved(run="r", address="ipc://" + "x" * 300))])
            deadline = time.monotonic() + 10
            while pilot.stats.daemon_errors == 0 and time.monotonic() < deadline:
                train_step(optimizer)
                pilot.step(loss=1.0)
                time.sleep(0.005)
            assert pilot.stats.daemon_errors == 1
            assert any("cannot connect" in str(w.message) for w in caught)
            train_step(optimizer)
            pilot.step(loss=1.0)  # still stepping, on its first link
        finally:
            pilot.close()
            sock.close(linger=0)
            ctx.term()


def test_one_daemon_per_state_directory(lrpilot_exe, tmp_path):
    """A second daemon, plain or sharded, on a state dir in use is refused,
    naming the first; a front killed with -9 and started again at once gets
    its state dir and shard ports back (its old shards let go first)."""
    first = DaemonProcess(lrpilot_exe, tmp_path / "plain", tmp_path / "plain.log").wait_ready()
    try:
        for flags in ([], ["--shards", "2", "--shard-base-port", str(free_ports(2))]):
            done = lrpilot(
                lrpilot_exe, "daemon", "--state-dir", str(tmp_path / "plain"),
                "--address", free_address(), "--control-address", free_address(),
                "--metrics-addr", "off", *flags,
            )  # fmt: skip
            one_line_error(done, "daemon", f"another lrpilot daemon (pid {first.proc.pid})")
    finally:
        first.stop()
    base = free_ports(2)
    flags = ("--shards", "2", "--shard-base-port", str(base))
    front = DaemonProcess(lrpilot_exe, tmp_path / "state", tmp_path / "a.log", *flags)
    front.wait_ready()
    optimizer = two_groups()
    pilot = lrpilot_hook.attach(optimizer, run="kept", daemon=front.address, sync=True)
    try:
        train_step(optimizer)
        pilot.step(loss=1.0)
        front.proc.kill()
        front.proc.wait(10)
        again = DaemonProcess(
            lrpilot_exe, tmp_path / "state", tmp_path / "b.log", *flags,
            address=front.address, control=front.control, metrics=front.metrics,
        )  # fmt: skip
        try:
            again.wait_ready()
            assert [r["run"] for r in again.cli("runs")] == ["kept"]
            for _ in range(3):  # the pilot finds its shard again, on the same port
                train_step(optimizer)
                pilot.step(loss=1.0)
            wait_for(lambda: again.cli("show", "kept")["step"] >= 4, 20, "the run to go on")
        finally:
            again.stop()
    finally:
        quietly_close(pilot)
