"""The daemon's data plane (daemon/dataplane.py) as logic: frames in, replies
out, no socket; each test's plane has its own store in a tmp dir. What the
plane does with batches from a session it does not know (it drops them and
asks for a hello, the client sends them again), how it skips records it has
already folded in, what a plane restarted on the same store restores, and
how bad input is counted."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrpilot.daemon.config import DaemonConfig
from lrpilot.daemon.control import ControlPlane, summary
from lrpilot.daemon.dataplane import ASK_AGAIN_AFTER, DataPlane
from lrpilot.daemon.store import read_records
from lrpilot.policies import parse_policy
from lrpilot.protocol import (
    MAX_MESSAGE_BYTES,
    REPORT,
    STEP,
    BatchEncoder,
    Bye,
    Error,
    GroupInfo,
    Hello,
    LRCommand,
    Persisted,
    Processed,
    Welcome,
    decode,
    encode,
)

PLATEAU = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}


def hello(run: str, step: int = 0, sync: bool = False, applied_version: int = 0) -> list[bytes]:
    message = Hello(
        run=run,
        groups=[GroupInfo(name="0", lr=0.1)],
        policy=PLATEAU,
        step=step,
        sync=sync,
        applied_version=applied_version,
    )
    return [encode(message)]


def replies(plane: DataPlane, identity: bytes, frames: list[bytes], now: float = 0.0) -> list:
    out = plane.handle(identity, frames, now)
    assert all(to == identity for to, _ in out)
    return [decode(frames) for _, frames in out]


def commands(messages: list) -> list[LRCommand]:
    return [m for m in messages if isinstance(m, LRCommand)]


@pytest.fixture
def make_plane(tmp_path: Path) -> Iterator:
    """DataPlane(config) on a store of its own in tmp_path; closed at the end."""
    planes: list[DataPlane] = []

    def make(state_dir: Path = tmp_path / "state", **fields) -> DataPlane:
        plane = DataPlane(DaemonConfig(state_dir=state_dir, **fields))
        planes.append(plane)
        return plane

    yield make
    for plane in planes:
        if plane.store._writer.is_alive():
            plane.close()


# Steps 1 and 2, each with a val_loss report: 1.0 then 2.0 (patience 0: a cut).
ENCODER = BatchEncoder("back", 0)
FIRST = ENCODER.encode([(1, 1, STEP, {"loss": 1.0}), (2, 1, REPORT, {"val_loss": 1.0})], {})
SECOND = ENCODER.encode([(3, 2, STEP, {"loss": 1.0}), (4, 2, REPORT, {"val_loss": 2.0})], {})


def test_batches_before_hello_are_refused_and_processed_once_when_sent_again(make_plane):
    plane = make_plane()
    [error] = replies(plane, b"me", FIRST, now=0.0)
    assert isinstance(error, Error)
    assert error.code == "unknown_session"
    # A second batch within the second: dropped, not answered again.
    assert replies(plane, b"me", SECOND, now=0.5) == []
    assert plane.records_ingested == 0
    assert plane.rejected["unknown_session"] == 2
    assert "back" not in plane.registry.runs
    # The client says hello, then sends again what the daemon did not keep.
    [welcome] = replies(plane, b"me", hello("back"), now=0.6)
    assert isinstance(welcome, Welcome)
    assert welcome.command is None
    assert commands(replies(plane, b"me", FIRST, now=0.7)) == []
    [cut] = commands(replies(plane, b"me", SECOND, now=0.7))
    assert cut.lrs == [0.05]  # val_loss 1.0 then 2.0, patience 0: one cut
    assert (cut.version, cut.state_step, cut.actor) == (1, 2, "policy")
    assert plane.records_ingested == 4
    engine = plane.registry.runs["back"].engine
    before = (engine.step, engine.seq, engine.version, engine.policy.state_dict())
    assert before[:3] == (2, 4, 1)
    # The same batch again (its seqs are folded in already): skipped.
    assert commands(replies(plane, b"me", SECOND, now=0.8)) == []
    assert (engine.step, engine.seq, engine.version, engine.policy.state_dict()) == before
    # Each record is recorded once.
    plane.flush()
    recorded = list(plane.store.records("back"))
    assert recorded == [
        (1, STEP, {"loss": 1.0}),
        (1, REPORT, {"val_loss": 1.0}),
        (2, STEP, {"loss": 1.0}),
        (2, REPORT, {"val_loss": 2.0}),
    ]


def test_unknown_session_is_answered_at_most_once_a_second_per_sender(make_plane):
    plane = make_plane()
    assert [e.code for e in replies(plane, b"a", FIRST, now=10.0)] == ["unknown_session"]
    assert replies(plane, b"a", FIRST, now=10.0 + ASK_AGAIN_AFTER / 2) == []
    # Another sender is asked on its own account.
    assert [e.code for e in replies(plane, b"b", FIRST, now=10.1)] == ["unknown_session"]
    # A second later, the first one is asked again (its hello may have been lost).
    assert [e.code for e in replies(plane, b"a", FIRST, now=10.0 + ASK_AGAIN_AFTER)] == [
        "unknown_session"
    ]
    assert plane.rejected["unknown_session"] == 4
    assert plane.records_ingested == 0


def test_sync_session_gets_processed_with_the_last_seq(make_plane):
    plane = make_plane()
    replies(plane, b"s", hello("sync", sync=True))
    frames = BatchEncoder("sync", 0).encode(
        [(7, 1, STEP, {"loss": 1.0}), (8, 2, STEP, {"loss": 1.0}), (9, 2, REPORT, {})], {}
    )
    [processed] = replies(plane, b"s", frames)
    assert processed == Processed(run="sync", seq=9)


def test_persisted_acks_come_once_the_store_has_committed(make_plane):
    plane = make_plane()
    replies(plane, b"p", hello("persist"))
    replies(plane, b"p", BatchEncoder("persist", 0).encode([(1, 1, STEP, {"loss": 1.0})], {}))
    assert plane.persisted() == []  # nothing committed before a tick
    plane.flush()
    assert [(to, decode(frames)) for to, frames in plane.persisted()] == [
        (b"p", Persisted(run="persist", seq=1))
    ]
    assert plane.persisted() == []  # said once


def test_a_plane_restarted_on_the_store_skips_what_it_folded_in(make_plane, tmp_path):
    """A daemon killed after a decision but before its next tick: the decision
    went to the store with the run's state (journal and state in one
    transaction), the records since the last tick did not. The client, told
    to say hello, sends again what was not persisted (here: everything, to see
    the skip): nothing is decided twice, and the missing records are stored."""
    state = tmp_path / "restart"
    first = make_plane(state)
    identity = b"client-1"
    replies(first, identity, hello("back", sync=True))
    replies(first, identity, FIRST)
    [cut] = commands(replies(first, identity, SECOND))
    assert (cut.version, cut.lrs) == (1, [0.05])
    first.flush()  # the last tick before the crash
    third = ENCODER.encode([(5, 3, STEP, {"loss": 1.0}), (6, 3, REPORT, {"val_loss": 3.0})], {})
    [second_cut] = commands(replies(first, identity, third))
    assert second_cut.version == 2
    want = first.registry.runs["back"].engine.state_row()
    first.store.close()  # no tick: step 3's records never reached the store

    again = make_plane(state)
    engine = again.registry.runs["back"].engine
    assert engine.state_row() == want
    assert (engine.step, engine.seq, engine.version, engine.driver) == (3, 6, 2, identity.hex())
    assert engine.last_change.version == 2
    assert [e.code for e in replies(again, identity, third, now=1.0)] == ["unknown_session"]
    got = replies(again, identity, hello("back", step=3, sync=True, applied_version=2))
    assert isinstance(got[0], Welcome)
    for frames in (FIRST, SECOND, third):  # already folded in: skipped
        assert commands(replies(again, identity, frames, now=1.1)) == []
    assert engine.state_row() == want
    again.flush()
    steps = [(step, kind) for step, kind, _ in again.store.records("back")]
    assert steps == [(1, STEP), (1, REPORT), (2, STEP), (2, REPORT), (3, STEP), (3, REPORT)]
    assert [e["version"] for e in again.store.history("back")] == [1, 2]


def test_bad_input_is_counted_by_reason(make_plane):
    plane = make_plane(max_message_bytes=2048)
    replies(plane, b"c", hello("counted"))
    frames = BatchEncoder("counted", 0).encode(
        [(1, 1, STEP, {"loss": math.nan}), (2, 2, STEP, {"loss": math.inf}), (3, 3, STEP, {})],
        {},
    )
    [error] = replies(plane, b"c", frames)
    assert error.code == "non_finite"
    assert "2 record(s)" in error.message
    assert "step 1: loss=nan" in error.message
    [error] = replies(plane, b"c", [b"nope"])
    assert error.code == "malformed"
    [error] = replies(plane, b"c", [b"x" * 4096])
    assert error.code == "oversized"
    [error] = replies(plane, b"stranger", [encode(Processed(run="counted", seq=1))])
    assert error.code == "unknown_session"
    [error] = replies(plane, b"c", [encode(Processed(run="counted", seq=1))])
    assert error.code == "unexpected"
    [error] = replies(
        plane,
        b"d",
        [encode(Hello(run="x", groups=[GroupInfo(name="0", lr=0.1)], policy={"kind": "nope"}))],
    )
    assert error.code == "bad_hello"
    assert plane.rejected == {
        "non_finite": 2,
        "malformed": 1,
        "oversized": 1,
        "unknown_session": 1,
        "unexpected": 1,
        "bad_hello": 1,
    }
    assert plane.records_ingested == 1
    # The non-finite records are not part of the recorded stream.
    plane.flush()
    db = plane.store._db
    assert [step for step, _, _ in read_records(db, "counted")] == [3]


def test_sweep_ends_silent_sessions(make_plane):
    plane = make_plane(silence_timeout=5.0)
    plane.handle(b"quiet", hello("quiet"), 0.0)
    plane.handle(b"loud", hello("loud"), 0.0)
    plane.handle(b"loud", BatchEncoder("loud", 0).encode([(1, 1, STEP, {})], {}), 4.0)
    before = time.time()
    plane.sweep(6.0)
    assert plane.sessions_of("quiet") == []
    assert [s.rank for s in plane.sessions_of("loud")] == [0]
    # `ended` is wall-clock time, like `created` (it is shown and stored).
    assert before <= plane.registry.runs["quiet"].ended <= time.time()
    assert plane.registry.runs["loud"].ended is None


def test_a_decision_is_said_once(make_plane):
    """A decision is one version, sent once: records that come again do not
    repeat it, and a client that says hello having applied it is not sent it
    again (one that missed it gets the run's state in the welcome)."""
    plane = make_plane()
    replies(plane, b"me", hello("dup"))
    assert commands(replies(plane, b"me", FIRST)) == []
    [cut] = commands(replies(plane, b"me", SECOND))
    assert (cut.version, cut.actor) == (1, "policy")
    assert commands(replies(plane, b"me", SECOND)) == []
    [welcome] = replies(plane, b"me", hello("dup", step=2, applied_version=1))
    assert isinstance(welcome, Welcome)
    assert (welcome.version, welcome.command) == (1, None)
    [welcome] = replies(plane, b"other", hello("dup", step=2, applied_version=0))
    assert welcome.command is not None
    assert (welcome.command.version, welcome.command.lrs) == (1, [0.05])
    history = plane.store.history("dup")
    assert [(e["version"], e["actor"], e["new_lrs"]) for e in history] == [(1, "policy", [0.05])]


def rank_hello(rank: int, step: int = 0, sync: bool = False) -> list[bytes]:
    message = Hello(
        run="ddp",
        rank=rank,
        world_size=2,
        groups=[GroupInfo(name="0", lr=0.1)],
        policy=PLATEAU,
        step=step,
        sync=sync,
    )
    return [encode(message)]


def steps(rank: int, first: int, last: int, seq: int = 1) -> list[bytes]:
    """Steps first..last of one rank, each with a val_loss report of 1.0."""
    records = []
    for step in range(first, last + 1):
        records.append((seq, step, STEP, {"loss": 1.0}))
        records.append((seq + 1, step, REPORT, {"val_loss": 1.0}))
        seq += 2
    return BatchEncoder("ddp", rank).encode(records, {})


def test_a_rank_joining_behind_the_driver_does_not_take_the_run_back(make_plane, caplog):
    caplog.set_level("INFO", logger="lrpilot.daemon")
    plane = make_plane()
    replies(plane, b"r0", rank_hello(0))
    replies(plane, b"r0", steps(0, 1, 5))
    assert plane.registry.runs["ddp"].engine.step == 5
    # Rank 1 (restarted by torchelastic, say) comes in at step 3: telemetry.
    replies(plane, b"r1", rank_hello(1, step=3))
    assert plane.registry.runs["ddp"].engine.step == 5
    assert "run ddp rank 1/2 hello" in caplog.text  # the log is captured
    assert "behind" not in caplog.text and "checkpoint" not in caplog.text


def test_rank_0_a_step_behind_rank_1_takes_the_run_over(make_plane, caplog):
    caplog.set_level("INFO", logger="lrpilot.daemon")
    plane = make_plane()
    replies(plane, b"r1", rank_hello(1))
    replies(plane, b"r1", steps(1, 1, 1))  # rank 1 drives while it is alone
    replies(plane, b"r0", rank_hello(0))
    run = plane.registry.runs["ddp"]
    assert run.driver.rank == 0 and run.engine.step == 0
    assert "rank 0 joined at step 0, behind rank 1" in caplog.text
    assert "checkpoint" not in caplog.text


@pytest.mark.parametrize("sync", [False, True], ids=["async", "lock-step"])
def test_decisions_for_several_ranks_are_scheduled_ahead_of_the_others(make_plane, sync):
    """One rank: the decision on step k's report is for k + 1 (lock-step) or
    k + 2 (async), as simulate has it. Several ranks: the others hear it
    after the driver, so it is for k + 2 in lock-step (each rank waits for
    its record, and DDP keeps the ranks in step) and ~100 ms of steps ahead
    in async."""
    plane = make_plane()
    replies(plane, b"r0", rank_hello(0, sync=sync))
    replies(plane, b"r1", rank_hello(1, sync=sync))
    plane.registry.runs["ddp"].sessions[1].steps_per_s = 500.0  # 50 steps in 100 ms
    out = plane.handle(b"r0", steps(0, 1, 2), 0.0)  # patience 0: a cut at step 2
    sent = [(to, m) for to, frames in out if isinstance(m := decode(frames), LRCommand)]
    assert sorted(to for to, _ in sent) == [b"r0", b"r1"]  # the same command to each rank
    assert {m.effective_step for _, m in sent} == {2 + 2 if sync else 2 + 1 + 50}


def test_a_raised_message_limit_lets_larger_batches_in(make_plane):
    """--max-message-bytes above the protocol's default is the limit that holds."""
    plane = make_plane(max_message_bytes=16 << 20)
    replies(plane, b"big", hello("big"))
    metrics = {f"m{i}": 1.0 for i in range(8)}
    records = [(k, k, STEP, metrics) for k in range(1, 70_001)]
    frames = BatchEncoder("big", 0).encode(records, {})
    assert sum(len(f) for f in frames) > MAX_MESSAGE_BYTES
    assert replies(plane, b"big", frames) == []
    assert plane.records_ingested == 70_000
    assert plane.rejected["oversized"] == 0


def test_after_every_rank_left_only_rank_0_takes_the_run_back(make_plane, caplog):
    """A DDP job restarted (or a daemon restarted): whichever rank says hello
    first, the run's step goes back only when rank 0 comes."""
    caplog.set_level("INFO", logger="lrpilot.daemon")
    plane = make_plane()
    replies(plane, b"r0", rank_hello(0))
    replies(plane, b"r1", rank_hello(1))
    plane.handle(b"r0", steps(0, 1, 5), 0.0)
    for identity, rank in ((b"r0", 0), (b"r1", 1)):
        replies(plane, identity, [encode(Bye(run="ddp", rank=rank, step=5))])
    run = plane.registry.runs["ddp"]
    assert not run.sessions
    replies(plane, b"r1-again", rank_hello(1, step=3))
    assert run.engine.step == 5
    replies(plane, b"r0-again", rank_hello(0, step=3))
    assert run.engine.step == 3
    assert "rank 0 joined at step 3, behind rank 1" in caplog.text


def test_a_run_back_with_other_param_groups_takes_them_for_good(make_plane):
    plane = make_plane()
    replies(plane, b"one", hello("regroup"))
    two = Hello(
        run="regroup",
        groups=[GroupInfo(name="body", lr=0.2), GroupInfo(name="head", lr=0.02)],
        policy=PLATEAU,
        world_size=2,
    )
    replies(plane, b"two", [encode(two)])
    run = plane.registry.runs["regroup"]
    assert (run.group_names, run.base_lrs, run.world_size) == (["body", "head"], [0.2, 0.02], 2)
    engine = run.engine
    # The other rank, with the same two groups: the run is not taken over again.
    replies(plane, b"rank1", [encode(two.model_copy(update={"rank": 1}))])
    assert run.engine is engine
    assert run.engine.base_lrs == [0.2, 0.02]


def test_a_resume_under_a_switched_policy_drops_the_abandoned_records(make_plane):
    """With no snapshot of the current policy to rebuild from, the state goes
    on as it is, and the records after the resumed step are still cut."""
    plane = make_plane()
    replies(plane, b"r0", rank_hello(0))
    plane.handle(b"r0", steps(0, 1, 10), 0.0)
    plane.flush()
    ControlPlane(plane).handle(
        json.dumps(
            {"op": "policy", "run": "ddp", "policy": {"kind": "cosine", "T_max": 9}}
        ).encode()
    )
    replies(plane, b"r0-again", rank_hello(0, step=4))
    plane.flush()
    assert plane.registry.runs["ddp"].engine.step == 4
    assert max(step for step, _, _ in plane.store.records("ddp")) == 4


def test_the_step_rate_is_measured_between_batches(make_plane):
    """Batches of 10 steps every 20 ms: 500 steps/s, whatever the batching."""
    plane = make_plane()
    replies(plane, b"r0", rank_hello(0))
    encoder = BatchEncoder("ddp", 0)
    for i in range(60):
        records = [(10 * i + k, 10 * i + k, STEP, {"loss": 1.0}) for k in range(1, 11)]
        plane.handle(b"r0", encoder.encode(records, {}), 0.02 * i)
    session = plane.registry.runs["ddp"].sessions[0]
    assert session.step == 600
    assert session.steps_per_s == pytest.approx(500, rel=0.02)


def test_a_runs_lag_is_how_far_its_slowest_rank_is_behind(make_plane):
    plane = make_plane()
    replies(plane, b"r0", rank_hello(0))
    replies(plane, b"r1", rank_hello(1))
    plane.handle(b"r0", steps(0, 1, 5), 0.0)
    plane.handle(b"r1", steps(1, 1, 2), 0.0)
    assert summary(plane.registry.runs["ddp"])["lag_steps"] == 3


def test_a_resume_at_a_step_snapshotted_between_its_step_and_its_report(make_plane):
    """A tick can land between step k's record and k's report (separate
    messages in lock-step); a resume at k must still fold that report in."""
    plane = make_plane()
    replies(plane, b"me", hello("back"))
    sent = [
        [(1, 1, STEP, {"loss": 1.0}), (2, 1, REPORT, {"val_loss": 1.0})],
        [(3, 2, STEP, {"loss": 1.0})],
        [(4, 2, REPORT, {"val_loss": 0.5})],
        [(5, 3, STEP, {"loss": 1.0}), (6, 3, REPORT, {"val_loss": 0.9})],
    ]
    for i, records in enumerate(sent):
        plane.handle(b"me", ENCODER.encode(records, {}), 0.0)
        if i == 1:
            plane.flush()  # the snapshot at step 2 has its step, not its report
    plane.flush()
    replies(plane, b"again", hello("back", step=2))
    reference = parse_policy(PLATEAU).build([0.1])
    reference.observe({"val_loss": 1.0})
    reference.observe({"val_loss": 0.5})
    assert plane.registry.runs["back"].engine.policy.state_dict() == reference.state_dict()
