"""The daemon's data plane (daemon/dataplane.py) as pure logic: frames in,
replies out, no socket. What a restarted daemon does with batches that come
before their hello, and how bad input is counted."""

from __future__ import annotations

import math

from lrpilot.daemon.config import DaemonConfig
from lrpilot.daemon.dataplane import DataPlane
from lrpilot.protocol import (
    REPORT,
    STEP,
    BatchEncoder,
    Error,
    GroupInfo,
    Hello,
    LRCommand,
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


def replies(plane: DataPlane, identity: bytes, frames: list[bytes]) -> list:
    out = plane.handle(identity, frames, 0.0)
    assert all(to == identity for to, _ in out)
    return [decode(frames) for _, frames in out]


def test_batches_before_hello_wait_for_it_and_are_replayed():
    plane = DataPlane(DaemonConfig())
    encoder = BatchEncoder("back", 0)
    first = encoder.encode([(1, 1, STEP, {"loss": 1.0}), (2, 1, REPORT, {"val_loss": 1.0})], {})
    second = encoder.encode([(3, 2, STEP, {"loss": 1.0}), (4, 2, REPORT, {"val_loss": 2.0})], {})
    [error] = replies(plane, b"me", first)
    assert isinstance(error, Error)
    assert error.code == "unknown_session"
    assert replies(plane, b"me", second) == []  # asked once; it waits
    assert plane.records_ingested == 0
    # The client is at step 1 (it says hello late): records up to step 1 are
    # old news for the policy, but step 1's report belongs after it.
    got = replies(plane, b"me", hello("back", step=1))
    assert isinstance(got[0], Welcome)
    commands = [m for m in got if isinstance(m, LRCommand)]
    assert [c.lrs for c in commands] == [[0.05]]  # val_loss 1.0 then 2.0: patience 0 cuts
    assert plane.records_ingested == 4


def test_sync_session_gets_processed_with_the_last_seq():
    plane = DataPlane(DaemonConfig())
    replies(plane, b"s", hello("sync", sync=True))
    frames = BatchEncoder("sync", 0).encode(
        [(7, 1, STEP, {"loss": 1.0}), (8, 2, STEP, {"loss": 1.0}), (9, 2, REPORT, {})], {}
    )
    [processed] = replies(plane, b"s", frames)
    assert processed == Processed(run="sync", seq=9)


def test_bad_input_is_counted_by_reason():
    plane = DataPlane(DaemonConfig(max_message_bytes=2048))
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


def test_sweep_ends_silent_sessions():
    plane = DataPlane(DaemonConfig(silence_timeout=5.0))
    plane.handle(b"quiet", hello("quiet"), 0.0)
    plane.handle(b"loud", hello("loud"), 0.0)
    plane.handle(b"loud", BatchEncoder("loud", 0).encode([(1, 1, STEP, {})], {}), 4.0)
    plane.sweep(6.0)
    assert plane.sessions_of("quiet") == []
    assert [s.rank for s in plane.sessions_of("loud")] == [0]
    assert plane.registry.runs["quiet"].ended == 6.0


def test_welcome_does_not_duplicate_a_replayed_decision():
    """A restarted daemon gets a client's parked batches, then its hello: the
    replay decides a cut (command v1). The client said it applied nothing and
    the daemon took the client's state, so the welcome has nothing to add."""
    plane = DataPlane(DaemonConfig())
    frames = BatchEncoder("dup", 0).encode(
        [
            (1, 1, STEP, {}),
            (2, 1, REPORT, {"val_loss": 1.0}),
            (3, 2, STEP, {}),
            (4, 2, REPORT, {"val_loss": 2.0}),
        ],
        {},
    )
    replies(plane, b"me", frames)
    got = replies(plane, b"me", hello("dup", step=1))
    commands = [m for m in got if isinstance(m, LRCommand)]
    welcome = got[0]
    assert isinstance(welcome, Welcome)
    versions = [c.version for c in commands]
    if welcome.command is not None:
        versions.append(welcome.command.version)
    # One decision, one version, said once, with the policy's reason.
    assert versions == [1]
    assert commands[0].actor == "policy"
