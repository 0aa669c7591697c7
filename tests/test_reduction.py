"""One decision from every rank's metrics (daemon/service/reduction.py), on
the daemon's data plane as logic: a run of two or three ranks whose plateau
watches val_loss decides on the ranks' mean (or min, max, rank 0's), not
before every live rank has sent its value, stores what it decided on (so a
replay decides the same), leaves out a rank that stays silent past
--rank-wait-timeout, and loses nothing when the daemon restarts mid-wait."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrpilot.daemon.service.control import session_info, summary
from lrpilot.daemon.service.dataplane import DataPlane
from lrpilot.daemon.service.engine import PolicyEngine
from lrpilot.daemon.service.reduction import RankReduction, reduce_values
from lrpilot.policies import parse_policy
from lrpilot.protocol import (
    REPORT,
    STEP,
    BatchEncoder,
    Bye,
    GroupInfo,
    Hello,
    LRCommand,
    Persisted,
    decode,
    encode,
)

RUN = "red"
TIMEOUT = 5.0


def plateau(reduce: str = "mean") -> dict:
    return {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5, "reduce": reduce}


def hello(rank: int, world: int = 2, policy: dict | None = None, step: int = 0) -> list[bytes]:
    message = Hello(
        run=RUN,
        rank=rank,
        world_size=world,
        groups=[GroupInfo(name="0", lr=0.1)],
        policy=policy or plateau(),
        step=step,
    )
    return [encode(message)]


def batch(rank: int, records: list[tuple[int, str, dict]], seq: int = 1) -> list[bytes]:
    numbered = [(seq + i, step, kind, metrics) for i, (step, kind, metrics) in enumerate(records)]
    return BatchEncoder(RUN, rank).encode(numbered, {})


def step_and_report(step: int, val_loss: float) -> list[tuple[int, str, dict]]:
    return [(step, STEP, {"loss": 1.0}), (step, REPORT, {"val_loss": val_loss})]


@pytest.fixture
def make_plane(make_plane):
    """conftest's, with a short wait for silent ranks."""

    def make(state_dir: Path | None = None, **fields) -> DataPlane:
        where = {} if state_dir is None else {"state_dir": state_dir}
        return make_plane(**where, rank_wait_timeout=TIMEOUT, **fields)

    return make


def joined(plane: DataPlane, world: int = 2, policy: dict | None = None, step: int = 0) -> None:
    for rank in range(world):
        plane.handle(f"r{rank}".encode(), hello(rank, world, policy, step), 0.0)


def send(plane: DataPlane, rank: int, records, seq: int = 1, now: float = 0.0) -> list:
    return [
        (to, decode(frames))
        for to, frames in plane.handle(f"r{rank}".encode(), batch(rank, records, seq), now)
    ]


def stored(plane: DataPlane) -> list[tuple[int, str, dict]]:
    plane.flush()
    return list(plane.store.records(RUN))


@pytest.mark.parametrize(
    ("how", "want"), [("mean", 2.0), ("min", 1.0), ("max", 3.0), ("rank0", 1.0)]
)
def test_the_policy_decides_on_the_ranks_reduced_value_and_that_is_what_is_stored(
    make_plane, how, want
):
    plane = make_plane()
    joined(plane, policy=plateau(how))
    send(plane, 1, step_and_report(1, 3.0))
    send(plane, 0, step_and_report(1, 1.0))
    engine = plane.registry.runs[RUN].engine
    assert engine.policy.best == want
    assert stored(plane)[1] == (1, REPORT, {"val_loss": want})


def test_a_decision_waits_until_every_rank_has_sent_the_step(make_plane):
    plane = make_plane()
    joined(plane, world=3)
    run = plane.registry.runs[RUN]
    send(plane, 0, step_and_report(1, 1.0) + step_and_report(2, 5.0))  # 5.0: a cut, alone
    send(plane, 1, step_and_report(1, 1.0) + step_and_report(2, 5.0))
    # Step 1's record (no val_loss in it) went on; its report waits for rank 2.
    assert run.engine.step == 1 and run.engine.policy.best == math.inf
    out = send(plane, 2, step_and_report(1, 4.0) + step_and_report(2, 0.1))
    # mean 2.0 then mean 3.37: worse, patience 0, a cut; to all three ranks.
    cuts = [(to, m) for to, m in out if isinstance(m, LRCommand)]
    assert sorted(to for to, _ in cuts) == [b"r0", b"r1", b"r2"]
    assert {m.lrs[0] for _, m in cuts} == {0.05}
    assert [m["val_loss"] for _, kind, m in stored(plane) if kind == REPORT] == [
        2.0,
        pytest.approx(10.1 / 3),
    ]


