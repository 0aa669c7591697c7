"""The daemon's store (daemon/store.py) on real SQLite files in tmp dirs:
schema version and migrations, the journal, snapshots, the recorded stream
and its truncation when a run resumes from a checkpoint, WAL mode."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrpilot.daemon.store import (
    DB_NAME,
    SCHEMA_VERSION,
    SNAPSHOT_SPACING,
    SNAPSHOTS_KEPT,
    Store,
    StoreError,
    open_readonly,
    read_records,
)
from lrpilot.protocol import REPORT, STEP, BatchEncoder, LRCommand

PLATEAU = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}
TABLES = {"runs", "journal", "snapshots", "batches"}


@pytest.fixture
def opened(tmp_path: Path) -> Iterator:
    """Store(dir), closed at the end of the test."""
    stores: list[Store] = []

    def open_store(state_dir: Path = tmp_path / "state", durability: str = "normal") -> Store:
        store = Store(state_dir, durability)
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
    }
    assert (second["policy"], second["hold"], second["actor"]) == (switch, 1, "ann@box")
    # The driving rank's ack fills in where it landed, once.
    store.submit([("applied", ("r", 2, 23, True))])
    store.submit([("applied", ("r", 2, 99, False))])
    assert store.wait()
    assert [(e["applied_step"], e["late"]) for e in store.history("r")] == [(None, None), (23, 1)]


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
    assert len(kept) <= SNAPSHOTS_KEPT + len(steps) * 7 // SNAPSHOT_SPACING + 1
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


def test_a_failed_commit_is_logged(opened, caplog):
    store = opened()
    break_store(store.path)
    with caplog.at_level("WARNING"):
        store.submit([("batches", [batch("r", records(1, range(1, 3)))])])
        assert store.wait(timeout=2)
        assert store.write_errors == 1
        assert any(r.levelname in ("WARNING", "ERROR") for r in caplog.records), caplog.text


def test_the_writer_outlives_a_batch_it_cannot_write(opened, caplog):
    """Not only SQLite errors: a bad row loses its batch, not the writer."""
    store = opened()
    with caplog.at_level("WARNING"):
        store.submit([("run", {"run_id": "broken"})])  # no columns: a KeyError
        assert store.wait(timeout=5)
    assert store.write_errors == 1
    store.submit([("run", run_row("r", 5))])
    assert store.wait(timeout=5)
    assert [r["run_id"] for r in store.load_runs()] == ["r"]


def test_a_failed_save_leaves_the_journal_writable(opened):
    """A write that fails on the loop's connection is rolled back, so the
    next journal entry does not trip on a transaction left open."""
    store = opened()
    db = sqlite3.connect(store.path)
    db.execute("DROP TABLE snapshots")
    db.close()
    with pytest.raises(sqlite3.OperationalError, match="snapshots"):
        store.save_run(run_row("r", 5))
    store.journal("r", command(1), [0.1, 0.01])
    assert [e["version"] for e in store.history("r")] == [1]


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
