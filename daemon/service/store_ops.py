"""The writes the store applies, as ops: ``(name, arg)`` pairs that the
data plane builds and the writer thread commits in batches (the loop's
connection writes journal entries and run rows with the same functions).
An op is plain data, not a closure, so that it can wait in the writer's
backlog while the store fails, be weighed (``op_size``) and trimmed there,
and be tried again one run at a time (``ops_by_run``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from lrpilot.protocol import PROTOCOL_VERSION

from .schema import (
    BATCH_COLUMNS,
    JOURNAL_COLUMNS,
    JSON_COLUMNS,
    RUN_COLUMNS,
    SNAPSHOT_COLUMNS,
    dumps,
    storable,
)

# Snapshots a run keeps: the newest ones, for resuming from a recent
# checkpoint, and for older ones the first of every SNAPSHOT_SPACING steps
# (ticks seldom land on a multiple), so a resume replays about that many at most.
SNAPSHOTS_KEPT, SNAPSHOT_SPACING = 200, 1000
# The pruning query reads all of a run's snapshots (~80 us at 200): it runs at
# every PRUNE_EVERY-th snapshot of a run, not in every transaction, since
# a decision's journal entry waits for its commit before the command goes out.
# A run holds at most PRUNE_EVERY - 1 snapshots more than the rule keeps.
PRUNE_EVERY = 16


def upsert_run(row: dict[str, Any]) -> tuple[str, tuple]:
    """Write a run's row unless the store already has a newer revision: the
    loop's connection (decisions) and the writer's (ticks) may commit out of
    order."""
    values = tuple(dumps(row[c]) if c in JSON_COLUMNS else row[c] for c in RUN_COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in RUN_COLUMNS if c != "run_id")
    sql = (
        f"INSERT INTO runs ({', '.join(RUN_COLUMNS)})"
        f" VALUES ({', '.join('?' * len(RUN_COLUMNS))})"
        f" ON CONFLICT (run_id) DO UPDATE SET {updates} WHERE excluded.rev > runs.rev"
    )
    return sql, storable(values, RUN_COLUMNS, f"run {row['run_id']}'s row")


def _write_batches(db: sqlite3.Connection, rows: list[tuple]) -> None:
    db.executemany(
        f"INSERT INTO batches ({', '.join(BATCH_COLUMNS)}) VALUES (?,?,?,?,?,?,?)",
        [
            storable((*row, PROTOCOL_VERSION), BATCH_COLUMNS, f"run {row[0]}'s records")
            for row in rows
        ],
    )


def write_run(db: sqlite3.Connection, row: dict[str, Any]) -> None:
    db.execute(*upsert_run(row))
    _write_snapshot(db, row)


def _write_snapshot(db: sqlite3.Connection, row: dict[str, Any]) -> None:
    snap = tuple(dumps(row[c]) if c in JSON_COLUMNS else row[c] for c in SNAPSHOT_COLUMNS)
    db.execute(
        f"INSERT INTO snapshots ({', '.join(SNAPSHOT_COLUMNS)})"
        f" VALUES ({', '.join('?' * len(SNAPSHOT_COLUMNS))})",
        storable(snap, SNAPSHOT_COLUMNS, f"run {row['run_id']}'s snapshot"),
    )
    if row["rev"] % PRUNE_EVERY:  # rev counts the run's rows, each with its snapshot
        return
    db.execute(
        "DELETE FROM snapshots WHERE run_id = ?1"
        " AND rowid NOT IN"
        " (SELECT rowid FROM snapshots WHERE run_id = ?1 ORDER BY rowid DESC LIMIT ?2)"
        " AND rowid NOT IN"
        " (SELECT MIN(rowid) FROM snapshots WHERE run_id = ?1 GROUP BY step / ?3)",
        (row["run_id"], SNAPSHOTS_KEPT, SNAPSHOT_SPACING),
    )


def write_journal(db: sqlite3.Connection, arg: tuple[str, Any, Sequence[float]]) -> None:
    """A journal entry; also the writer's op for one the loop could not write
    (the store was failing): it waits in the backlog, never trimmed."""
    run_id, command, old_lrs = arg
    values = (
        run_id,
        command.version,
        command.effective_step,
        command.state_step,
        dumps(list(old_lrs)),
        dumps(command.lrs),
        command.reason,
        command.actor,
        time.time(),
        dumps(command.policy),
        int(command.hold),
        dumps(command.policy_state),
    )
    db.execute(
        f"INSERT OR IGNORE INTO journal ({', '.join(JOURNAL_COLUMNS)})"
        f" VALUES ({', '.join('?' * len(JOURNAL_COLUMNS))})",
        storable(values, JOURNAL_COLUMNS, f"run {run_id}'s journal"),
    )


def _write_applied(db: sqlite3.Connection, arg: tuple[str, int, int, bool]) -> None:
    run_id, version, applied_step, late = arg
    db.execute(
        "UPDATE journal SET applied_step = ?, late = ? WHERE run_id = ? AND version = ?"
        " AND applied_step IS NULL",
        storable(
            (applied_step, int(late), run_id, version),
            ("applied_step", "late", "run_id", "version"),
            f"run {run_id}'s journal",
        ),
    )


def _truncate(db: sqlite3.Connection, arg: tuple[str, int]) -> None:
    """A run resumed from a checkpoint at ``step``: its later records and
    snapshots belong to a timeline that no longer is."""
    run_id, step = arg
    storable((step,), ("step",), f"run {run_id}'s truncation")
    db.execute("DELETE FROM batches WHERE run_id = ? AND first_step > ?", (run_id, step))
    db.execute(  # MIN: an earlier resume's cut stands
        "UPDATE batches SET valid_until = MIN(COALESCE(valid_until, ?1), ?1)"
        " WHERE run_id = ?2 AND last_step > ?1",
        (step, run_id),
    )
    db.execute("DELETE FROM snapshots WHERE run_id = ? AND step > ?", (run_id, step))


OP_NAMES = {
    "journal": "journal entry",
    "batches": "records",
    "run": "row and snapshot",
    "applied": "applied mark",
    "truncate": "truncation",
}
WRITERS: dict[str, Callable[[sqlite3.Connection, Any], None]] = {
    "journal": write_journal,
    "batches": _write_batches,
    "run": write_run,
    "applied": _write_applied,
    "truncate": _truncate,
}


def apply_ops(db: sqlite3.Connection, ops: list[tuple[str, Any]]) -> None:
    for op, arg in ops:
        WRITERS[op](db, arg)


def run_of(op: str, arg: Any) -> str:
    """The run an op writes for ("?" for one too broken to say)."""
    try:
        return str(arg["run_id"] if op == "run" else arg[0])
    except (KeyError, IndexError, TypeError):
        return "?"


def ops_by_run(ops: list[tuple[str, Any]]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """A batch's ops by run, each run's in their order. A run's records and
    its row (whose stored_seq counts them) go in together or not at all."""
    by_run: dict[str, list[tuple[str, Any]]] = {}
    for op, arg in ops:
        if op == "batches":
            for row in arg:
                by_run.setdefault(run_of(op, row), []).append((op, [row]))
        else:
            by_run.setdefault(run_of(op, arg), []).append((op, arg))
    return list(by_run.items())


def op_size(op: str, arg: Any) -> int:
    """About how many bytes an op holds in memory while it waits."""
    if op == "batches":
        return sum(len(row[3]) + len(row[4]) + 100 for row in arg)
    return len(repr(arg)) + 100
