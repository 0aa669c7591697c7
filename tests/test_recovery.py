"""A daemon that dies, and a training that restarts from a checkpoint, with
real processes and the real store (tests/live/train_stream.py: the same seed
gives the same metric stream in every process, so an uninterrupted run of
the same training, on a daemon nobody kills, is the reference).

- `kill -9` of the daemon mid-run, restarted on the same addresses and state
  dir: runs, policy state (plateau best and counters), an operator's hold
  and the journal are as they were; the clients come back by themselves; the
  LR sequence is the reference's and `lrpilot simulate`'s on the stream; the
  store holds that stream once.
- SIGTERM: the store has everything (the clean shutdown flushes).
- resume from a checkpoint (`pilot.state_dict()` at step m, a new process,
  same run id): the LRs from m on are the uninterrupted run's, with the
  daemon kept running or restarted in between.
- in-process, at an exact moment (a DataPlane on a store closed without its
  last tick is a daemon killed right then): what must already be on disk.

Every wait is a poll with a deadline; every process is killed on the way out.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from procs import (
    STREAM_PLATEAU,
    DaemonProcess,
    Training,
    lrpilot,
    metric_stream,
    ok,
    read_steps,
    settled_history,
    simulate,
    store_row,
    stream_trainer,
    wait_for,
)

from lrpilot.daemon.service.config import DaemonConfig
from lrpilot.daemon.service.control import ControlPlane
from lrpilot.daemon.service.dataplane import DataPlane
from lrpilot.policies import parse_policy
from lrpilot.protocol import (
    REPORT,
    STEP,
    BatchEncoder,
    GroupInfo,
    Hello,
    LRCommand,
    decode,
    encode,
)

PLATEAU = STREAM_PLATEAU  # stream_trainer's
BASE_LRS = [0.1, 0.05]  # stream_trainer's
REPORT_EVERY = 5
SEED = 11
# What `show --json` says about a run's state (the rest is about its
# connections: sessions, status, rates, the loss sampled for `top`).
STATE_KEYS = (
    "run",
    "step",
    "groups",
    "lrs",
    "held",
    "policy",
    "requested_policy",
    "policy_base_lrs",
    "policy_state",
    "base_lrs",
    "version",
    "world_size",
    "created",
)


def config(steps: int, trainers: list[dict], gates: list[int] = ()) -> dict:
    return {
        "steps": steps,
        "report_every": REPORT_EVERY,
        "seed": SEED,
        "gates": list(gates),
        "deadline_s": 60,
        "trainers": trainers,
    }


def state_of(daemon: DaemonProcess, run: str) -> tuple[dict, list[dict]]:
    shown = daemon.cli("show", run)
    return {k: shown[k] for k in STATE_KEYS}, daemon.cli("history", run)


def run_ids(daemon: DaemonProcess) -> list[str]:
    """The runs the daemon has (a restarted one: those it restored)."""
    return sorted(r["run"] for r in daemon.cli("runs"))


def committed(daemon: DaemonProcess, run: str, step: int) -> bool:
    """The run's state as of `step` is in the store (read from the file)."""
    row = store_row(daemon.state_dir, run)
    return row is not None and row["step"] == step


def journal_all_applied(daemon: DaemonProcess) -> bool:
    db = sqlite3.connect(f"file:{daemon.state_dir / 'lrpilot.sqlite3'}?mode=ro", uri=True)
    try:
        return (
            db.execute("SELECT count(*) FROM journal WHERE applied_step IS NULL").fetchone()[0] == 0
        )
    finally:
        db.close()


def lrs_after(lines: list[dict]) -> list[list[float]]:
    return [line["lrs"] for line in lines]


def decisions(history: list[dict]) -> list[tuple]:
    """A journal without who and when: what changed, from which step."""
    return [
        (e["version"], e["effective_step"], e["applied_step"], e["old_lrs"], e["new_lrs"])
        for e in history
    ]


def from_run(exe: str, run: str, state_dir: Path) -> list[list[float]]:
    """`lrpilot simulate --from-run` with the run's own policy, read from the store."""
    done = lrpilot(
        exe,
        "simulate",
        "--from-run",
        run,
        "--policy",
        json.dumps(PLATEAU),
        "--state-dir",
        str(state_dir),
    )
    return [json.loads(line)["lrs"] for line in ok(done).splitlines()]


# --- kill -9 -------------------------------------------------------------------


