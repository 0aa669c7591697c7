"""The live loop with real processes: `lrpilot daemon` and a torch training
(tests/live/train_digits.py) each in its own process, over real sockets.

- lock-step (sync) plateau on a real training gives exactly the LRs that
  `lrpilot simulate` gives on the metrics that training recorded;
- async, each plateau cut lands at least one step after simulate's (by
  design: scheduled for k + 2, on time) and at most ASYNC_LAG after it, and
  the cuts are the same cuts;
- a step-driven schedule is exact every step in async mode, through a
  `kill -9` of the daemon and its restart; the restarted daemon takes the
  metric-driven run back and goes on deciding for it;
- bad frames from a raw ZeroMQ socket get an error and the daemon keeps
  serving; NaN and inf metrics are data (lock-step still equals simulate);
- the daemon stops cleanly on SIGTERM and refuses an address in use.

Every wait is a poll with a deadline; every process is killed on the way out.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import socket
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zmq
from procs import (
    DIGITS_PLATEAU,
    DaemonProcess,
    FakeOptimizer,
    daemon_process,
    first_difference,
    free_address,
    metric_stream,
    one_line_error,
    read_jsonl,
    simulate,
    simulate_lines,
    start_digits,
    wait_for,
)

import lrpilot
from lrpilot.protocol import (
    BatchEncoder,
    Error,
    GroupInfo,
    Hello,
    Welcome,
    decode,
    encode,
)

# An async pilot exchanges with the daemon at every report() and then at
# every step until the answer comes; the daemon schedules a decision on the
# record of step k for step k + 2 (docs/hook.md), one step after simulate's
# k + 1, and on time. A loaded machine can make it later: at most ASYNC_LAG
# steps after simulate's.
ASYNC_LAG = 3
BASE_LRS = [0.2, 0.1]  # the training's param groups: body, head
PLATEAU = DIGITS_PLATEAU
CYCLIC = {
    "kind": "cyclic",
    "base_lr": [0.01, 0.005],
    "max_lr": [0.2, 0.1],
    "step_size_up": 25,
    "step_size_down": 15,
    "mode": "triangular2",
}


# --- processes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_daemon(lrpilot_exe, tmp_path_factory) -> Iterator[DaemonProcess]:
    """One daemon for the tests that only need one to be there."""
    where = tmp_path_factory.mktemp("shared-daemon")
    with daemon_process(lrpilot_exe, where / "state", where / "daemon.log") as daemon:
        yield daemon


def trainer(run: str, policy: dict, out: Path, *, sync: bool = False, report_every: int = 0):
    spec = {"run": run, "policy": policy, "sync": sync, "lrs": BASE_LRS, "out": str(out)}
    return {**spec, "report_every": report_every}


def finish(proc: subprocess.Popen, where: Path, timeout: float = 90.0) -> dict:
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = (where / "train.out").read_text()
    assert proc.returncode == 0, f"training exited with {proc.returncode}:\n{output}"
    return json.loads((where / "summary.json").read_text())


class Recorded:
    """One trainer's output: its steps and its on_change events."""

    def __init__(self, path: Path) -> None:
        lines = read_jsonl(path)
        self.steps = [line for line in lines if "event" not in line]
        self.changes = [line for line in lines if line.get("event") == "change"]
        assert [s["step"] for s in self.steps] == list(range(1, len(self.steps) + 1))

    @property
    def lrs(self) -> list[list[float]]:
        return [s["lrs"] for s in self.steps]


def cut_steps(lrs: list[list[float]], start: list[float] = BASE_LRS) -> list[int]:
    """Steps (1-based) after which the LRs differ from the step before."""
    before = [start, *lrs]
    return [k for k in range(1, len(lrs) + 1) if lrs[k - 1] != before[k - 1]]


def differs(got: list, want: list) -> str:
    return first_difference(got, want, "live", "simulate")


# --- sync, async and step-driven on one real training ------------------------


