"""The daemon's data plane (daemon/service/dataplane.py) as logic: frames in, replies
out, no socket; each test's plane has its own store in a tmp dir. What the
plane does with batches from a session it does not know (it drops them and
asks for a hello, the client sends them again), how it skips records it has
already folded in, what a plane restarted on the same store restores, and
how bad input is counted."""

from __future__ import annotations

import json
import math
import time

import pytest

from lrpilot.daemon.service.control import ControlPlane, summary
from lrpilot.daemon.service.dataplane import ASK_AGAIN_AFTER, DataPlane
from lrpilot.daemon.service.records import read_records
from lrpilot.policies import parse_policy
from lrpilot.protocol import (
    MAX_COUNT,
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
    engine, ledger = plane.registry.runs["back"].engine, plane.registry.runs["back"].ledger
    before = (engine.step, ledger.seq, engine.version, engine.policy.state_dict())
    assert before[:3] == (2, 4, 1)
    # The same batch again (its seqs are folded in already): skipped.
    assert commands(replies(plane, b"me", SECOND, now=0.8)) == []
    assert (engine.step, ledger.seq, engine.version, engine.policy.state_dict()) == before
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
    want_ledger = first.registry.runs["back"].ledger.row()
    first.store.close()  # no tick: step 3's records never reached the store

    again = make_plane(state)
    engine, ledger = again.registry.runs["back"].engine, again.registry.runs["back"].ledger
    assert engine.state_row() == want
    # Folded in up to seq 6 (the decision's row says so); stored up to 4.
    assert ledger.row() == {**want_ledger, "stored_seq": 4}
    assert (engine.step, ledger.seq, engine.version, ledger.driver) == (3, 6, 2, identity.hex())
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
    # A step out of range refuses the whole batch: nothing of it is folded in.
    wild = BatchEncoder("counted", 0).encode([(1, 1, STEP, {}), (2, -5, STEP, {})], {})
    [error] = replies(plane, b"c", wild)
    assert (error.code, error.message) == ("malformed", "metrics: step -5 is out of range")
    assert plane.rejected == {
        "malformed": 2,
        "oversized": 1,
        "unknown_session": 1,
        "unexpected": 1,
        "bad_hello": 1,
    }
    assert plane.records_ingested == 0


def test_non_finite_metrics_are_data(make_plane):
    """A NaN or infinite loss is a training event, not a malformed message:
    folded in (plateau counts it as no improvement, as torch does), kept as
    the run's last value, and recorded."""
    plane = make_plane()
    replies(plane, b"c", hello("diverged"))
    records = [(1, 1, STEP, {"loss": 1.0}), (2, 1, REPORT, {"val_loss": 1.0})]
    records += [(3, 2, STEP, {"loss": math.inf}), (4, 2, REPORT, {"val_loss": math.nan})]
    out = replies(plane, b"c", BatchEncoder("diverged", 0).encode(records, {}))
    [cut] = commands(out)  # patience 0: the NaN is not an improvement on 1.0
    assert cut.lrs == [0.05]
    assert not [m for m in out if isinstance(m, Error)]
    assert plane.records_ingested == 4
    assert plane.rejected == {}
    run = plane.registry.runs["diverged"]
    assert run.last_metrics["loss"] == math.inf and math.isnan(run.last_metrics["val_loss"])
    reference = parse_policy(PLATEAU).build([0.1])
    reference.observe({"val_loss": 1.0})
    reference.observe({"val_loss": math.nan})
    assert run.engine.policy.state_dict() == reference.state_dict()
    plane.flush()
    recorded = list(read_records(plane.store._db, "diverged"))
    assert [(step, kind) for step, kind, _ in recorded] == [
        (1, STEP),
        (1, REPORT),
        (2, STEP),
        (2, REPORT),
    ]
    assert math.isnan(recorded[-1][2]["val_loss"])


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
    its record, and DDP keeps the ranks in step) and ~200 ms of steps ahead
    in async (delivery, and the steps an async rank has not sent yet)."""
    plane = make_plane()
    replies(plane, b"r0", rank_hello(0, sync=sync))
    replies(plane, b"r1", rank_hello(1, sync=sync))
    plane.registry.runs["ddp"].sessions[1].steps_per_s = 500.0  # 100 steps in 200 ms
    plane.handle(b"r1", steps(1, 1, 2), 0.0)  # the decision waits for every rank's val_loss
    out = plane.handle(b"r0", steps(0, 1, 2), 0.0)  # patience 0: a cut at step 2
    sent = [(to, m) for to, frames in out if isinstance(m := decode(frames), LRCommand)]
    assert sorted(to for to, _ in sent) == [b"r0", b"r1"]  # the same command to each rank
    assert {m.effective_step for _, m in sent} == {2 + 2 if sync else 2 + 1 + 100}


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
    plane.handle(b"r1", steps(1, 1, 5), 0.0)
    plane.handle(b"r0", steps(0, 1, 5), 0.0)
    for identity, rank in ((b"r0", 0), (b"r1", 1)):
        replies(plane, identity, [encode(Bye(run="ddp", rank=rank, step=5))])
    run = plane.registry.runs["ddp"]
    assert not run.sessions
    replies(plane, b"r1-again", rank_hello(1, step=3))
    assert run.engine.step == 5
    out = plane.handle(b"r0-again", rank_hello(0, step=3), 0.0)
    assert run.engine.step == 3
    assert "rank 0 joined at step 3, behind rank 1" in caplog.text
    # Both lack the decision made on step 3's report, due at step 7 (v2):
    # each gets it, rather than the state of the timeline they left (v4).
    sent = [(to, decode(frames)) for to, frames in out]
    assert sent[0][0] == b"r0-again" and sent[0][1].command.version == 2
    assert [(to, m.version, m.effective_step) for to, m in sent[1:]] == [(b"r1-again", 2, 7)]


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
    assert summary(plane.registry.runs["ddp"]).lag_steps == 3


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


def test_a_second_resume_from_one_checkpoint_does_not_count_its_report_twice(make_plane):
    """Two resumes from the same checkpoint at step 2 (a report at step 2 in
    it): the first rewind's snapshot at step 2 is numbered by the new
    process, and the second rewind replayed the old report at step 2 on top
    of it, one bad report too many (a plateau cut an evaluation early)."""
    patient = {**PLATEAU, "patience": 1}
    plane = make_plane()
    replies(plane, b"first", hello_from("twice", "a", 1, sync=True, policy=patient))
    records = [(1, 1, STEP, {}), (2, 2, STEP, {}), (3, 2, REPORT, {"val_loss": 2.0})]
    records += [(4, 3, STEP, {}), (5, 4, STEP, {}), (6, 4, REPORT, {"val_loss": 3.0})]
    plane.handle(b"first", ENCODER.encode(records, {}), 0.0)
    replies(plane, b"first", [encode(Bye(run="twice", step=4))])
    plane.flush()
    reference = parse_policy(patient).build([0.1])
    reference.observe({"val_loss": 2.0})
    for again in (b"second", b"third"):
        replies(plane, again, hello_from("twice", "a", 2, step=2, sync=True, policy=patient))
        plane.flush()  # the tick snapshots the run at step 2
        assert plane.registry.runs["twice"].engine.policy.state_dict() == reference.state_dict()
        # It trains on a step (its records numbered from 1), then stops.
        plane.handle(again, ENCODER.encode([(1, 3, STEP, {})], {}), 1.0)
        replies(plane, again, [encode(Bye(run="twice", step=3))])
        plane.flush()


# --- what a client may not do (issue: trust nothing from the wire) ----------


def hello_from(run: str, host: str, pid: int, **fields) -> list[bytes]:
    fields.setdefault("groups", [GroupInfo(name="0", lr=0.1)])
    fields.setdefault("policy", PLATEAU)
    return [encode(Hello(run=run, host=host, pid=pid, **fields))]


def test_a_second_session_claiming_a_live_rank_is_refused(make_plane):
    """A second connection saying it is rank 0 of a live run, a step ahead
    with bad reports, must not take the driver's seat; a restarted process
    (the old session silent for --rank-takeover-after) may."""
    plane = make_plane(rank_takeover_after=10.0)
    replies(plane, b"real", hello_from("live", "node-a", 100), now=0.0)
    plane.handle(b"real", ENCODER_LIVE.encode([(1, 1, STEP, {"loss": 1.0})], {}), 1.0)
    engine = plane.registry.runs["live"].engine
    [refused] = replies(plane, b"evil", hello_from("live", "node-b", 666, step=50), now=2.0)
    assert isinstance(refused, Error) and refused.code == "rank_taken"
    assert "node-a" in refused.message and "\n" not in refused.message
    # Its reports are not the run's: it has no session (and it is not asked
    # for another hello within the second: that would make a loop of them).
    bad = BatchEncoder("live", 0).encode([(1, 51, REPORT, {"val_loss": 9.0})], {})
    assert replies(plane, b"evil", bad, now=2.5) == []
    [unknown] = replies(plane, b"evil", bad, now=3.5)
    assert unknown.code == "unknown_session"
    run = plane.registry.runs["live"]
    assert run.engine is engine and run.driver.identity == b"real" and engine.step == 1
    assert plane.rejected["rank_taken"] == 1
    # The real process goes quiet for longer than the takeover window: a new
    # process (a restart) takes the rank.
    [welcome] = replies(plane, b"restart", hello_from("live", "node-c", 7, step=1), now=11.5)
    assert isinstance(welcome, Welcome)
    assert run.driver.identity == b"restart"
    assert plane.registry.session(b"real") is None


ENCODER_LIVE = BatchEncoder("live", 0)


def test_a_hello_never_replaces_a_live_runs_groups_version_or_hold(make_plane):
    plane = make_plane()
    replies(plane, b"r0", hello_from("held", "a", 1))
    plane.handle(b"r0", BatchEncoder("held", 0).encode([(1, 1, STEP, {"loss": 1.0})], {}), 0.0)
    control = ControlPlane(plane)
    answer, _ = control.handle(json.dumps({"op": "set_lr", "run": "held", "lr": 0.01}).encode())
    assert answer["ok"], answer
    engine = plane.registry.runs["held"].engine
    before = (engine.version, engine.held, engine.spec)
    two_groups = [GroupInfo(name="a", lr=49.5), GroupInfo(name="b", lr=49.5)]
    evil = hello_from("held", "b", 2, rank=1, world_size=2, groups=two_groups, applied_version=0)
    [refused] = replies(plane, b"evil", evil)
    assert refused.code == "bad_hello" and "live with 1 param group" in refused.message
    # Rank 1 with the run's groups joins, and changes nothing of the run.
    other = hello_from("held", "b", 2, rank=1, world_size=2, policy={"kind": "cosine", "T_max": 3})
    [welcome] = replies(plane, b"rank1", other)
    assert isinstance(welcome, Welcome) and welcome.command is not None  # it is told the hold
    run = plane.registry.runs["held"]
    assert run.engine is engine and (engine.version, engine.held, engine.spec) == before


@pytest.mark.parametrize(
    "state",
    [
        {"lrs": [math.nan], "best": 1.0, "num_bad_steps": 0, "cooldown_counter": 0},
        {"lrs": "abc", "best": 1.0, "num_bad_steps": 0, "cooldown_counter": 0},
        {"lrs": [0.1], "best": "x", "num_bad_steps": 0, "cooldown_counter": 0},
        {"lrs": [0.1], "best": 1.0, "num_bad_steps": -3, "cooldown_counter": 0},
    ],
)
def test_a_hello_with_hostile_policy_state_is_refused(make_plane, state):
    plane = make_plane()
    [refused] = replies(plane, b"x", hello_from("planted", "a", 1, policy_state=state))
    assert refused.code == "bad_hello" and "\n" not in refused.message
    assert "planted" not in plane.registry.runs


def test_a_record_far_ahead_is_not_stepped_through(make_plane):
    """A record 2**52 steps ahead must not make the daemon's one loop step
    the policy once per missing step: past --max-step-gap the driver is told
    step_gap, and its hello (its own state at its step) moves the run."""
    plane = make_plane(max_step_gap=1000)
    cosine = {"kind": "cosine", "T_max": 100}
    replies(plane, b"me", hello_from("far", "a", 1, policy=cosine))
    encoder = BatchEncoder("far", 0)
    far = 2**52
    started = time.perf_counter()
    out = replies(plane, b"me", encoder.encode([(1, 1, STEP, {}), (2, far, STEP, {})], {}))
    assert time.perf_counter() - started < 1.0
    assert [m.code for m in out if isinstance(m, Error)] == ["step_gap"]
    engine = plane.registry.runs["far"].engine
    assert (engine.step, plane.registry.runs["far"].ledger.seq) == (1, 1)
    reference = parse_policy(cosine).build([0.1])
    for _ in range(7):
        reference.step()
    replies(
        plane,
        b"me",
        hello_from("far", "a", 1, policy=cosine, step=far - 1, policy_state=reference.state_dict()),
    )
    assert engine.step == far - 1
    assert replies(plane, b"me", encoder.encode([(2, far, STEP, {})], {})) == []
    assert engine.step == far and plane.rejected["step_gap"] == 1
    reference.step()
    assert engine.policy.lrs == reference.lrs
    # What was not folded in was not recorded either.
    plane.flush()
    assert [s for s, _, _ in plane.store.records("far")] == [1, far]


def test_a_batch_of_records_each_just_under_the_gap_is_not_stepped_through(make_plane):
    """The gap is a budget per batch, not per record: 100 records each 999
    steps past the last would step the policy 100,000 times for one message
    of 1.6 KB (found by tests/test_fuzz.py: a replicated batch stalled the
    loop). The first gap is taken, the next is told step_gap."""
    plane = make_plane(max_step_gap=1000)
    cosine = {"kind": "cosine", "T_max": 100}
    replies(plane, b"me", hello_from("strided", "a", 1, policy=cosine))
    records = [(k, 1000 * k, STEP, {}) for k in range(1, 101)]
    out = replies(plane, b"me", BatchEncoder("strided", 0).encode(records, {}))
    assert [m.code for m in out if isinstance(m, Error)] == ["step_gap"]
    engine = plane.registry.runs["strided"].engine
    assert (engine.step, plane.registry.runs["strided"].ledger.seq) == (1000, 1)
    # The next batch has a budget of its own.
    out = replies(plane, b"me", BatchEncoder("strided", 0).encode(records[1:2], {}))
    assert out == [] and engine.step == 2000


def test_a_run_resumed_from_a_checkpoint_keeps_the_step_gap_limit(make_plane):
    """The engine a resume rebuilds from a snapshot is bounded by
    --max-step-gap like every other (found by tests/test_fuzz.py: after a
    rewind a record 2**53 steps ahead stalled the daemon)."""
    plane = make_plane(max_step_gap=10)
    cosine = {"kind": "cosine", "T_max": 100}
    replies(plane, b"me", hello_from("resumed", "a", 1, policy=cosine))
    encoder = BatchEncoder("resumed", 0)
    replies(plane, b"me", encoder.encode([(k, k, STEP, {}) for k in range(1, 6)], {}))
    replies(plane, b"again", hello_from("resumed", "a", 1, policy=cosine, step=2))
    engine = plane.registry.runs["resumed"].engine
    assert engine.step == 2 and engine.max_gap == 10
    out = replies(plane, b"again", BatchEncoder("resumed", 0).encode([(1, 100, STEP, {})], {}))
    assert [m.code for m in out if isinstance(m, Error)] == ["step_gap"]
    assert engine.step == 2


def test_a_client_that_moves_to_another_run_leaves_the_first(make_plane):
    plane = make_plane()
    replies(plane, b"c", hello_from("first", "a", 1))
    replies(plane, b"c", hello_from("second", "a", 1))
    assert plane.registry.runs["first"].sessions == {}
    assert plane.registry.runs["first"].ended is not None
    assert [s.run for s in plane.registry.sessions.values()] == ["second"]


def test_active_runs_and_metric_names_are_capped(make_plane):
    plane = make_plane(max_runs=2, max_metric_names=3)
    for i in range(2):
        replies(plane, b"c%d" % i, hello_from(f"r{i}", "a", i))
    [refused] = replies(plane, b"c9", hello_from("r9", "a", 9))
    assert refused.code == "too_many_runs"
    assert "r9" not in plane.registry.runs
    names = {f"m{i}": float(i) for i in range(5)}
    out = replies(plane, b"c0", BatchEncoder("r0", 0).encode([(1, 1, STEP, names)], {}))
    assert [m.code for m in out if isinstance(m, Error)] == ["too_many_metrics"]
    assert plane.registry.runs["r0"].last_metrics == {"m0": 0.0, "m1": 1.0, "m2": 2.0}
    assert plane.rejected["too_many_metrics"] == 2
    # A run that ended makes room.
    replies(plane, b"c1", [encode(Bye(run="r1"))])
    assert isinstance(replies(plane, b"c9", hello_from("r9", "a", 9))[0], Welcome)


def test_a_fresh_start_under_a_used_run_id_is_a_new_timeline(make_plane):
    """The same script started again with the same run id: not a resume at
    step 0. Its own policy runs, no command of the old timeline reaches it,
    and the journal marks where the old timeline ended."""
    plane = make_plane()
    replies(plane, b"old", hello_from("again", "a", 1))
    plane.handle(b"old", BatchEncoder("again", 0).encode(
        [(1, 1, STEP, {}), (2, 1, REPORT, {"val_loss": 1.0}), (3, 2, STEP, {}),
         (4, 2, REPORT, {"val_loss": 2.0})], {}), 0.0)  # fmt: skip
    control = ControlPlane(plane)
    control.handle(json.dumps({"op": "set_lr", "run": "again", "lr": 0.3}).encode())
    replies(plane, b"old", [encode(Bye(run="again", step=2))])
    cosine = {"kind": "cosine", "T_max": 10}
    [welcome] = replies(plane, b"new", hello_from("again", "a", 2, policy=cosine))
    run = plane.registry.runs["again"]
    assert run.engine.spec.kind == "cosine" and run.engine.held is None
    assert run.engine.step == 0 and run.requested_policy == cosine
    command = welcome.command
    assert command is not None and not command.hold and command.lrs == [0.1]
    assert command.policy == parse_policy(cosine).model_dump()
    # One step ahead, as journaled: the client has set its next step's LRs.
    assert (command.version, command.effective_step, command.state_step) == (3, 2, 0)
    history = plane.store.history("again")
    assert history[-1]["effective_step"] == 2
    assert [e["actor"] for e in history] == ["policy", "operator", "daemon"]
    assert history[-1]["reason"] == "fresh start: the run's previous timeline ended at step 2"
    plane.flush()
    assert list(plane.store.records("again")) == []


def test_a_refused_fresh_start_leaves_the_run_as_it_was(make_plane):
    """A hello the daemon refuses changes nothing, also the one that would
    start an ended run afresh (found by tests/test_fuzz.py: it took the
    hello's groups and kept the old engine, one LR for two groups)."""
    plane = make_plane()
    replies(plane, b"old", hello_from("ended", "a", 1))
    plane.handle(b"old", BatchEncoder("ended", 0).encode([(1, 1, STEP, {})], {}), 0.0)
    replies(plane, b"old", [encode(Bye(run="ended", step=1))])
    run = plane.registry.runs["ended"]
    before = (run.group_names, run.base_lrs, run.world_size, run.requested_policy, run.engine)
    two = [GroupInfo(name="a", lr=0.1), GroupInfo(name="b", lr=0.2)]
    [refused] = replies(
        plane, b"new", hello_from("ended", "a", 2, groups=two, policy_base_lrs=[0.1, 0.2, 0.3])
    )
    assert refused.code == "bad_hello"
    assert (run.group_names, run.base_lrs, run.world_size, run.requested_policy) == before[:4]
    assert run.engine is before[4]


def test_a_run_at_the_last_step_the_wire_counts_still_gets_its_commands(make_plane):
    """Every command's steps are counts the wire carries (2**53 at most): a
    run a hello puts at step 2**53, or whose step rate a wild record makes
    huge, still gets its decisions and its operator's commands (found by
    tests/test_fuzz.py: both raised from building the command)."""
    plane = make_plane()
    control = ControlPlane(plane)
    replies(plane, b"top", hello_from("top", "a", 1, step=MAX_COUNT))
    reports = [(1, MAX_COUNT, REPORT, {"val_loss": 1.0}), (2, MAX_COUNT, REPORT, {"val_loss": 2.0})]
    [cut] = commands(replies(plane, b"top", BatchEncoder("top", 0).encode(reports, {})))
    assert cut.effective_step == MAX_COUNT and cut.lrs == [0.05]
    answer, _ = control.handle(json.dumps({"op": "set_lr", "run": "top", "lr": 0.3}).encode())
    assert answer["ok"] and answer["command"]["effective_step"] == MAX_COUNT
    # A record 2**52 ahead, a microsecond after the last: refused, but it
    # made the step rate the operator's lead is counted in wild.
    replies(plane, b"fast", hello_from("fast", "a", 2))
    encoder = BatchEncoder("fast", 0)
    plane.handle(b"fast", encoder.encode([(1, 1, STEP, {})], {}), 1.0)
    plane.handle(b"fast", encoder.encode([(2, 2**52, STEP, {})], {}), 1.000001)
    answer, _ = control.handle(json.dumps({"op": "pause", "run": "fast"}).encode())
    assert answer["ok"] and answer["command"]["effective_step"] <= MAX_COUNT


def test_a_switched_policy_starts_at_its_step_0_where_it_takes_effect(make_plane):
    """The operator's new policy is as of the step before it takes effect:
    the client loads it and steps it by nothing when on time, and the daemon
    does not step it for the records before (they are the old policy's)."""
    plane = make_plane()
    replies(plane, b"me", hello_from("switch", "a", 1))
    encoder = BatchEncoder("switch", 0)
    plane.handle(b"me", encoder.encode([(k, k, STEP, {}) for k in range(1, 11)], {}), 0.0)
    plane.registry.runs["switch"].sessions[0].steps_per_s = 75.0  # lead: 15 steps in 200 ms
    warmup = {"kind": "linear", "start_factor": 0.05, "end_factor": 1.0, "total_iters": 50}
    answer, _ = ControlPlane(plane).handle(
        json.dumps({"op": "policy", "run": "switch", "policy": warmup}).encode()
    )
    command = LRCommand.model_validate(answer["command"])
    assert command.effective_step == 10 + 1 + 15
    assert command.state_step == command.effective_step - 1
    assert command.lrs == [pytest.approx(0.005)]  # the warmup's first LR, used at that step
    reference = parse_policy(warmup).build([0.1])
    assert command.policy_state == reference.state_dict()
    # Records up to the step before it starts leave the new policy at step 0.
    plane.handle(b"me", encoder.encode([(k, k, STEP, {}) for k in range(11, 26)], {}), 0.1)
    engine = plane.registry.runs["switch"].engine
    assert engine.policy.state_dict() == reference.state_dict()
    plane.handle(b"me", encoder.encode([(k, k, STEP, {}) for k in range(26, 31)], {}), 0.2)
    for _ in range(5):
        reference.step()
    assert engine.policy.state_dict() == reference.state_dict()
    history = plane.store.history("switch")
    assert history[-1]["new_lrs"] == [pytest.approx(0.005)]


def test_a_daemon_that_lost_journaled_versions_takes_the_run_back_from_its_driver(
    make_plane, tmp_path
):
    """A store that could not write, then a stop: the restarted daemon has
    v1 while the client applied v1..v3 (the last an operator's hold). It
    must not make decisions again under versions that meant something else:
    it takes the client's state and journals where the versions went."""
    import shutil

    plane = make_plane(state_dir=tmp_path / "live")
    replies(plane, b"me", hello_from("lost", "a", 1))
    encoder = BatchEncoder("lost", 0)
    stream = [(1, 1, STEP, {}), (2, 1, REPORT, {"val_loss": 1.0})]
    stream += [(3, 2, STEP, {}), (4, 2, REPORT, {"val_loss": 2.0})]  # v1: a cut
    plane.handle(b"me", encoder.encode(stream, {}), 0.0)
    plane.flush()
    plane.close()
    shutil.copytree(tmp_path / "live", tmp_path / "behind")  # the store as of v1
    plane = make_plane(state_dir=tmp_path / "live")
    more = [(5, 3, STEP, {}), (6, 3, REPORT, {"val_loss": 3.0})]  # v2: a cut
    replies(plane, b"me", hello_from("lost", "a", 1, step=2, seq=4, applied_version=1))
    plane.handle(b"me", encoder.encode(more, {}), 0.0)
    control = ControlPlane(plane)
    control.handle(json.dumps({"op": "set_lr", "run": "lost", "lr": 0.5}).encode())  # v3
    client_state = plane.registry.runs["lost"].engine.policy.state_dict()
    plane.close()
    # The daemon comes back on the store that has v1 only.
    behind = make_plane(state_dir=tmp_path / "behind")
    [welcome] = replies(
        behind,
        b"me",
        hello_from(
            "lost",
            "a",
            1,
            step=3,
            seq=6,
            applied_version=3,
            held=[0.5],
            policy_state=client_state,
        ),
    )
    engine = behind.registry.runs["lost"].engine
    assert engine.version == 4 and engine.held == [0.5] and engine.step == 3
    assert engine.policy.state_dict() == client_state
    assert welcome.command.version == 4 and welcome.command.lrs == [0.5]
    # The records it sends again are stored, not folded in again.
    assert commands(replies(behind, b"me", encoder.encode(stream + more, {}))) == []
    assert engine.version == 4
    history = behind.store.history("lost")
    assert [(e["version"], e["actor"]) for e in history] == [(1, "policy"), (4, "daemon")]
    assert "lost v2..v3" in history[-1]["reason"]


def test_ended_runs_past_the_cap_leave_memory_and_come_back_from_the_store(make_plane):
    plane = make_plane(max_ended_runs=1)
    for name in ("old", "new"):
        replies(plane, name.encode(), hello_from(name, "a", 1))
        plane.handle(name.encode(), BatchEncoder(name, 0).encode(
            [(1, 1, STEP, {}), (2, 1, REPORT, {"val_loss": 1.0}), (3, 2, STEP, {}),
             (4, 2, REPORT, {"val_loss": 2.0})], {}), 0.0)  # fmt: skip
        replies(plane, name.encode(), [encode(Bye(run=name, step=2))])
    plane.sweep(1.0)
    assert sorted(plane.registry.runs) == ["new"] and plane.forgotten_runs == 1
    # Its training comes back from a checkpoint: the run is read from the store.
    [welcome] = replies(plane, b"back", hello_from("old", "a", 2, step=2, applied_version=1))
    run = plane.registry.runs["old"]
    assert isinstance(welcome, Welcome) and welcome.version == 1
    assert run.engine.version == 1 and run.engine.lrs == [0.05]


def test_a_record_refused_for_its_gap_does_not_move_the_step_rate(make_plane):
    plane = make_plane(max_step_gap=1000)
    cosine = {"kind": "cosine", "T_max": 100}
    replies(plane, b"me", hello_from("rate", "a", 1, policy=cosine))
    encoder = BatchEncoder("rate", 0)
    plane.handle(b"me", encoder.encode([(k, k, STEP, {}) for k in range(1, 11)], {}), 0.0)
    plane.handle(b"me", encoder.encode([(k, k, STEP, {}) for k in range(11, 21)], {}), 0.1)
    session = plane.registry.runs["rate"].sessions[0]
    before = (session.step, session.steps_per_s)
    plane.handle(b"me", encoder.encode([(21, 2**50, STEP, {})], {}), 0.2)
    assert (session.step, session.steps_per_s) == before


def test_an_operators_command_reaches_a_lock_step_rank_that_runs_ahead_of_the_driver(make_plane):
    """DDP lets rank 1 send its next step's record once rank 0's is answered,
    before rank 0's next one reaches the daemon: rank 1 is a step ahead of
    the driver, already answered for it. An operator's command scheduled
    from the driver's step alone reached rank 1 a step late (seen in
    tests/test_ddp.py, lock-step, about one run in ten); it must be
    scheduled where rank 1 can still apply it on time."""
    plane = make_plane()
    control = ControlPlane(plane)
    for rank, identity in enumerate((b"r0", b"r1")):
        replies(
            plane, identity, hello_from("ddp", "a", 10 + rank, rank=rank, world_size=2, sync=True)
        )
    encoders = [BatchEncoder("ddp", rank) for rank in (0, 1)]
    for k in range(1, 6):
        plane.handle(b"r0", encoders[0].encode([(k, k, STEP, {})], {}), 0.0)
        plane.handle(b"r1", encoders[1].encode([(k, k, STEP, {})], {}), 0.0)
    plane.handle(b"r1", encoders[1].encode([(6, 6, STEP, {})], {}), 0.0)  # rank 1 ahead
    answer, out = control.handle(json.dumps({"op": "set_lr", "run": "ddp", "lr": 0.3}).encode())
    assert answer["ok"], answer
    sent = {to: decode(frames) for to, frames in out}
    assert set(sent) == {b"r0", b"r1"}
    # A rank reads it at its next step and applies it from the step after:
    # rank 0 (at 5) from 7 at the latest, rank 1 (at 6, answered) from 8.
    assert sent[b"r1"].effective_step >= 8, sent[b"r1"]