def test_kill_9_and_restart_loses_nothing(lrpilot_exe, tmp_path, processes):
    """Three trainers in one process: `crash` and `held` on the daemon that is
    killed at step 100 (`held` under an operator's set-lr since step 62),
    `reference` on a daemon nobody kills."""
    reference_daemon = DaemonProcess(lrpilot_exe, tmp_path / "ref-state", tmp_path / "ref.log")
    doomed = DaemonProcess(lrpilot_exe, tmp_path / "state", tmp_path / "first.log")
    processes += [reference_daemon, doomed]
    reference_daemon.wait_ready()
    doomed.wait_ready()
    outs = {name: tmp_path / f"{name}.jsonl" for name in ("crash", "held", "reference")}
    # A short sync_timeout: see test_the_sync_wait_covers_a_restart below.
    trainers = [
        stream_trainer("crash", doomed.address, outs["crash"], sync_timeout=2.0),
        stream_trainer("held", doomed.address, outs["held"], sync_timeout=2.0),
        stream_trainer("reference", reference_daemon.address, outs["reference"]),
    ]
    training = Training(tmp_path, config(200, trainers, gates=[60, 100]))
    processes.append(training)

    training.at(60)
    hold = doomed.cli("set-lr", "held", "0.01")
    assert hold["effective_step"] == 62
    training.go(60)
    training.at(100)
    # Everything up to step 100 in the store, acks included: then the state
    # before and after the restart must be the same.
    wait_for(
        lambda: (
            committed(doomed, "crash", 100)
            and committed(doomed, "held", 100)
            and journal_all_applied(doomed)
        ),
        10,
        "the store to commit step 100",
    )
    before = {run: state_of(doomed, run) for run in ("crash", "held")}
    assert before["held"][0]["held"] is True
    # A plateau that has seen values: its best and its counter are state to keep.
    assert before["crash"][0]["policy_state"]["best"] < 10
    assert len(before["crash"][1]) >= 2, "the run was meant to cut its LR twice by step 100"

    doomed.kill9()
    # The same addresses and state dir, before the training goes on (the
    # training's next step then waits for it: deterministic).
    restarted = doomed.restart(lrpilot_exe, tmp_path / "second.log")
    processes.append(restarted)
    assert run_ids(restarted) == ["crash", "held"]
    after = {run: state_of(restarted, run) for run in ("crash", "held")}
    assert after == before
    training.go(100)
    summary = training.finish()

    crash, held, reference = (read_steps(outs[name]) for name in ("crash", "held", "reference"))
    assert [line["step"] for line in crash] == list(range(1, 201))
    # The crash changed nothing: the reference's LRs, step for step, and
    # simulate's on the stream; the restarted daemon decided on after 100.
    want = simulate(lrpilot_exe, PLATEAU, metric_stream(crash), BASE_LRS)
    assert lrs_after(reference) == want
    assert lrs_after(crash) == want
    journal = settled_history(lambda: restarted.cli("history", "crash"), 200)
    assert decisions(journal) == decisions(
        settled_history(lambda: reference_daemon.cli("history", "reference"), 200)
    )
    assert [e for e in journal if e["effective_step"] > 101], "no decision after the restart"
    # The client came back by itself: the restarted daemon has the run to its end.
    shown = restarted.cli("show", "crash")
    assert (shown["step"], shown["world_size"]) == (200, 1), shown
    # The hold went on through the restart: no decision of the policy got
    # through, the LRs stayed where the operator put them.
    assert {tuple(line["used"]) for line in held[61:]} == {(0.01, 0.01)}
    assert decisions(restarted.cli("history", "held")) == decisions(before["held"][1])
    # The store has the stream once: the records the daemon got before the
    # kill, and those the client sent again after it, without repeats.
    assert from_run(lrpilot_exe, "crash", restarted.state_dir) == want
    for name in ("crash", "held"):
        assert summary["stats"][name]["records_dropped"] == 0
        assert summary["stats"][name]["daemon_errors"] == 0