@pytest.fixture(scope="module")
def trained(shared_daemon, digits, tmp_path_factory) -> dict:
    """Three runs trained in lock-step by one training process on the shared
    daemon: plateau in sync mode, plateau in async mode, cyclic in async mode."""
    where = tmp_path_factory.mktemp("trained")
    config = {
        "address": shared_daemon.address,
        "data": str(digits),
        # The last report is at step 300: its decision has steps left to land.
        "steps": 305,
        "summary": str(where / "summary.json"),
        "deadline_s": 90,
        "trainers": [
            trainer("sync-plateau", PLATEAU, where / "sync.jsonl", sync=True, report_every=10),
            trainer("async-plateau", PLATEAU, where / "async.jsonl", report_every=10),
            trainer("async-cyclic", CYCLIC, where / "cyclic.jsonl", report_every=10),
        ],
    }
    summary = finish(start_digits(config, where), where)
    return {
        "summary": summary,
        "sync-plateau": Recorded(where / "sync.jsonl"),
        "async-plateau": Recorded(where / "async.jsonl"),
        "async-cyclic": Recorded(where / "cyclic.jsonl"),
    }


def test_sync_plateau_on_a_real_training_equals_simulate(trained, lrpilot_exe):
    run = trained["sync-plateau"]
    stats = trained["summary"]["stats"]["sync-plateau"]
    assert len(run.steps) == 305
    want = simulate(lrpilot_exe, PLATEAU, metric_stream(run.steps), BASE_LRS)
    assert run.lrs == want, differs(run.lrs, want)
    cuts = cut_steps(want)
    assert len(cuts) >= 2, f"the training was meant to plateau at least twice, cut at {cuts}"
    assert all(s["step"] % 10 == 0 for s in run.steps if s["step"] in cuts)
    assert stats["sync_timeouts"] == 0
    assert stats["commands_applied"] == len(cuts)
    assert stats["commands_late"] == 0
    assert stats["daemon_errors"] == 0
    assert stats["records_dropped"] == 0
    assert stats["records_sent"] == 305 + 30  # steps and reports
    # on_change fires before the optimizer step that first uses the new LRs.
    assert [c["step"] for c in run.changes] == [k + 1 for k in cuts]
    assert all(c["actor"] == "policy" and "plateau" in c["reason"] for c in run.changes)


def test_async_plateau_cuts_within_the_lag_of_simulate(trained, lrpilot_exe):
    run = trained["async-plateau"]
    stats = trained["summary"]["stats"]["async-plateau"]
    assert len(run.steps) == 305
    want = simulate(lrpilot_exe, PLATEAU, metric_stream(run.steps), BASE_LRS)
    expected, got = cut_steps(want), cut_steps(run.lrs)
    assert len(expected) >= 2, f"the training was meant to plateau at least twice: {expected}"
    assert len(got) == len(expected), f"live cuts at {got}, simulate at {expected}"
    lags = [live - sim for live, sim in zip(got, expected)]
    assert all(1 <= lag <= ASYNC_LAG for lag in lags), f"lags {lags} (live {got}, sim {expected})"
    # The same cuts to the same LRs, and nothing else moves in between.
    assert [run.lrs[k - 1] for k in got] == [want[k - 1] for k in expected]
    assert [k for k, _ in itertools.groupby(run.lrs)] == [k for k, _ in itertools.groupby(want)]
    # Where each one landed, from the pilot's side.
    assert [c["step"] for c in run.changes] == [k + 1 for k in got]
    assert stats["commands_applied"] == len(expected)
    # Scheduled for k + 2: late only when it landed after that.
    assert stats["commands_late"] == sum(lag > 1 for lag in lags)
    assert stats["sync_timeouts"] == 0
    assert stats["daemon_errors"] == 0
    assert stats["records_dropped"] == 0


def test_async_cyclic_is_exact_every_step(trained, lrpilot_exe):
    run = trained["async-cyclic"]
    stats = trained["summary"]["stats"]["async-cyclic"]
    assert len(run.steps) == 305
    lines = simulate_lines(lrpilot_exe, CYCLIC, metric_stream(run.steps), BASE_LRS)
    want = [line["lrs"] for line in lines]
    assert run.lrs == want, differs(run.lrs, want)
    momenta = [s["momenta"] for s in run.steps]
    want_momenta = [line["momenta"] for line in lines]
    assert momenta == want_momenta, differs(momenta, want_momenta)
    assert len({lrs[0] for lrs in want}) > 50
    assert stats["commands_applied"] == 0  # nothing for the daemon to decide
    assert run.changes == []
    assert stats["records_dropped"] == 0


