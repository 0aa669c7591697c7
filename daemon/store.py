"""The store: the daemon's runs, policy state, LR journal and recorded metric
streams, in SQLite (WAL) under the state directory.

Two connections. The daemon's loop owns one for what must be on disk before
anything is sent (journal entries, operator changes) and for reads. A writer
thread owns the other and commits the high-volume rest (records, run state
snapshots) in batches handed to it once per tick, so the loop never waits on
the disk for telemetry. Each batch says which client records it made durable;
the loop tells those clients (``persisted``) so they can forget them.

The schema has a version; ``MIGRATIONS[i]`` takes a store from version i to
i + 1, and opening a store applies whatever it lacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lrpilot.protocol import MetricsHeader, decode_records, first_non_finite

DB_NAME = "lrpilot.sqlite3"
log = logging.getLogger("lrpilot.daemon")

MIGRATIONS: list[str] = [
    # 0 -> 1: the first release.
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        ended REAL,
        group_names TEXT NOT NULL,
        base_lrs TEXT NOT NULL,
        world_size INTEGER NOT NULL,
        requested_policy TEXT,
        policy TEXT,
        policy_base_lrs TEXT NOT NULL,
        policy_state TEXT,
        step INTEGER NOT NULL,
        driver TEXT,
        seq INTEGER NOT NULL,
        stored_seq INTEGER NOT NULL,
        rev INTEGER NOT NULL,
        version INTEGER NOT NULL,
        lrs TEXT NOT NULL,
        held TEXT
    );
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        effective_step INTEGER NOT NULL,
        state_step INTEGER NOT NULL,
        old_lrs TEXT NOT NULL,
        new_lrs TEXT NOT NULL,
        reason TEXT NOT NULL,
        actor TEXT NOT NULL,
        time REAL NOT NULL,
        policy TEXT,
        hold INTEGER NOT NULL,
        applied_step INTEGER,
        late INTEGER
    );
    CREATE UNIQUE INDEX journal_by_run ON journal (run_id, version);
    CREATE TABLE batches (
        run_id TEXT NOT NULL,
        first_step INTEGER NOT NULL,
        last_step INTEGER NOT NULL,
        header TEXT NOT NULL,
        body BLOB NOT NULL,
        skip INTEGER NOT NULL,
        valid_until INTEGER
    );
    CREATE INDEX batches_by_run ON batches (run_id, last_step);
    CREATE TABLE snapshots (
        run_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        rev INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        version INTEGER NOT NULL,
        policy TEXT,
        policy_base_lrs TEXT NOT NULL,
        policy_state TEXT,
        lrs TEXT NOT NULL,
        held TEXT
    );
    CREATE INDEX snapshots_by_run ON snapshots (run_id, step);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
RUN_COLUMNS = (
    "run_id",
    "created",
    "updated",
    "ended",
    "group_names",
    "base_lrs",
    "world_size",
    "requested_policy",
    "policy",
    "policy_base_lrs",
    "policy_state",
    "step",
    "driver",
    "seq",
    "stored_seq",
    "rev",
    "version",
    "lrs",
    "held",
)
JSON_COLUMNS = {
    "group_names",
    "base_lrs",
    "requested_policy",
    "policy",
    "policy_base_lrs",
    "policy_state",
    "lrs",
    "held",
    "old_lrs",
    "new_lrs",
}
SNAPSHOT_COLUMNS = (
    "run_id",
    "step",
    "rev",
    "seq",
    "version",
    "policy",
    "policy_base_lrs",
    "policy_state",
    "lrs",
    "held",
)
# Snapshots a run keeps: the newest ones, for resuming from a recent
# checkpoint, and for older ones the first of every SNAPSHOT_SPACING steps
# (ticks seldom land on a multiple), so a resume replays about that many at most.
SNAPSHOTS_KEPT, SNAPSHOT_SPACING = 200, 1000


class StoreError(RuntimeError):
    """The store cannot be opened (bad path, newer schema, not a store)."""


def default_state_dir() -> Path:
    env = os.environ.get("LRPILOT_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "lrpilot"


def dumps(value: Any) -> str | None:
    # Python's json writes inf as Infinity (plateau's best before any value).
    return None if value is None else json.dumps(value)


def connect(path: Path, durability: str = "normal") -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=True)
    db.execute("PRAGMA journal_mode=WAL")
    # normal: a commit survives the daemon being killed (it is in the WAL
    # file); full: it also survives power loss, at an fsync per commit.
    db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    db.row_factory = sqlite3.Row
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Commit what the block writes, or roll it back: a failed write must not
    leave the connection inside a transaction that every later one trips on."""
    db.execute(begin)
    try:
        yield
    except BaseException:
        if db.in_transaction:  # SQLite ends it by itself after some errors (disk full)
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def migrate(db: sqlite3.Connection) -> int:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the store has schema version {version}; this lrpilot knows up to {SCHEMA_VERSION}"
        )
    for target in range(version, SCHEMA_VERSION):
        with transaction(db):
            for statement in MIGRATIONS[target].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={target + 1}")
    return SCHEMA_VERSION