def test_the_sync_wait_covers_a_restart(lrpilot_exe, tmp_path, processes):
    """kill -9 while a lock-step training runs; a daemon restarted within the
    sync timeout (20 s) takes the run back at once, and the LRs are those of
    the run without the crash."""
    reference_daemon = DaemonProcess(lrpilot_exe, tmp_path / "ref-state", tmp_path / "ref.log")
    doomed = DaemonProcess(lrpilot_exe, tmp_path / "state", tmp_path / "first.log")
    processes += [reference_daemon, doomed]
    reference_daemon.wait_ready()
    doomed.wait_ready()
    crash_out, reference_out = tmp_path / "crash.jsonl", tmp_path / "reference.jsonl"
    trainers = [
        stream_trainer("crash", doomed.address, crash_out, sync_timeout=20.0),
        stream_trainer("reference", reference_daemon.address, reference_out),
    ]
    training = Training(tmp_path, {**config(1500, trainers), "step_sleep": 0.002})
    processes.append(training)
    wait_for(lambda: crash_out.exists() and len(read_steps(crash_out)) >= 100, 30, "step 100")
    doomed.kill9()
    restarted = doomed.restart(lrpilot_exe, tmp_path / "second.log")
    processes.append(restarted)
    at_restart = len(read_steps(crash_out))
    wait_for(
        lambda: len(read_steps(crash_out)) > at_restart + 10,
        5,
        "the training to go on with the restarted daemon",
    )
    summary = training.finish()
    assert summary["stats"]["crash"]["sync_timeouts"] == 0
    crash, reference = read_steps(crash_out), read_steps(reference_out)
    want = simulate(lrpilot_exe, PLATEAU, metric_stream(crash), BASE_LRS)
    assert lrs_after(crash) == lrs_after(reference) == want
    last = len(crash)
    assert decisions(settled_history(lambda: restarted.cli("history", "crash"), last)) == decisions(
        settled_history(lambda: reference_daemon.cli("history", "reference"), last)
    )


# --- SIGTERM -------------------------------------------------------------------


def test_sigterm_flushes_the_store(lrpilot_exe, tmp_path, processes):
    daemon = DaemonProcess(lrpilot_exe, tmp_path / "state", tmp_path / "first.log")
    processes.append(daemon)
    daemon.wait_ready()
    out = tmp_path / "run.jsonl"
    # Stopped the moment the training ends: its last records, acks and run
    # state are at most in the tick that has not come yet.
    training = Training(tmp_path, config(120, [stream_trainer("term", daemon.address, out)]))
    processes.append(training)
    summary = training.finish()
    assert daemon.terminate() == 0
    assert "lrpilot daemon stopped" in daemon.log()
    lines = read_steps(out)
    assert summary["stats"]["term"]["records_dropped"] == 0

    # Straight from the file, no daemon: every record, once.
    stream_lrs = simulate(lrpilot_exe, PLATEAU, metric_stream(lines), BASE_LRS)
    assert from_run(lrpilot_exe, "term", daemon.state_dir) == stream_lrs
    again = daemon.restart(lrpilot_exe, tmp_path / "second.log")
    processes.append(again)
    assert run_ids(again) == ["term"]
    shown = again.cli("show", "term")
    assert (shown["step"], shown["status"]) == (120, "ended")
    assert shown["policy_state"]["lrs"] == shown["lrs"] == stream_lrs[-1]
    history = again.cli("history", "term")
    assert len(history) == shown["version"] == summary["stats"]["term"]["commands_applied"] >= 2
    # Each ack reached the journal before the daemon stopped.
    assert all(e["applied_step"] is not None for e in history)


# --- resume from a checkpoint ------------------------------------------------


def checkpointed(lrpilot_exe, tmp_path, processes, restart: bool) -> None:
    """`ckpt` and `straight` train 150 steps in one process; `ckpt` saves its
    pilot's state at step 60. A second process loads it (run `ckpt`) and
    trains 61..150 again, on the same stream."""
    daemon = DaemonProcess(lrpilot_exe, tmp_path / "state", tmp_path / "first.log")
    processes.append(daemon)
    daemon.wait_ready()
    saved = tmp_path / "ckpt.json"
    saving = {"save_at": 60, "save_to": str(saved)}
    trainers = [
        stream_trainer("ckpt", daemon.address, tmp_path / "ckpt-1.jsonl", **saving),
        stream_trainer("straight", daemon.address, tmp_path / "straight.jsonl"),
    ]
    first = Training(tmp_path, config(150, trainers), name="first")
    processes.append(first)
    first.finish()
    if restart:
        assert daemon.terminate() == 0
        daemon = daemon.restart(lrpilot_exe, tmp_path / "second.log")
        processes.append(daemon)
    assert json.loads(saved.read_text())["step"] == 60
    loading = {"load_from": str(saved)}
    resumed = stream_trainer("ckpt", daemon.address, tmp_path / "ckpt-2.jsonl", **loading)
    second = Training(tmp_path, config(150, [resumed]), name="second")
    processes.append(second)
    summary = second.finish()
    assert summary["first"] == 61

    straight = read_steps(tmp_path / "straight.jsonl")
    resumed = read_steps(tmp_path / "ckpt-2.jsonl")
    assert [line["step"] for line in resumed] == list(range(61, 151))
    want = simulate(lrpilot_exe, PLATEAU, metric_stream(straight), BASE_LRS)
    assert lrs_after(straight) == want
    assert len({tuple(lrs) for lrs in want[60:]}) > 1, "the policy was meant to cut after 60"
    assert [line["used"] for line in resumed] == [line["used"] for line in straight[60:]]
    assert lrs_after(resumed) == want[60:]
    # The daemon's recorded stream is the resumed timeline's, once.
    assert from_run(lrpilot_exe, "ckpt", daemon.state_dir) == want