def journal(daemon: DaemonProcess, run: str) -> list[dict]:
    """The run's journal once it has every change the daemon made (the
    store's thread writes an entry a moment after the decision)."""

    def caught_up() -> list[dict] | None:
        history = daemon.cli("history", run)
        made = daemon.cli("show", run)["version"]
        return history if [e["version"] for e in history][-1:] == [made] else None

    return wait_for(caught_up, 10, f"{run}'s journal to catch up", daemon.log)


def test_the_daemon_saw_each_run(trained, shared_daemon):
    runs = ("sync-plateau", "async-plateau", "async-cyclic")

    # A pilot's bye is sent without waiting for an answer: the training may
    # be gone before the daemon has taken it.
    def all_said_bye() -> dict | None:
        seen = {r["run"]: r for r in shared_daemon.cli("runs") if r["run"] in runs}
        ended = all(seen.get(run, {}).get("status") == "ended" for run in runs)
        return seen if ended else None

    seen = wait_for(all_said_bye, 10, "a bye from each run", shared_daemon.log)
    for run in runs:
        # One rank of one (the hello), there until the last step (the bye).
        assert (seen[run]["world_size"], seen[run]["step"]) == (1, 305), seen[run]
    for run in ("sync-plateau", "async-plateau"):
        history = journal(shared_daemon, run)
        assert len(history) == trained["summary"]["stats"][run]["commands_applied"]
        assert [e["version"] for e in history] == list(range(1, len(history) + 1))
        assert {e["actor"] for e in history} == {"policy"}
    # In lock-step each decision takes effect right after its record.
    sync_steps = [e["effective_step"] for e in journal(shared_daemon, "sync-plateau")]
    assert sync_steps == [c["step"] for c in trained["sync-plateau"].changes]


# --- a daemon killed mid-run, and another started on its address ------------


