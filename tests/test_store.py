"""The daemon's store (daemon/service/store.py) on real SQLite files in tmp dirs:
schema version and migrations, the journal, snapshots, the recorded stream
and its truncation when a run resumes from a checkpoint, WAL mode; and its
faults: an op that fails alone, a full disk and its return, a runs row the
daemon cannot use, a damaged file."""

from __future__ import annotations

import contextlib
import math
import shutil
import sqlite3
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import mounted_tmpfs

from lrpilot.daemon.service.records import BATCH_READERS, UnreadableBatch, read_records
from lrpilot.daemon.service.schema import (
    DB_NAME,
    MIGRATIONS,
    SCHEMA_VERSION,
    StoreError,
    open_readonly,
)
from lrpilot.daemon.service.store import DROP_REASONS, Store, StoreWriteError
from lrpilot.daemon.service.store_ops import (
    PRUNE_EVERY,
    SNAPSHOT_SPACING,
    SNAPSHOTS_KEPT,
    upsert_run,
)
from lrpilot.protocol import PROTOCOL_VERSION, REPORT, STEP, BatchEncoder, LRCommand

PLATEAU = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}
TABLES = {"runs", "journal", "snapshots", "batches", "quarantine"}


@pytest.fixture
def opened(tmp_path: Path) -> Iterator:
    """Store(dir), closed at the end of the test."""
    stores: list[Store] = []

    def open_store(
        state_dir: Path = tmp_path / "state", durability: str = "normal", **options
    ) -> Store:
        store = Store(state_dir, durability, **options)
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        if store._writer.is_alive():
            store.close()


def pragma(path: Path, name: str):
    db = sqlite3.connect(path)
    try:
        return db.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        db.close()


def tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


def run_row(run_id: str, step: int, **changes) -> dict:
    row = {
        "run_id": run_id,
        "created": 1000.0,
        "updated": 1000.0 + step,
        "ended": None,
        "group_names": ["body", "head"],
        "base_lrs": [0.1, 0.01],
        "world_size": 1,
        "requested_policy": PLATEAU,
        "policy": PLATEAU,
        "policy_base_lrs": [0.1, 0.01],
        "policy_state": {"best": math.inf, "num_bad_epochs": step % 3, "last_epoch": step},
        "step": step,
        "driver": "c0ffee",
        "seq": 2 * step,
        "stored_seq": 2 * step,
        "rev": step + 1,
        "version": step // 10,
        "lrs": [0.1, 0.01],
        "held": None,
    }
    return {**row, **changes}


def command(version: int, **changes) -> LRCommand:
    fields = {
        "run": "r",
        "version": version,
        "effective_step": 10 * version + 1,
        "state_step": 10 * version,
        "lrs": [0.1 / 2**version, 0.01 / 2**version],
        "policy": None,
        "hold": False,
        "reason": f"plateau cut {version}",
        "actor": "policy",
    }
    return LRCommand(**{**fields, **changes})


def batch(run: str, records: list[tuple[int, int, str, dict]], skip: int = 0) -> tuple:
    """A metrics batch as the data plane hands it to the store."""
    header, body = BatchEncoder(run, 0).encode(records, {})
    return (run, records[skip][1], records[-1][1], header, body, skip)


def steps_of(store: Store, run: str, **bounds) -> list[tuple[int, str, dict]]:
    return list(store.records(run, **bounds))


# --- schema ------------------------------------------------------------------


def test_a_fresh_store_has_the_current_schema_version(opened, tmp_path):
    store = opened()
    assert store.path == tmp_path / "state" / DB_NAME
    assert SCHEMA_VERSION >= 1
    assert pragma(store.path, "user_version") == SCHEMA_VERSION
    assert tables(store.path) >= TABLES