def test_the_stored_stream_replays_to_the_decisions_the_live_run_made(make_plane):
    """What `lrpilot simulate` and a resume read is what the policy took."""
    plane = make_plane()
    joined(plane)
    values0 = [1.0, 0.9, 0.95, 0.7, 0.8, 0.85, 0.6]
    values1 = [1.2, 1.1, 0.8, 0.9, 1.0, 0.7, 0.9]
    seq = 1
    for step, (a, b) in enumerate(zip(values0, values1), start=1):
        send(plane, 1, step_and_report(step, b), seq=seq)
        send(plane, 0, step_and_report(step, a), seq=seq)
        seq += 2
    live = [(e["effective_step"], e["new_lrs"]) for e in plane.store.history(RUN)]
    assert live, "the mean got worse at least once: a cut"
    replay = PolicyEngine(RUN, parse_policy(plateau()), [0.1], lead_steps=1)
    replay.replay(stored(plane))
    assert (
        replay.state_row()["policy_state"]
        == plane.registry.runs[RUN].engine.state_row()["policy_state"]
    )
    assert replay.version == len(live)


def test_a_rank_silent_past_the_timeout_is_left_out_until_it_sends_again(make_plane, caplog):
    caplog.set_level("WARNING", logger="lrpilot.daemon")
    plane = make_plane()
    joined(plane)
    run = plane.registry.runs[RUN]
    send(plane, 1, step_and_report(1, 3.0))
    send(plane, 0, step_and_report(1, 1.0) + step_and_report(2, 1.0), now=10.0)
    assert run.ledger.seq == 3  # step 2's report waits for rank 1
    assert plane.due(10.0 + TIMEOUT - 0.1) == [] and run.ledger.seq == 3
    plane.due(10.0 + TIMEOUT)
    assert run.ledger.seq == 4
    assert "rank 1 sent nothing for 5s" in caplog.text
    assert run.rank_wait_timeouts == 1 and run.reduction.left_out() == [1]
    assert session_info(run.sessions[1], run).left_out is True
    assert summary(run).left_out == [1]
    # Left out: the next step does not wait for it.
    send(plane, 0, step_and_report(3, 1.0), seq=5, now=20.0)
    assert run.ledger.seq == 6
    # Back: waited for again from its next record on.
    send(plane, 1, step_and_report(4, 2.0), seq=3, now=21.0)
    assert run.reduction.left_out() == []
    send(plane, 0, step_and_report(4, 1.0), seq=7, now=21.0)
    assert run.engine.policy.best == 1.0  # (1.0 + 2.0) / 2 = 1.5 is no improvement
    assert [m for s, kind, m in stored(plane) if kind == REPORT and s == 4] == [{"val_loss": 1.5}]


def test_a_rank_that_does_not_report_the_metric_is_not_waited_for_past_its_step(make_plane):
    """Validation on rank 0 only: rank 1's next step says it has nothing for
    the report, which then goes on rank 0's value alone."""
    plane = make_plane()
    joined(plane)
    run = plane.registry.runs[RUN]
    send(plane, 0, step_and_report(1, 1.0))
    send(plane, 1, [(1, STEP, {"loss": 1.0})])
    assert run.engine.step == 1 and run.engine.policy.best == math.inf  # the report waits
    send(plane, 1, [(2, STEP, {"loss": 1.0})], seq=2)
    assert run.engine.policy.best == 1.0


def test_a_rank_that_ended_is_not_waited_for(make_plane):
    plane = make_plane()
    joined(plane)
    run = plane.registry.runs[RUN]
    send(plane, 0, step_and_report(1, 1.0))
    assert run.engine.policy.best == math.inf
    plane.registry.end_session(b"r1", 1.0)
    plane.due(1.0)
    assert run.engine.policy.best == 1.0


def test_another_ranks_records_are_persisted_once_the_records_they_fed_are(make_plane):
    plane = make_plane()
    joined(plane)
    send(plane, 1, step_and_report(1, 3.0) + step_and_report(2, 3.0))
    plane.flush()
    # Its first record (no val_loss) feeds nothing; its reports wait.
    assert {to: decode(f) for to, f in plane.persisted()} == {b"r1": Persisted(run=RUN, seq=1)}
    send(plane, 0, step_and_report(1, 1.0))
    plane.flush()
    told = {to: decode(frames) for to, frames in plane.persisted()}
    assert told == {b"r0": Persisted(run=RUN, seq=2), b"r1": Persisted(run=RUN, seq=3)}