def test_daemon_killed_and_restarted_mid_run(lrpilot_exe, digits, tmp_path):
    first = DaemonProcess(lrpilot_exe, tmp_path / "state", tmp_path / "first.log")
    address = first.address
    cyclic_out, plateau_out = tmp_path / "cyclic.jsonl", tmp_path / "plateau.jsonl"
    paused, go = tmp_path / "paused.json", tmp_path / "go"
    pause_at = 250
    config = {
        "address": address,
        "data": str(digits),
        "steps": 6000,  # an upper bound: it stops 20 steps after the restart's cut
        "summary": str(tmp_path / "summary.json"),
        "deadline_s": 90,
        "pause_at": pause_at,
        "paused_file": str(paused),
        "go_file": str(go),
        "until_applied": "restart-plateau",
        "extra_steps": 20,
        "trainers": [
            trainer("restart-cyclic", CYCLIC, cyclic_out, report_every=10),
            trainer("restart-plateau", PLATEAU, plateau_out, report_every=10),
        ],
    }
    second = None
    training = None
    try:
        first.wait_ready()
        training = start_digits(config, tmp_path)

        # Kill the daemon while the training runs, once it has cut the
        # plateau run's LR at least once.
        def first_cut_applied() -> bool:
            assert training.poll() is None, (tmp_path / "train.out").read_text()
            steps = read_jsonl(plateau_out)
            return any(s.get("applied", 0) >= 1 for s in steps[-5:])

        wait_for(first_cut_applied, 60, "the first daemon's first plateau cut")
        # What the first daemon had decided, as late as it can be asked (in
        # this process: a `lrpilot` would take steps): its journal, and its
        # last decision, which the store may not have yet.
        asked = {"run": "restart-plateau"}
        journaled = wait_for(
            lambda: first.ask({"op": "history", **asked})["history"],
            10,
            "the first cut in the first daemon's journal",
            first.log,
        )
        last_decided = first.ask({"op": "show", **asked})["run"]["last_change"]
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(10) == -signal.SIGKILL
        killed_at = len(read_jsonl(cyclic_out))
        assert killed_at < pause_at
        assert journaled[0]["version"] == 1 and journaled[0]["actor"] == "policy", journaled
        # The training goes on alone up to the pause; then a new daemon on
        # the same address, and the training goes on.
        wait_for(
            lambda: paused.exists() or training.poll() is not None,
            60,
            f"the training to reach step {pause_at} without a daemon",
        )
        assert training.poll() is None, (tmp_path / "train.out").read_text()
        at_pause = json.loads(paused.read_text())
        # The same addresses and store: what a restart is.
        second = DaemonProcess(
            lrpilot_exe,
            tmp_path / "state",
            tmp_path / "second.log",
            address=address,
            control=first.control,
        )
        second.wait_ready()
        # The version it restored from the store: those after it are its own.
        restored = second.ask({"op": "show", "run": "restart-plateau"})["run"]["version"]
        go.write_text("go")
        summary = finish(training, tmp_path)
        steps = summary["steps"]

        # The new daemon took both runs back from where the pilots were (its
        # store had them as of the kill) and followed them to their last step.
        for run in ("restart-cyclic", "restart-plateau"):

            def said_bye(run: str = run) -> dict | None:
                shown = second.cli("show", run)
                return shown if (shown["status"], shown["step"]) == ("ended", steps) else None

            wait_for(
                said_bye,
                10,
                f"{run} to end at step {steps} on the new daemon",
                lambda run=run: f"{second.cli('show', run)}\n--- daemon log\n{second.log()}",
            )
        history = journal(second, "restart-plateau")
    finally:
        if training is not None and training.poll() is None:
            training.kill()
            training.wait(10)
        first.stop()
        if second is not None:
            second.stop()

    # The step-driven schedule never noticed: exact every step, before the
    # kill, without a daemon, and after the restart.
    cyclic = Recorded(cyclic_out)
    assert len(cyclic.steps) == steps > pause_at
    lines = simulate_lines(lrpilot_exe, CYCLIC, metric_stream(cyclic.steps), BASE_LRS)
    want = [line["lrs"] for line in lines]
    assert cyclic.lrs == want, differs(cyclic.lrs, want)
    assert [s["momenta"] for s in cyclic.steps] == [line["momenta"] for line in lines]
    for run in ("restart-cyclic", "restart-plateau"):
        assert summary["stats"][run]["records_dropped"] == 0

    # The new daemon went on deciding for the plateau run. It resumed from its store
    # as of its last tick before the kill, so it may decide again what the
    # first daemon had decided from records that were not yet persisted (the
    # client sends those again): the same version, step and LRs, which the
    # client already has. Then new cuts, numbered on.
    plateau = Recorded(plateau_out)
    before = at_pause["stats"]["restart-plateau"]["commands_applied"]
    assert before >= 1
    after = summary["stats"]["restart-plateau"]["commands_applied"]
    assert after > before

    commands = [(e["version"], e["effective_step"], e["new_lrs"]) for e in history]
    commands = [c for c in commands if c[0] > restored]
    earlier = {e["version"]: [e["effective_step"], e["new_lrs"]] for e in journaled}
    earlier[last_decided["version"]] = [last_decided["step"], last_decided["lrs"]]
    assert commands, history
    versions = [v for v, _, _ in commands]
    assert versions == list(range(versions[0], versions[0] + len(versions)))
    assert versions[0] <= before + 1 <= versions[-1]
    assert all(earlier[v] == [step, lrs] for v, step, lrs in commands if v in earlier)
    # Every version applied once, in order (one made in the last few steps
    # may not have landed yet).
    due = [v for v, step, _ in commands if step <= summary["steps"] - ASYNC_LAG]
    assert due[-1] <= after <= versions[-1]
    assert [c for c in plateau.changes if c["step"] > pause_at]
    assert sorted({c["step"] for c in plateau.changes}) == [k + 1 for k in cut_steps(plateau.lrs)]
    # The pilot ends on the new daemon's last decision (one that came in the
    # last few steps may not have landed yet).
    landed = [lrs for _, step, lrs in commands if step <= steps - ASYNC_LAG]
    late = [lrs for _, step, lrs in commands if step > steps - ASYNC_LAG]
    assert plateau.lrs[-1] in [landed[-1], *late]