def decode_row(row: sqlite3.Row) -> dict[str, Any]:
    names = row.keys()  # iterating a sqlite3.Row gives its values, not its names
    return {
        k: (json.loads(row[k]) if k in JSON_COLUMNS and row[k] is not None else row[k])
        for k in names
    }


class Store:
    def __init__(self, state_dir: Path, durability: str = "normal") -> None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self.path = state_dir / DB_NAME
            self._db = connect(self.path, durability)
            migrate(self._db)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store in {state_dir}: {exc}") from None
        self._durability = durability
        self._batches: queue.SimpleQueue = queue.SimpleQueue()
        self.committed: queue.SimpleQueue = queue.SimpleQueue()  # notices for the loop
        self.write_errors = 0
        self._writer = threading.Thread(target=self._write_loop, name="lrpilot-store", daemon=True)
        self._writer.start()

    # --- the loop's connection: small writes that must land before a send --

    def journal(
        self,
        run_id: str,
        command: Any,
        old_lrs: Sequence[float],
        row: dict[str, Any] | None = None,
    ) -> None:
        """The command, and the run's state that made it, in one transaction.
        A version already journaled (the same decision made again from records
        a client sent again after a crash) is kept as it was."""
        with transaction(self._db):
            self._insert_journal(run_id, command, old_lrs)
            if row is not None:
                _write_run(self._db, row)

    def _insert_journal(self, run_id: str, command: Any, old_lrs: Sequence[float]) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO journal (run_id, version, effective_step, state_step,"
            " old_lrs, new_lrs, reason, actor, time, policy, hold)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
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
            ),
        )

    def save_run(self, row: dict[str, Any]) -> None:
        """Write a run's whole state now, with a snapshot (a new run)."""
        with transaction(self._db):
            _write_run(self._db, row)

    def load_runs(self) -> list[dict[str, Any]]:
        return [decode_row(r) for r in self._db.execute("SELECT * FROM runs ORDER BY created")]

    def history(self, run_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM (SELECT * FROM journal WHERE run_id = ? ORDER BY version DESC LIMIT ?)"
            " ORDER BY version",
            (run_id, -1 if limit is None else limit),
        )
        return [decode_row(r) for r in rows]

    def last_command(self, run_id: str) -> Any:
        """The run's last journaled command (as the LRCommand it was), or None."""
        from lrpilot.protocol import LRCommand

        entries = self.history(run_id, limit=1)
        if not entries:
            return None
        e = entries[0]
        return LRCommand(
            run=run_id,
            version=e["version"],
            effective_step=e["effective_step"],
            state_step=e["state_step"],
            lrs=e["new_lrs"],
            policy=e["policy"],
            hold=bool(e["hold"]),
            reason=e["reason"],
            actor=e["actor"],
        )

    def snapshot_at(self, run_id: str, step: int) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT * FROM snapshots WHERE run_id = ? AND step <= ?"
            " ORDER BY step DESC, rev DESC, rowid DESC"
            " LIMIT 1",
            (run_id, step),
        ).fetchone()
        return decode_row(row) if row else None

    def records(
        self, run_id: str, after: int = 0, until: int | None = None, after_seq: int | None = None
    ) -> Iterator[tuple]:
        return read_records(self._db, run_id, after, until, after_seq)

    # --- the writer thread: batches of records and snapshots --------------

    def submit(self, ops: list[tuple[str, Any]], notice: Any = None) -> None:
        """Queue ops for one transaction; ``notice`` comes back on ``committed``."""
        self._batches.put((ops, notice))

    def _write_loop(self) -> None:
        db = connect(self.path, self._durability)
        while True:
            item = self._batches.get()
            if item is None:
                break
            batches = [item]
            while not self._batches.empty():  # one transaction for all that waits
                more = self._batches.get()
                if more is None:
                    self._commit(db, batches)
                    db.close()
                    return
                batches.append(more)
            self._commit(db, batches)
        db.close()

    def _commit(self, db: sqlite3.Connection, batches: list) -> None:
        try:
            with transaction(db, "BEGIN"):
                for ops, _ in batches:
                    for op, arg in ops:
                        WRITERS[op](db, arg)
        except Exception:  # the writer must live on: flush() waits for it
            self.write_errors += 1
            log.exception("the store could not commit %d batch(es); they are lost", len(batches))
            for _, notice in batches:  # nobody may wait forever on a lost batch
                if isinstance(notice, threading.Event):
                    notice.set()
            return
        for _, notice in batches:
            if isinstance(notice, threading.Event):
                notice.set()
            elif notice is not None:
                self.committed.put(notice)

    def size_bytes(self) -> int:
        """The database file plus its write-ahead log, on disk now."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):  # no WAL yet, or checkpointed away
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until everything submitted so far is committed."""
        done = threading.Event()
        self._batches.put(([], done))
        return done.wait(timeout)

    def close(self) -> None:
        self._batches.put(None)
        self._writer.join(timeout=30)
        self._db.close()


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
    return sql, values