def test_a_daemon_restarted_mid_wait_decides_as_the_uninterrupted_one(make_plane, tmp_path):
    """Nothing that waited is lost: neither rank was told its waiting records
    are persisted, so both send them again to the restarted daemon."""
    plane = make_plane(tmp_path / "a")
    joined(plane)
    send(plane, 0, step_and_report(1, 1.0) + step_and_report(2, 2.0))
    send(plane, 1, step_and_report(1, 3.0))
    plane.flush()  # step 1 is stored; step 2 waits for rank 1
    # Step 2's record went on (no val_loss in it); its report waits.
    told = {to: decode(frames).seq for to, frames in plane.persisted()}
    assert told == {b"r0": 3, b"r1": 2}
    plane.store.close()

    again = make_plane(tmp_path / "a")
    joined(again, step=2)  # the clients, at step 2, say hello to the new daemon
    send(again, 0, [(2, REPORT, {"val_loss": 2.0})], seq=4)  # what it was not told is persisted
    send(again, 1, step_and_report(2, 4.0), seq=3)
    assert [m["val_loss"] for _, kind, m in stored(again) if kind == REPORT] == [2.0, 3.0]
    assert [e["new_lrs"] for e in again.store.history(RUN)] == [[0.05]]


def test_a_non_finite_value_on_any_rank_is_what_the_policy_sees():
    assert math.isnan(reduce_values("mean", [1.0, math.nan]))
    assert math.isnan(reduce_values("min", [1.0, math.nan]))
    assert reduce_values("max", [1.0, math.inf]) == math.inf
    assert reduce_values("rank0", [1.0, math.nan]) == 1.0


def test_a_rank_far_ahead_keeps_a_bounded_backlog():
    reduction = RankReduction(TIMEOUT, 0)
    for step in range(1, 20_002):
        reduction.add(1, step, step, STEP, {"val_loss": 1.0}, {"val_loss": "mean"})
    assert len(reduction.ranks[1].values) == 10_000 and reduction.dropped == 10_001


def test_a_policy_switched_to_rank0_lets_what_waits_go(make_plane):
    plane = make_plane()
    joined(plane)
    run = plane.registry.runs[RUN]
    send(plane, 0, step_and_report(1, 1.0))
    assert run.engine.policy.best == math.inf
    run.engine.switch(parse_policy(plateau("rank0")), "switch", "op", lead=1)
    send(plane, 0, step_and_report(2, 1.0), seq=3)
    assert run.reduction is None and run.engine.step == 2


def test_records_of_a_driver_that_left_are_decided_on_when_the_others_come(make_plane):
    """The last steps of a job: rank 0 says bye before rank 1's last report
    is in; its records are decided on and stored with rank 1's value."""
    plane = make_plane()
    joined(plane)
    send(plane, 0, step_and_report(1, 1.0))
    plane.handle(b"r0", [encode(Bye(run=RUN, rank=0, step=1))], 0.1)
    send(plane, 1, step_and_report(1, 3.0), now=0.2)
    assert [m for _, kind, m in stored(plane) if kind == REPORT] == [{"val_loss": 2.0}]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    losses=st.lists(
        st.tuples(*(st.floats(0.1, 5.0, allow_nan=False) for _ in range(3))),
        min_size=1,
        max_size=12,
    ),
    batch_sizes=st.tuples(*(st.integers(1, 5) for _ in range(3))),
    order=st.randoms(use_true_random=False),
)
def test_what_is_decided_does_not_depend_on_how_the_ranks_batches_interleave(
    make_plane, tmp_path_factory, losses, batch_sizes, order
):
    """Three ranks' streams, cut in batches of any size and delivered in any
    order: the stored stream is each step's mean and the decisions are those
    of a replay of it."""
    plane = make_plane(tmp_path_factory.mktemp("interleave"))
    joined(plane, world=3)
    streams = []
    for rank in range(3):
        records = [
            r for step, values in enumerate(losses, 1) for r in step_and_report(step, values[rank])
        ]
        size = batch_sizes[rank] * 2
        streams.append([(rank, 1 + i, records[i : i + size]) for i in range(0, len(records), size)])
    while any(streams):
        rank = order.choice([r for r in range(3) if streams[r]])
        _, seq, records = streams[rank].pop(0)
        send(plane, rank, records, seq=seq)
    got = [(s, m["val_loss"]) for s, kind, m in stored(plane) if kind == REPORT]
    assert got == [(s, math.fsum(v) / 3) for s, v in enumerate(losses, 1)]
    replay = PolicyEngine(RUN, parse_policy(plateau()), [0.1])
    replay.replay(stored(plane))
    assert replay.version == plane.registry.runs[RUN].engine.version
    assert replay.policy.state_dict() == plane.registry.runs[RUN].engine.policy.state_dict()