# --- bad input ---------------------------------------------------------------


@contextmanager
def raw_dealer(address: str) -> Iterator[zmq.Socket]:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close()
        context.term()


def ask(sock: zmq.Socket, frames: list[bytes], timeout: float = 10.0):
    sock.send_multipart(frames)
    assert sock.poll(int(timeout * 1000), zmq.POLLIN), f"no reply to {frames[0][:60]!r}"
    return decode(sock.recv_multipart())


def hello_frame(run: str) -> bytes:
    return encode(Hello(run=run, groups=[GroupInfo(name="0", lr=0.1)]))


GARBAGE = {
    "garbage-bytes": [b"\x00\xff\xfe\x13garbage"],
    "empty-frame": [b""],
    "bad-json": [b'{"v": 1, "t": "hello", "run": '],
    "json-not-object": [b"[1, 2, 3]"],
    "unknown-type": [b'{"v": 1, "t": "launch_missiles", "run": "x"}'],
    "wrong-version": [json.dumps({"v": 9, "t": "bye", "run": "x"}).encode()],
    "hello-missing-groups": [b'{"v": 1, "t": "hello", "run": "x"}'],
    "control-with-two-frames": [hello_frame("x"), b"extra"],
    "metrics-one-frame": [BatchEncoder("x", 0).encode([(1, 1, "s", {"loss": 1.0})], {})[0]],
}


def test_malformed_frames_get_an_error_and_the_daemon_keeps_serving(shared_daemon):
    with raw_dealer(shared_daemon.address) as sock:
        for name, frames in GARBAGE.items():
            reply = ask(sock, frames)
            assert isinstance(reply, Error), name
            assert reply.code == "malformed", (name, reply)
            assert reply.message, name
        # A batch whose body does not match its header, from a session the
        # daemon knows.
        assert isinstance(ask(sock, [hello_frame("raw-client")]), Welcome)
        header, body = BatchEncoder("raw-client", 0).encode(
            [(1, 1, "s", {"loss": 1.0}), (2, 2, "s", {"loss": 0.5})], {}
        )
        reply = ask(sock, [header, body[:-3]])
        assert isinstance(reply, Error)
        assert reply.code == "malformed"
        assert "body is 29 bytes, the header describes 32" in reply.message
        # A message over the size limit.
        reply = ask(sock, [b"{" + b" " * (4 << 20)])
        assert isinstance(reply, Error)
        assert reply.code == "oversized"
        # The same socket still gets served.
        assert isinstance(ask(sock, [hello_frame("raw-client")]), Welcome)
    assert shared_daemon.proc.poll() is None
    # And a normal client still gets its plateau cut, in lock-step.
    params = [{"params": [], "lr": 0.1}]
    with lrpilot.attach(
        FakeOptimizer(params),
        run="after-garbage",
        policy={"kind": "plateau", "metric": "loss", "patience": 0, "factor": 0.5},
        daemon=shared_daemon.address,
        sync=True,
        sync_timeout=10.0,
    ) as pilot:
        pilot.step(loss=1.0)
        assert params[0]["lr"] == 0.1
        pilot.step(loss=2.0)
        assert params[0]["lr"] == 0.05
        assert pilot.stats.sync_timeouts == 0
        assert pilot.stats.daemon_errors == 0


def test_malformed_batch_before_hello_is_malformed(shared_daemon):
    with raw_dealer(shared_daemon.address) as sock:
        header, body = BatchEncoder("never-said-hello", 0).encode([(1, 1, "s", {"loss": 1.0})], {})
        reply = ask(sock, [header, body[:-1]])
        assert isinstance(reply, Error)
        assert reply.code == "malformed"