def test_resume_from_a_checkpoint_with_the_daemon_running(lrpilot_exe, tmp_path, processes):
    checkpointed(lrpilot_exe, tmp_path, processes, restart=False)


def test_resume_from_a_checkpoint_with_the_daemon_restarted(lrpilot_exe, tmp_path, processes):
    checkpointed(lrpilot_exe, tmp_path, processes, restart=True)


# --- in-process: a daemon killed at an exact moment --------------------------


def hello(run: str, step: int = 0, applied_version: int = 0) -> list[bytes]:
    return [
        encode(
            Hello(
                run=run,
                groups=[GroupInfo(name="0", lr=0.1)],
                policy={"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5},
                step=step,
                sync=True,
                applied_version=applied_version,
            )
        )
    ]


def killed(plane: DataPlane) -> None:
    """What `kill -9` leaves: the store without whatever the next tick had."""
    plane.store.close()


def test_an_operator_change_is_on_disk_before_it_is_sent(tmp_path):
    config = DaemonConfig(state_dir=tmp_path / "state")
    plane = DataPlane(config)
    plane.handle(b"me", hello("op"), time.monotonic())
    plane.flush()
    answer, outgoing = ControlPlane(plane).handle(
        json.dumps({"op": "set_lr", "run": "op", "lr": 0.01}).encode()
    )
    assert answer["ok"] and outgoing  # the hold is on its way to the client
    killed(plane)
    again = DataPlane(config)
    try:
        assert [e["hold"] for e in again.store.history("op")] == [1]
        engine = again.registry.runs["op"].engine
        assert (engine.held, engine.version) == ([0.01], 1)
    finally:
        again.close()


def test_a_decision_made_again_after_a_kill_is_journaled_once(tmp_path):
    config = DaemonConfig(state_dir=tmp_path / "state")
    encoder = BatchEncoder("dec", 0)
    batch = encoder.encode(
        [
            (1, 1, STEP, {"loss": 1.0}),
            (2, 1, REPORT, {"val_loss": 1.0}),
            (3, 2, STEP, {"loss": 1.0}),
            (4, 2, REPORT, {"val_loss": 2.0}),
        ],
        {},
    )
    plane = DataPlane(config)
    plane.handle(b"me", hello("dec"), time.monotonic())
    plane.flush()
    out = plane.handle(b"me", batch, time.monotonic())
    assert any(b'"command"' in frames[0] for _, frames in out)  # the cut, sent
    killed(plane)
    again = DataPlane(config)
    try:
        # The client was told nothing was persisted: hello, then the records again.
        again.handle(b"me", hello("dec", step=2, applied_version=1), time.monotonic())
        again.handle(b"me", batch, time.monotonic())
        assert [e["version"] for e in again.store.history("dec")] == [1]
    finally:
        again.close()


def plateau_records(steps: range, first_seq: int) -> list[tuple[int, int, str, dict]]:
    """Steps with a val_loss report every 5 that stalls now and then."""
    out, seq = [], first_seq
    for k in steps:
        out.append((seq, k, STEP, {"loss": 1.0 / k}))
        seq += 1
        if k % 5 == 0:
            out.append((seq, k, REPORT, {"val_loss": 1.0 + (k // 5) % 3 - k / 1000}))
            seq += 1
    return out


def rewound(tmp_path: Path) -> tuple[DataPlane, list[LRCommand], list[LRCommand], dict]:
    """Client A trains 1..150 (timeline A); client B comes back from a
    checkpoint at step 60 with the policy's state then, and trains 61..150
    on other metrics (timeline B)."""
    spec = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}
    plane = DataPlane(DaemonConfig(state_dir=tmp_path / "state"))
    encoder = BatchEncoder("rw", 0)

    def say_hello(identity: bytes, step: int, state: dict | None) -> None:
        message = Hello(
            run="rw",
            groups=[GroupInfo(name="0", lr=0.1)],
            policy=spec,
            policy_state=state,
            step=step,
            sync=True,
        )
        plane.handle(identity, [encode(message)], time.monotonic())

    def send(identity: bytes, records: list) -> list[LRCommand]:
        got = []
        for i in range(0, len(records), 16):  # batches, a tick now and then
            out = plane.handle(identity, encoder.encode(records[i : i + 16], {}), time.monotonic())
            got += [m for _, frames in out if isinstance(m := decode(frames), LRCommand)]
            plane.tick(time.monotonic())
        return got

    say_hello(b"A", 0, None)
    a = plateau_records(range(1, 151), 1)
    timeline_a = send(b"A", a)
    reference = parse_policy(spec).build([0.1])
    for _, k, kind, metrics in a:
        if k > 60:
            break
        reference.step(metrics) if kind == STEP else reference.observe(metrics)
    state = reference.state_dict()
    say_hello(b"B", 60, state)
    engine = plane.registry.runs["rw"].engine
    at_60 = {"step": engine.step, "state": engine.policy.state_dict()}
    b = [(seq, k, kind, {n: v + 0.5 for n, v in m.items()}) for seq, k, kind, m in a if k > 60]
    timeline_b = send(b"B", [(i, k, kind, m) for i, (_, k, kind, m) in enumerate(b, start=1)])
    want_b = []
    for _, k, kind, metrics in b:
        before = reference.lrs
        reference.step(metrics) if kind == STEP else reference.observe(metrics)
        if reference.lrs != before:
            want_b.append((k, reference.lrs))
    stream = [(k, m) for _, k, kind, m in a if kind == REPORT and k <= 60]
    stream += [(k, m) for _, k, kind, m in b if kind == REPORT]
    facts = {"at_60": at_60, "state": state, "want_b": want_b, "reports": stream}
    return plane, timeline_a, timeline_b, facts


def test_a_client_back_at_an_earlier_step_gets_the_state_rebuilt_there(tmp_path):
    plane, timeline_a, timeline_b, facts = rewound(tmp_path)
    try:
        assert [c.state_step for c in timeline_a if c.state_step > 60], "A cut after 60"
        assert facts["at_60"] == {"step": 60, "state": facts["state"]}
        # Timeline B's decisions are the policy's on B's metrics, from 60's state.
        assert [(c.state_step, c.lrs) for c in timeline_b] == facts["want_b"]
        assert facts["want_b"], "B was meant to cut"
        # The recorded stream is A's up to 60, then B's: A's later records are gone.
        plane.flush()
        reports = [(k, m) for k, kind, m in plane.store.records("rw") if kind == REPORT]
        assert reports == facts["reports"]
        assert [k for k, _ in reports] == list(range(5, 151, 5))
    finally:
        plane.close()


def test_decisions_after_a_resume_are_scheduled_from_the_checkpoint(tmp_path):
    plane, _, timeline_b, _ = rewound(tmp_path)
    try:
        assert timeline_b
        assert [c.effective_step for c in timeline_b] == [c.state_step + 1 for c in timeline_b]
    finally:
        plane.close()


def test_a_checkpoint_before_the_first_tick_is_rebuilt_too(tmp_path):
    spec = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}
    plane = DataPlane(DaemonConfig(state_dir=tmp_path / "state"))
    encoder = BatchEncoder("early", 0)
    try:
        first = Hello(run="early", groups=[GroupInfo(name="0", lr=0.1)], policy=spec, sync=True)
        plane.handle(b"A", [encode(first)], time.monotonic())
        records = plateau_records(range(1, 41), 1)
        plane.handle(b"A", encoder.encode(records, {}), time.monotonic())  # 40 steps, one tick
        plane.flush()
        reference = parse_policy(spec).build([0.1])
        for _, k, kind, metrics in records:
            if k > 12:
                break
            reference.step(metrics) if kind == STEP else reference.observe(metrics)
        back = Hello(
            run="early",
            groups=[GroupInfo(name="0", lr=0.1)],
            policy=spec,
            policy_state=reference.state_dict(),
            step=12,
            sync=True,
        )
        plane.handle(b"B", [encode(back)], time.monotonic())
        engine = plane.registry.runs["early"].engine
        assert (engine.step, engine.policy.state_dict()) == (12, reference.state_dict())
    finally:
        plane.close()


def test_a_restart_keeps_the_last_change_of_each_run(tmp_path):
    config = DaemonConfig(state_dir=tmp_path / "state")
    plane = DataPlane(config)
    plane.handle(b"me", hello("last"), time.monotonic())
    batch = BatchEncoder("last", 0).encode(plateau_records(range(1, 21), 1), {})
    plane.handle(b"me", batch, time.monotonic())
    before, _ = ControlPlane(plane).handle(b'{"op": "show", "run": "last"}')
    assert before["run"]["last_change"] is not None
    plane.close()
    again = DataPlane(config)
    try:
        after, _ = ControlPlane(again).handle(b'{"op": "show", "run": "last"}')
        assert after["run"]["last_change"] == before["run"]["last_change"]
    finally:
        again.close()