def _write_batches(db: sqlite3.Connection, rows: list[tuple]) -> None:
    db.executemany(
        "INSERT INTO batches (run_id, first_step, last_step, header, body, skip)"
        " VALUES (?,?,?,?,?,?)",
        rows,
    )


def _write_run(db: sqlite3.Connection, row: dict[str, Any]) -> None:
    db.execute(*upsert_run(row))
    _write_snapshot(db, row)


def _write_snapshot(db: sqlite3.Connection, row: dict[str, Any]) -> None:
    snap = tuple(dumps(row[c]) if c in JSON_COLUMNS else row[c] for c in SNAPSHOT_COLUMNS)
    db.execute(
        f"INSERT INTO snapshots ({', '.join(SNAPSHOT_COLUMNS)})"
        f" VALUES ({', '.join('?' * len(SNAPSHOT_COLUMNS))})",
        snap,
    )
    db.execute(
        "DELETE FROM snapshots WHERE run_id = ?1"
        " AND rowid NOT IN"
        " (SELECT rowid FROM snapshots WHERE run_id = ?1 ORDER BY rowid DESC LIMIT ?2)"
        " AND rowid NOT IN"
        " (SELECT MIN(rowid) FROM snapshots WHERE run_id = ?1 GROUP BY step / ?3)",
        (row["run_id"], SNAPSHOTS_KEPT, SNAPSHOT_SPACING),
    )


def _write_applied(db: sqlite3.Connection, arg: tuple[str, int, int, bool]) -> None:
    run_id, version, applied_step, late = arg
    db.execute(
        "UPDATE journal SET applied_step = ?, late = ? WHERE run_id = ? AND version = ?"
        " AND applied_step IS NULL",
        (applied_step, int(late), run_id, version),
    )


def _truncate(db: sqlite3.Connection, arg: tuple[str, int]) -> None:
    """A run resumed from a checkpoint at ``step``: its later records and
    snapshots belong to a timeline that no longer is."""
    run_id, step = arg
    db.execute("DELETE FROM batches WHERE run_id = ? AND first_step > ?", (run_id, step))
    db.execute(  # MIN: an earlier resume's cut stands
        "UPDATE batches SET valid_until = MIN(COALESCE(valid_until, ?1), ?1)"
        " WHERE run_id = ?2 AND last_step > ?1",
        (step, run_id),
    )
    db.execute("DELETE FROM snapshots WHERE run_id = ? AND step > ?", (run_id, step))


WRITERS = {
    "batches": _write_batches,
    "run": _write_run,
    "applied": _write_applied,
    "truncate": _truncate,
}


def read_records(
    db: sqlite3.Connection,
    run_id: str,
    after: int = 0,
    until: int | None = None,
    after_seq: int | None = None,
) -> Iterator[tuple[int, str, dict[str, float]]]:
    """(step, kind, metrics) of a run's recorded stream, in arrival order,
    for the steps after ``after`` up to ``until``; with ``after_seq``, also
    the records of step ``after`` itself whose seq is later (a snapshot taken
    between a step and its report has the step, not the report).

    The stream is kept as the metrics batches came off the wire (decoding
    them to rows in the daemon's loop cost more than all the rest of ingest);
    records a batch repeated (``skip``) and non-finite ones are left out."""
    until = until if until is not None else 2**62
    first = after if after_seq is not None else after + 1
    rows = db.execute(
        "SELECT header, body, skip, valid_until FROM batches WHERE run_id = ? AND last_step >= ?"
        " AND first_step <= ? ORDER BY rowid",
        (run_id, first, until),
    )
    for header, body, skip, valid_until in rows:
        last = min(until, valid_until if valid_until is not None else until)
        parsed = MetricsHeader.model_validate_json(header)
        seq = parsed.first_seq
        for i, (step, kind, metrics) in enumerate(decode_records(parsed, body)):
            if i < skip or not first <= step <= last or first_non_finite(metrics):
                continue
            if step == after and (after_seq is None or seq + i <= after_seq):
                continue
            yield step, kind, metrics


def open_readonly(path: Path) -> sqlite3.Connection:
    """For the command line: read a daemon's store while it runs."""
    if not path.exists():
        raise StoreError(f"no lrpilot store at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    return db