def test_a_nan_or_inf_loss_is_data_and_lock_step_equals_simulate(shared_daemon, lrpilot_exe):
    """A diverged loss is a training event, not a bad message: the daemon
    takes it (plateau counts it as no improvement, as torch does), answers no
    error, and the lock-step LRs equal simulate's on the same stream."""
    spec = {"kind": "plateau", "metric": "loss", "patience": 1, "factor": 0.5}
    losses = [1.0, 0.9, math.nan, 0.95, 0.97, math.inf, 0.99, 0.5, 0.6, 0.7, 0.8]
    params = [{"params": [], "lr": 0.1}, {"params": [], "lr": 0.02}]
    got = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lrpilot.attach(
            FakeOptimizer(params),
            run="nan-run",
            policy=spec,
            daemon=shared_daemon.address,
            sync=True,
            sync_timeout=10.0,
        ) as pilot:
            for loss in losses:
                pilot.step(loss=loss)
                got.append([g["lr"] for g in params])
            stats = pilot.stats
    assert stats.daemon_errors == 0 and stats.sync_timeouts == 0
    assert pilot.step_count == len(losses)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    stream = "".join(
        json.dumps({"step": i, "metrics": {"loss": v}}) + "\n"
        for i, v in enumerate(losses, start=1)
    )
    want = simulate(lrpilot_exe, spec, stream, [0.1, 0.02])
    assert got == want
    assert len(cut_steps(want, [0.1, 0.02])) >= 2
    # The daemon kept it as the run's last value (shown and exported).
    assert shared_daemon.cli("show", "nan-run")["last_metrics"]["loss"] == 0.8


WARMUP_PLATEAU = {
    "kind": "sequential",
    "policies": [
        {"kind": "linear", "start_factor": 0.5, "total_iters": 4},
        {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5},
    ],
    "milestones": [4],
}


def test_sync_warmup_then_plateau_equals_simulate_with_a_report_at_the_milestone(
    shared_daemon, lrpilot_exe
):
    params = [{"params": [], "lr": 0.1}]
    val = {4: 1.0, 5: 2.0, 6: 3.0}
    got = []
    with lrpilot.attach(
        FakeOptimizer(params),
        run="milestone-report",
        policy=WARMUP_PLATEAU,
        daemon=shared_daemon.address,
        sync=True,
        sync_timeout=10.0,
    ) as pilot:
        for k in range(1, 7):
            pilot.step(loss=1.0)
            if k in val:
                pilot.report(val_loss=val[k])
            got.append([params[0]["lr"]])
        assert pilot.stats.sync_timeouts == 0
    stream = "".join(
        json.dumps(
            {"step": k, "metrics": {"loss": 1.0, **({"val_loss": val[k]} if k in val else {})}}
        )
        + "\n"
        for k in range(1, 7)
    )
    want = simulate(lrpilot_exe, WARMUP_PLATEAU, stream, [0.1])
    assert got == want


# --- the daemon process itself -----------------------------------------------


def test_sigterm_stops_the_daemon_with_status_0(running_daemon):
    daemon = running_daemon
    # A client is attached when it stops.
    with raw_dealer(daemon.address) as sock:
        assert isinstance(ask(sock, [hello_frame("sigterm-run")]), Welcome)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0, daemon.log()
    # What the user is told: that it stopped, and no traceback.
    assert "lrpilot daemon stopped" in daemon.log()
    assert "Traceback" not in daemon.log()


def test_sigint_stops_the_daemon_with_status_0(running_daemon):
    running_daemon.proc.send_signal(signal.SIGINT)
    assert running_daemon.proc.wait(10) == 0, running_daemon.log()
    assert "Traceback" not in running_daemon.log()


def test_daemon_on_an_address_in_use_exits_1_with_one_line(lrpilot_exe, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run(
            [
                lrpilot_exe,
                "daemon",
                "--address",
                address,
                "--control-address",
                free_address(),
                "--state-dir",
                str(tmp_path / "state"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    line = one_line_error(done, "daemon", address)
    assert "in use" in line.lower()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--address", "localhost:7311"], "address"),
        (["--address", "tcp://127.0.0.1:1", "--log-level", "loud"], "log_level"),
        (["--address", "tcp://127.0.0.1:1", "--silence-timeout", "-1"], "silence_timeout"),
    ],
)
def test_daemon_with_a_bad_option_exits_1_with_one_line(lrpilot_exe, flags, says, tmp_path):
    own = ["--control-address", free_address(), "--state-dir", str(tmp_path / "state")]
    done = subprocess.run(
        [lrpilot_exe, "daemon", *own, *flags], capture_output=True, text=True, timeout=30
    )
    one_line_error(done, "daemon", says)