def test_a_store_from_a_newer_lrpilot_is_refused_naming_both_versions(opened, tmp_path):
    state = tmp_path / "newer"
    state.mkdir()
    db = sqlite3.connect(state / DB_NAME)
    db.execute("CREATE TABLE future (x)")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError) as refused:
        opened(state)
    message = str(refused.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"up to {SCHEMA_VERSION}" in message
    # Left as it was: nothing migrated "down", nothing added.
    assert pragma(state / DB_NAME, "user_version") == SCHEMA_VERSION + 1
    assert tables(state / DB_NAME) == {"future"}


def test_a_state_dir_that_cannot_be_made_is_a_store_error(opened, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the store"):
        opened(blocker / "state")


def test_opening_a_store_again_is_idempotent(opened, tmp_path):
    first = opened()
    first.save_run(run_row("r", 5))
    first.journal("r", command(1), [0.1, 0.01])
    first.close()
    schema = tables(first.path)
    again = opened()
    assert pragma(again.path, "user_version") == SCHEMA_VERSION
    assert tables(again.path) == schema
    assert [r["run_id"] for r in again.load_runs()] == ["r"]
    assert [e["version"] for e in again.history("r")] == [1]
    # A second open while one is open (the daemon and a reader) is fine too.
    third = opened()
    assert [r["run_id"] for r in third.load_runs()] == ["r"]


def test_the_store_is_in_wal_mode(opened, tmp_path):
    store = opened()
    assert pragma(store.path, "journal_mode") == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    full = opened(tmp_path / "full", durability="full")
    assert full._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


# --- runs and the journal ------------------------------------------------------


def test_a_run_row_round_trips_with_its_infinities(opened):
    store = opened()
    row = run_row("r", 7, held=[0.5, 0.05], ended=1234.5)
    store.save_run(row)
    [loaded] = store.load_runs()
    assert loaded == row
    assert loaded["policy_state"]["best"] == math.inf


def test_journal_rows_round_trip(opened):
    store = opened()
    switch = {"kind": "cosine", "T_max": 100, "eta_min": 0.0}
    before = time.time()
    store.journal("r", command(1), [0.1, 0.01])
    store.journal(
        "r",
        command(2, policy=switch, hold=True, actor="ann@box", reason="set-lr 0.5"),
        [0.05, 0.005],
    )
    first, second = store.history("r")
    assert before <= first["time"] <= second["time"] <= time.time()
    assert {k: v for k, v in first.items() if k not in ("id", "time")} == {
        "run_id": "r",
        "version": 1,
        "effective_step": 11,
        "state_step": 10,
        "old_lrs": [0.1, 0.01],
        "new_lrs": [0.05, 0.005],
        "reason": "plateau cut 1",
        "actor": "policy",
        "policy": None,
        "hold": 0,
        "applied_step": None,
        "late": None,
        "policy_state": None,
    }
    assert (second["policy"], second["hold"], second["actor"]) == (switch, 1, "ann@box")
    # The driving rank's ack fills in where it landed, once.
    store.submit([("applied", ("r", 2, 23, True))])
    store.submit([("applied", ("r", 2, 99, False))])
    assert store.wait()
    assert [(e["applied_step"], e["late"]) for e in store.history("r")] == [(None, None), (23, 1)]


def test_the_journal_keeps_the_policy_state_of_each_change(opened):
    # What a decision saw and made (a range test's curve) is in its entry.
    store = opened()
    state = {"curve_lrs": [1e-5, 1e-4], "curve_losses": [2.3, 2.1], "best": math.inf}
    store.journal("r", command(1, policy_state=state), [0.1, 0.01])
    [entry] = store.history("r")
    assert entry["policy_state"] == state


def test_history_keeps_the_last_entries_in_version_order(opened):
    store = opened()
    for version in range(1, 6):
        store.journal("r", command(version), [0.1, 0.01])
        store.journal("other", command(version, run="other"), [0.1, 0.01])
    assert [e["version"] for e in store.history("r")] == [1, 2, 3, 4, 5]
    assert [e["version"] for e in store.history("r", limit=2)] == [4, 5]
    assert [e["version"] for e in store.history("r", limit=50)] == [1, 2, 3, 4, 5]
    assert {e["run_id"] for e in store.history("r")} == {"r"}
    assert store.history("nobody") == []


# --- snapshots and the recorded stream --------------------------------------


def test_snapshot_at_picks_the_newest_at_or_before_the_step(opened):
    store = opened()
    store.submit([("run", run_row("r", 10)), ("run", run_row("other", 15))])
    store.submit([("run", run_row("r", 20))])
    store.submit([("run", run_row("r", 20, version=9)), ("run", run_row("r", 30))])
    assert store.wait()
    assert store.snapshot_at("r", 5) is None
    assert store.snapshot_at("r", 10)["step"] == 10
    assert store.snapshot_at("r", 19)["step"] == 10
    # Two at the same step: the later one.
    assert (store.snapshot_at("r", 29)["step"], store.snapshot_at("r", 29)["version"]) == (20, 9)
    snapshot = store.snapshot_at("r", 1000)
    assert snapshot["step"] == 30
    assert snapshot["policy"] == PLATEAU
    assert snapshot["policy_state"] == run_row("r", 30)["policy_state"]
    assert snapshot["seq"] == 60
    # The runs table holds the latest state, the snapshot history aside.
    latest = sorted((r["run_id"], r["step"]) for r in store.load_runs())
    assert latest == [("other", 15), ("r", 30)]


def records(first_seq: int, steps: range, value: float = 1.0) -> list:
    """(seq, step, kind, metrics): a step record and a report for each step."""
    out, seq = [], first_seq
    for step in steps:
        out.append((seq, step, STEP, {"loss": value * step}))
        out.append((seq + 1, step, REPORT, {"val_loss": value}))
        seq += 2
    return out


def test_the_recorded_stream_reads_back_in_order_within_bounds(opened):
    store = opened()
    store.submit([("batches", [batch("r", records(1, range(1, 4)))])])
    # A batch the client sent again, two records of which were folded in before.
    store.submit([("batches", [batch("r", records(5, range(3, 6)), skip=2)])])
    store.submit([("batches", [batch("other", records(1, range(1, 9)))])])
    assert store.wait()
    got = steps_of(store, "r")
    assert [(step, kind) for step, kind, _ in got] == [
        (s, k) for s in range(1, 6) for k in (STEP, REPORT)
    ]
    assert got[0] == (1, STEP, {"loss": 1.0})
    assert [step for step, _, _ in steps_of(store, "r", after=2, until=4)] == [3, 3, 4, 4]
    # A reader of its own (the command line) sees the same.
    reader = open_readonly(store.path)
    try:
        assert list(read_records(reader, "r")) == got
    finally:
        reader.close()


# A protocol-1 batch as an lrpilot of that protocol stored it: the header as
# the wire carried it (with fields a later reader does not need), the body
# packed. Written out literally so that no change to lrpilot.protocol can
# make this test write what it reads.
V1_HEADER = (
    '{"v":1,"t":"metrics","run":"old","rank":0,"first_seq":7,'
    '"shapes":[["s",["loss"]],["r",["val_loss","acc"]]],"blocks":[[0,2],[1,1]],'
    '"stats":{"records_dropped":0}}'
)
V1_BODY = (
    struct.pack("<qd", 1, 0.5) + struct.pack("<qd", 2, 0.25) + struct.pack("<qdd", 2, 1.5, 0.75)
)


def insert_batch(path: Path, wire: int | None) -> None:
    db = sqlite3.connect(path)
    columns = "run_id, first_step, last_step, header, body, skip" + (", wire" if wire else "")
    values = ["old", 1, 2, V1_HEADER, V1_BODY, 0] + ([wire] if wire else [])
    with db:
        db.execute(
            f"INSERT INTO batches ({columns}) VALUES ({', '.join('?' * len(values))})", values
        )
    db.close()


def test_every_wire_protocol_version_has_a_stored_batch_reader():
    """The daemon stores batches in the current protocol: the store must read
    them back the day the protocol moves on (add a reader, keep the old)."""
    assert PROTOCOL_VERSION in BATCH_READERS and 1 in BATCH_READERS


def test_a_store_from_before_the_wire_column_reads_its_batches_as_protocol_1(opened, tmp_path):
    """A schema-2 store (no ``wire`` column) is migrated on open, and its
    batches read with the protocol-1 reader, not today's models."""
    path = tmp_path / "old" / DB_NAME
    path.parent.mkdir()
    db = sqlite3.connect(path)
    for migration in MIGRATIONS[:2]:
        db.executescript(migration)
    db.execute("PRAGMA user_version=2")
    db.close()
    insert_batch(path, wire=None)
    store = opened(path.parent)
    assert pragma(path, "user_version") == SCHEMA_VERSION
    assert steps_of(store, "old") == [
        (1, STEP, {"loss": 0.5}),
        (2, STEP, {"loss": 0.25}),
        (2, REPORT, {"val_loss": 1.5, "acc": 0.75}),
    ]


def test_a_batch_of_an_unknown_protocol_is_refused_in_one_line(opened):
    store = opened()
    store.close()
    insert_batch(store.path, wire=99)
    reader = open_readonly(store.path)
    with pytest.raises(UnreadableBatch, match="wire protocol 99; this lrpilot reads 1") as caught:
        list(read_records(reader, "old"))
    assert "\n" not in str(caught.value)


def test_old_snapshots_thin_out_to_one_per_thousand_steps(opened):
    """Ticks land on any step: a resume far back still finds a snapshot about
    SNAPSHOT_SPACING steps back at most, and the newest SNAPSHOTS_KEPT stay."""
    store = opened()
    steps = range(7, 7 * 1500, 7)  # a multiple of 1000 only at 7000
    for step in steps:
        store.submit([("run", run_row("r", step))])
    assert store.wait()
    kept = [s for (s,) in store._db.execute("SELECT step FROM snapshots WHERE run_id = 'r'")]
    newest = list(steps)[-SNAPSHOTS_KEPT:]
    assert set(newest) <= set(kept)
    # Pruned at every PRUNE_EVERY-th row of the run: a few more between two.
    assert len(kept) <= SNAPSHOTS_KEPT + len(steps) * 7 // SNAPSHOT_SPACING + PRUNE_EVERY
    for resume_at in (1500, 2999, 6001, 8000):
        # Within the spacing plus the steps between two ticks (7 here).
        assert resume_at - store.snapshot_at("r", resume_at)["step"] <= SNAPSHOT_SPACING + 7


def test_truncate_drops_the_records_and_snapshots_after_the_step(opened):
    store = opened()
    store.submit(
        [
            ("batches", [batch("r", records(1, range(1, 4)))]),
            ("batches", [batch("r", records(7, range(4, 8)))]),  # across the cut
            ("batches", [batch("r", records(15, range(8, 11)))]),
            ("batches", [batch("other", records(1, range(1, 11)))]),
        ]
        + [("run", run_row("r", step)) for step in (3, 6, 9)]
        + [("run", run_row("other", 9))]
    )
    store.submit([("truncate", ("r", 5))])
    assert store.wait()
    assert [step for step, _, _ in steps_of(store, "r")] == [s for s in range(1, 6) for _ in "sr"]
    assert store.snapshot_at("r", 100)["step"] == 3
    # Other runs keep theirs.
    assert len(steps_of(store, "other")) == 20
    assert store.snapshot_at("other", 100)["step"] == 9


def test_a_second_truncate_does_not_bring_back_an_abandoned_timeline(opened):
    store = opened()
    # Timeline A: steps 1..10 in one batch; a resume at step 5 abandons 6..10.
    store.submit([("batches", [batch("r", records(1, range(1, 11), value=1.0))])])
    store.submit([("truncate", ("r", 5))])
    # Timeline B goes on from 5 to 12; a resume at step 8 abandons B's 9..12.
    store.submit([("batches", [batch("r", records(1, range(6, 13), value=2.0))])])
    store.submit([("truncate", ("r", 8))])
    assert store.wait()
    got = [(step, metrics) for step, kind, metrics in steps_of(store, "r") if kind == REPORT]
    assert got == [(s, {"val_loss": 1.0}) for s in range(1, 6)] + [
        (s, {"val_loss": 2.0}) for s in range(6, 9)
    ]


# --- a store that fails -------------------------------------------------------


def break_store(path: Path) -> None:
    """What an old store (same version, other tables) or a damaged file gives:
    the table the records go to is not there."""
    db = sqlite3.connect(path)
    db.execute("DROP TABLE batches")
    db.close()


def test_a_store_that_takes_no_writes_says_so_and_keeps_the_batch(opened, caplog):
    store = opened()
    break_store(store.path)
    tick = [("batches", [batch("r", records(1, range(1, 3)))])]
    with caplog.at_level("WARNING"):
        store.submit(tick, notice={b"client": ("r", 4)})
        assert not store.wait(timeout=5)  # tried, and kept
    assert store.error is not None and str(store.path) in store.error
    assert "no such table: batches" in store.error
    assert "no such table: batches" in caplog.text
    assert store.failed_commits >= 1 and store.backlog_batches == 1
    assert store.committed.empty()  # nobody is told it is persisted
    # Mended: the batch goes in, and only then is its client told.
    db = sqlite3.connect(store.path)
    db.execute(next(sql for sql in MIGRATIONS[0].split(";") if "CREATE TABLE batches" in sql))
    db.execute(next(sql for sql in MIGRATIONS[2].split(";") if "batches" in sql))
    db.close()
    assert store.wait(timeout=5)
    assert store.error is None and store.backlog_batches == 0
    assert len(steps_of(store, "r")) == 4
    assert store.committed.get_nowait() == {b"client": ("r", 4)}


def test_the_writer_outlives_a_batch_it_cannot_write(opened, caplog):
    """Not only SQLite errors: a bad row loses its own op, not the writer."""
    store = opened()
    with caplog.at_level("WARNING"):
        store.submit([("run", {"run_id": "broken"})])  # no columns: a KeyError
        assert store.wait(timeout=5)
    assert store.dropped == {"bad_op": 1}
    assert "run broken" in caplog.text
    store.submit([("run", run_row("r", 5))])
    assert store.wait(timeout=5)
    assert [r["run_id"] for r in store.load_runs()] == ["r"]
    assert store.error is None


def test_a_failed_save_leaves_the_journal_writable(opened):
    """A write that fails on the loop's connection is rolled back, so the
    next journal entry does not trip on a transaction left open."""
    store = opened()
    db = sqlite3.connect(store.path)
    db.execute("DROP TABLE snapshots")
    db.close()
    with pytest.raises(StoreWriteError, match="snapshots") as failed:
        store.save_run(run_row("r", 5))
    assert "run r's state" in str(failed.value) and str(store.path) in str(failed.value)
    store.journal("r", command(1), [0.1, 0.01])
    assert [e["version"] for e in store.history("r")] == [1]


# --- one bad op fails alone --------------------------------------------------


def bad_seq(run: str) -> list:
    """The run's row with a seq SQLite cannot hold (a client's first_seq 2**70)."""
    return [("run", run_row(run, 5, seq=2**70, stored_seq=2**70))]


def bad_skip(run: str) -> list:
    run_id, first, last, header, body, _ = batch(run, records(1, range(1, 3)))
    return [("batches", [(run_id, first, last, header, body, 2**70)])]


def bad_constraint(run: str) -> list:
    return [("run", run_row(run, 5, created=None))]  # runs.created is NOT NULL


@pytest.mark.parametrize(
    ("bad_ops", "reason"),
    [(bad_seq, "out_of_range"), (bad_skip, "out_of_range"), (bad_constraint, "constraint")],
)
def test_a_bad_op_of_one_run_keeps_no_other_runs_data_out(opened, caplog, bad_ops, reason):
    store = opened()
    # One tick's batch, as the data plane hands it over: both runs' records
    # in one op, each run's row, and who to tell when it is committed.
    tick = [
        (
            "batches",
            [batch("good", records(1, range(1, 4))), batch("bad", records(1, range(1, 4)))],
        ),
        ("run", run_row("good", 3)),
        ("run", run_row("bad", 3)),
        *bad_ops("bad"),
    ]
    with caplog.at_level("ERROR"):
        store.submit(tick, notice={b"g": ("good", 6), b"b": ("bad", 6)})
        assert store.wait(timeout=5)
    # The good run is all in; the bad run's ops of that batch went together
    # (its row must not count records the store lacks), and are counted.
    assert len(steps_of(store, "good")) == 6
    assert store.snapshot_at("good", 100)["step"] == 3
    assert steps_of(store, "bad") == []
    assert [r["run_id"] for r in store.load_runs()] == ["good"]
    assert store.dropped[reason] >= 1 and set(store.dropped) <= set(DROP_REASONS)
    assert store.error is None
    assert "run bad" in caplog.text and "run good" not in caplog.text
    # Only the good run's client hears that its records are persisted.
    assert store.committed.get_nowait() == {b"g": ("good", 6)}
    # The bad run's next batch, fine this time, goes in.
    store.submit([("batches", [batch("bad", records(7, range(4, 6)))]), ("run", run_row("bad", 5))])
    assert store.wait(timeout=5)
    assert [step for step, _, _ in steps_of(store, "bad")] == [4, 4, 5, 5]


def test_an_op_failure_is_logged_once_per_run_and_error(opened, caplog):
    store = opened()
    with caplog.at_level("ERROR"):
        for _ in range(5):
            store.submit(bad_seq("bad"))
            assert store.wait(timeout=5)
    assert store.dropped["out_of_range"] == 5
    assert len(caplog.records) == 1, caplog.text


def test_the_loop_is_told_which_value_the_store_cannot_hold(opened):
    store = opened()
    with pytest.raises(StoreWriteError, match="version 1180591620717411303424"):
        # (model_copy: the protocol itself refuses such a version)
        store.journal("r", command(1).model_copy(update={"version": 2**70}), [0.1, 0.01])
    store.journal("r", command(1), [0.1, 0.01])
    assert [e["version"] for e in store.history("r")] == [1]


# --- a full disk, and its return -----------------------------------------------


class FullDisk:
    """SQLite's own limit as a disk that fills: once fill() is called, every
    store connection opened in the test fails with SQLITE_FULL ('database
    or disk is full') as soon as the file would grow, as on a full disk,
    until free(). (The connections are opened thread-free so that the test
    can set the limit on the writer's.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.connections: list[sqlite3.Connection] = []
        real = sqlite3.connect

        def connect(*args, **kwargs) -> sqlite3.Connection:
            db = real(*args, **{**kwargs, "check_same_thread": False})
            self.connections.append(db)
            return db

        monkeypatch.setattr(sqlite3, "connect", connect)

    def _limit(self, pages: str) -> None:
        for db in self.connections:
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed
                db.execute(f"PRAGMA max_page_count = {pages}")

    def fill(self) -> None:
        self._limit("1")  # raised by SQLite to the pages the file has now

    def free(self) -> None:
        self._limit(str(2**31))


@pytest.fixture
def disk(monkeypatch) -> FullDisk:
    return FullDisk(monkeypatch)


WIDE = {f"m{i}": float(i) for i in range(200)}


def wide_batch(run: str, tick: int) -> tuple:
    """A tick's records of a run, about 8 KB: steps 5k-4..5k, 200 metrics a step."""
    steps = range(5 * tick - 4, 5 * tick + 1)
    return batch(run, [(step, step, STEP, WIDE) for step in steps])


def tick_ops(tick: int) -> list:
    return [
        ("batches", [wide_batch("a", tick), wide_batch("b", tick)]),
        ("run", run_row("a", 5 * tick)),
        ("run", run_row("b", 5 * tick)),
    ]


def test_a_full_disk_loses_nothing_once_it_has_room_again(opened, disk, caplog):
    store = opened()
    store.save_run(run_row("a", 0))
    store.save_run(run_row("b", 0))
    disk.fill()
    ticks = range(1, 9)
    notices = [{b"a": ("a", 5 * t), b"b": ("b", 5 * t)} for t in ticks]
    with caplog.at_level("WARNING"):
        for t in ticks:
            store.submit(tick_ops(t), notice=notices[t - 1])
        assert not store.wait(timeout=5)
        assert store.error is not None
        assert "database or disk is full" in store.error and str(store.path) in store.error
        assert store.backlog_batches == len(ticks) and store.backlog_bytes > 8 * 8000
        health = store.health()  # what the daemon exports and /healthz answers
        assert health["error"] == store.error and health["backlog_batches"] == len(ticks)
        assert store.committed.empty() and steps_of(store, "a") == []
        # The loop's own writes fail too, saying why, and leave nothing behind.
        with pytest.raises(StoreWriteError, match="disk is full"):
            store.journal("a", command(1, reason="x" * 100_000), [0.1, 0.01])
        assert store.history("a") == []
        # Room again: the writer finds out by itself (it tries every RETRY_S).
        disk.free()
        deadline = time.monotonic() + 10
        while store.error is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert store.error is None, store.error
    assert store.wait(timeout=5) and store.backlog_batches == 0
    assert "takes writes again" in caplog.text
    # Every record and snapshot, once, in order; every client told, in order.
    steps = [s for t in ticks for s in range(5 * t - 4, 5 * t + 1)]
    for run in ("a", "b"):
        assert [step for step, _, _ in steps_of(store, run)] == steps
        snapshots = store._db.execute(
            "SELECT step FROM snapshots WHERE run_id = ? ORDER BY rowid", (run,)
        )
        assert [step for (step,) in snapshots] == [0] + [5 * t for t in ticks]
    assert sorted((r["run_id"], r["step"]) for r in store.load_runs()) == [("a", 40), ("b", 40)]
    assert [store.committed.get_nowait() for _ in ticks] == notices
    store.journal("a", command(1), [0.1, 0.01])
    assert [e["version"] for e in store.history("a")] == [1]


def test_what_waits_for_a_full_disk_is_bounded_records_first(opened, disk):
    """Past backlog_bytes the oldest records go, then run rows a newer one
    supersedes; the journal marks and each run's newest row stay."""
    store = opened(backlog_bytes=40_000)
    store.save_run(run_row("a", 0))
    store.journal("a", command(1), [0.1, 0.01])
    disk.fill()
    for t in range(1, 21):
        ops = [("batches", [wide_batch("a", t)]), ("run", run_row("a", 5 * t))]
        if t == 10:
            ops.append(("applied", ("a", 1, 11, False)))
        store.submit(ops)
    assert not store.wait(timeout=5)
    assert 0 < store.backlog_bytes <= 40_000
    assert store.dropped["backlog_full"] > 0
    disk.free()
    assert store.wait(timeout=5)
    kept = sorted({step for step, _, _ in steps_of(store, "a")})
    assert kept and kept == list(range(kept[0], 101)) and kept[0] > 1  # the newest, no gap
    assert [r["step"] for r in store.load_runs()] == [100]
    assert [e["applied_step"] for e in store.history("a")] == [11]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up (root and `mount` needed)."""
    with mounted_tmpfs(tmp_path / "tiny", "1m") as where:
        yield where


def test_a_really_full_disk_keeps_the_records_until_it_has_room(tiny_disk, opened):
    store = opened(tiny_disk / "state")
    ticks = 0
    while store.error is None and ticks < 400:
        ticks += 1
        store.submit([("batches", [wide_batch("a", ticks)]), ("run", run_row("a", 5 * ticks))])
        store.wait(timeout=5)
    assert store.error is not None and str(store.path) in store.error, ticks
    with pytest.raises(StoreWriteError):
        store.journal("a", command(1, reason="x" * 100_000), [0.1, 0.01])
    remount = ["mount", "-o", "remount,size=64m", str(tiny_disk)]
    subprocess.run(remount, check=True, capture_output=True)
    assert store.wait(timeout=10), store.error
    assert [step for step, _, _ in steps_of(store, "a")] == list(range(1, 5 * ticks + 1))
    assert store.snapshot_at("a", 10**9)["step"] == 5 * ticks
    store.close()


# --- a store that does not open as it was --------------------------------------


def test_runs_rows_the_daemon_cannot_use_are_quarantined_and_the_others_load(opened, caplog):
    store = opened()
    for run in ("a", "b", "c", "d"):
        store.save_run(run_row(run, 5))
    store.close()
    db = sqlite3.connect(store.path)
    db.execute("UPDATE runs SET policy_state = '{\"best\": ' WHERE run_id = 'b'")
    db.execute("UPDATE runs SET world_size = 'many' WHERE run_id = 'c'")
    db.commit()
    db.close()
    with caplog.at_level("WARNING"):
        again = opened()
        assert [r["run_id"] for r in again.load_runs()] == ["a", "d"]
    assert again.quarantined == ["b", "c"]
    for run, why in (("b", "policy_state is not JSON"), ("c", "world_size is 'many'")):
        assert f"run {run}'s row" in caplog.text and why in caplog.text
    assert str(again.path) in caplog.text
    kept = again._db.execute("SELECT run_id, row, reason FROM quarantine ORDER BY run_id")
    [(b, b_row, b_why), (c, _, c_why)] = kept.fetchall()
    assert (b, c) == ("b", "c") and "not JSON" in b_why and "an integer" in c_why
    assert '\\"best\\": ' in b_row  # the row as it was
    # Their history stays; the next start has nothing left to say.
    assert again.snapshot_at("b", 100)["step"] == 5
    again.close()
    third = opened()
    assert [r["run_id"] for r in third.load_runs()] == ["a", "d"] and third.quarantined == []


def test_the_daemon_can_quarantine_a_run_it_cannot_build(opened):
    store = opened()
    store.save_run(run_row("a", 5))
    store.save_run(run_row("b", 5, policy={"kind": "no-such-kind"}))
    store.journal("b", command(1, run="b"), [0.1, 0.01])
    store.quarantine("b", "policy: unknown kind 'no-such-kind'")
    assert [r["run_id"] for r in store.load_runs()] == ["a"]
    assert store.quarantined == ["b"]
    assert [e["version"] for e in store.history("b")] == [1]  # its journal stays
    store.quarantine("nobody", "no such run")  # nothing to do
    assert store.quarantined == ["b"]


def test_a_version_1_store_is_upgraded_with_its_runs(opened, tmp_path):
    state = tmp_path / "v1"
    state.mkdir()
    db = sqlite3.connect(state / DB_NAME)
    db.executescript(MIGRATIONS[0])
    db.execute(*upsert_run(run_row("r", 5)))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = opened(state)
    assert pragma(store.path, "user_version") == SCHEMA_VERSION
    assert tables(store.path) >= TABLES
    assert [r["run_id"] for r in store.load_runs()] == ["r"]


def test_damaged_pages_are_reported_at_open_naming_the_file(opened, tmp_path, caplog):
    store = opened()
    store.save_run(run_row("r", 5))
    for t in range(1, 61):
        store.submit([("batches", [wide_batch("r", t)])])
    assert store.wait()
    store.close()
    assert not Path(f"{store.path}-wal").exists()  # all of it in the file
    damaged = tmp_path / "damaged" / DB_NAME
    damaged.parent.mkdir()
    shutil.copy(store.path, damaged)
    page = pragma(store.path, "page_size")
    pages = damaged.stat().st_size // page
    with damaged.open("r+b") as f:  # the records' pages, late in the file
        for number in range(pages * 2 // 3, pages * 2 // 3 + 4):
            f.seek(number * page)
            f.write(b"\xde\xad\xbe\xef" * (page // 4))
    assert opened().check_problems == []  # the original is fine
    with caplog.at_level("WARNING"):
        again = opened(damaged.parent)
    assert again.check_problems
    assert str(damaged) in caplog.text and "quick_check" in caplog.text
    assert again.check_problems[0] in caplog.text
    # The daemon starts with what it can read.
    assert [r["run_id"] for r in again.load_runs()] == ["r"]


def test_a_file_that_is_not_a_store_is_refused_naming_it(opened, tmp_path):
    state = tmp_path / "garbage"
    state.mkdir()
    (state / DB_NAME).write_bytes(b"not an SQLite file " * 1000)
    with pytest.raises(StoreError) as refused:
        opened(state)
    assert str(state / DB_NAME) in str(refused.value)
    assert "not a database" in str(refused.value)


def test_simulate_from_run_on_an_unreadable_store_is_one_line(opened, lrpilot_exe):
    store = opened()
    store.save_run(run_row("r", 5))
    store.close()
    break_store(store.path)
    done = subprocess.run(
        [
            lrpilot_exe,
            "simulate",
            "--from-run",
            "r",
            "--policy",
            '{"kind": "exponential", "gamma": 0.9}',
            "--state-dir",
            str(store.path.parent),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("lrpilot simulate: ")
