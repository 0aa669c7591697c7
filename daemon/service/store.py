"""The store: the daemon's runs, policy state, LR journal and recorded metric
streams, in SQLite (WAL) under the state directory. The file's tables and
migrations are schema.py's; the writes, as ops, are store_ops.py's.

Two connections. The daemon's loop owns one for what must be on disk before
anything is sent (journal entries, operator changes) and for reads. A writer
thread owns the other and commits the high-volume rest (records, run state
snapshots) in batches handed to it once per tick, so the loop never waits on
the disk for telemetry. Each batch says which client records it made durable;
the loop tells those clients (``persisted``) so they can forget them.

Faults. A write the store cannot take (disk full, file not writable or
damaged) is the store's fault: the writer keeps the batches (up to
``backlog_bytes``, then it lets the oldest records go first), says so in
``error`` and tries again every RETRY_S, in order. A write that fails by
itself (a value SQLite cannot hold, a constraint) is the op's fault: only
that run's ops of that batch are dropped and counted in ``dropped``; the
other runs' go in. At open the file is checked (``check_problems``) and a
runs row the daemon cannot use is moved to the ``quarantine`` table.
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
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import read_records
from .schema import (
    DB_NAME,
    BadRow,
    OutOfRange,
    StoreError,
    connect,
    decode_row,
    decode_run,
    migrate,
    quick_check,
    transaction,
)
from .store_ops import OP_NAMES, apply_ops, op_size, ops_by_run, run_of, write_journal, write_run

log = logging.getLogger("lrpilot.daemon")

# While the store cannot be written, the writer keeps what it could not write
# (about this many bytes, the records first to go) and tries again this often.
BACKLOG_BYTES, RETRY_S = 64 * 2**20, 1.0
# Why the store gave an op up (``Store.dropped``): it failed by itself (the
# first three), waited past backlog_bytes, or was waiting when the store closed.
DROP_REASONS = ("out_of_range", "constraint", "bad_op", "backlog_full", "closed")
LOCK_TIMEOUT_S = 30.0  # as long as SQLite waits for its own write lock (schema.connect)


class StoreWriteError(StoreError):
    """A write on the loop's connection failed (disk full, file not writable,
    a value the store cannot hold); nothing of it was written."""


def is_store_fault(exc: BaseException) -> bool:
    """Whether a failed write is the store's fault (disk full, file read-only,
    damaged or locked, a table missing), so that the same write may work
    later; anything else (a value out of range, a constraint) is the op's,
    and would fail again every time."""
    if isinstance(exc, (sqlite3.OperationalError, sqlite3.InternalError)):
        return True
    return type(exc) is sqlite3.DatabaseError  # a damaged file, "not a database"


def drop_reason(exc: BaseException) -> str:
    """The ``dropped`` counter's key for an op that failed by itself."""
    if isinstance(exc, (OutOfRange, OverflowError)):
        return "out_of_range"
    if isinstance(exc, sqlite3.IntegrityError):
        return "constraint"
    return "bad_op"


@dataclass
class Pending:
    """A submitted batch the writer has not committed yet."""

    ops: list[tuple[str, Any]]
    notice: Any
    _size: int | None = None

    @property
    def size(self) -> int:
        """Bytes it holds, about (only asked for while the store fails)."""
        if self._size is None:
            self._size = sum(op_size(op, arg) for op, arg in self.ops)
        return self._size

    def replace_ops(self, ops: list[tuple[str, Any]]) -> None:
        self.ops, self._size = ops, None


class Waiter:
    """wait()'s marker in the writer's queue."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.committed = False


class Store:
    def __init__(
        self, state_dir: Path, durability: str = "normal", backlog_bytes: int = BACKLOG_BYTES
    ) -> None:
        self.path = state_dir / DB_NAME
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open the store in {state_dir}: {exc}") from None
        self.check_problems: list[str] = []  # what PRAGMA quick_check found at open
        self._db, writer_db = self._open(durability)
        # Health, for the daemon's /metrics and /healthz.
        self.error: str | None = None  # why writes fail, since when; None once one works
        self.error_since: float | None = None  # time.time() of the first failure
        self.failed_commits = 0  # transactions rolled back, on either connection
        self.dropped: Counter[str] = Counter()  # ops given up on, by reason
        self.backlog_batches = self.backlog_bytes = 0  # kept until the store works again
        self.quarantined: list[str] = []  # runs whose row was moved to quarantine
        self._backlog: list[Pending] = []  # the writer's alone
        self._backlog_limit = backlog_bytes
        self._next_try = 0.0  # time.monotonic() of the next try while the store fails
        self._logged: set[tuple[str, str, str]] = set()  # (run, ops, error) logged once
        self._trim_logged = False
        self._batches: queue.SimpleQueue = queue.SimpleQueue()
        self.committed: queue.SimpleQueue = queue.SimpleQueue()  # notices for the loop
        # Held by either connection for a whole write transaction. SQLite's
        # own wait for the write lock sleeps 1, 2, 5, 10 ms... between tries:
        # a journal entry that met the writer's commit waited up to 11 ms at
        # 1,000 ranks (bench/load.py). A lock hands over the moment the commit
        # ends. (SQLite's wait stays for other processes: `lrpilot simulate`.)
        self._write_lock = threading.Lock()
        self._writer = threading.Thread(
            target=self._write_loop, args=(writer_db,), name="lrpilot-store", daemon=True
        )
        self._writer.start()

    def _open(self, durability: str) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        """The loop's connection and the writer's, the file checked and
        migrated; StoreError naming the file if it is not a store we can use."""
        db = None
        try:
            db = connect(self.path, durability)
            self.check_problems = quick_check(db)
            if self.check_problems:
                log.warning(
                    "the store %s fails its check (PRAGMA quick_check): %s; the daemon goes on"
                    " with what it can read (see 'When the store fails' in docs/operations.md)",
                    self.path,
                    "; ".join(self.check_problems),
                )
            migrate(db, self.path)
            # The WAL is checkpointed by the writer's commits (every tick),
            # never by the loop's: a journal entry's commit must not copy
            # megabytes of WAL back into the file while a command waits.
            db.execute("PRAGMA wal_autocheckpoint=0")
            # Opened here so that a file it cannot open fails the start; used
            # by the writer thread alone.
            return db, connect(self.path, durability, thread_bound=False)
        except (OSError, sqlite3.Error) as exc:
            if db is not None:
                db.close()
            raise StoreError(f"cannot open the store {self.path}: {exc}") from None
        except StoreError:
            if db is not None:
                db.close()
            raise

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
        a client sent again after a crash) is kept as it was. StoreWriteError
        if it cannot be written."""

        def write() -> None:
            self._insert_journal(run_id, command, old_lrs)
            if row is not None:
                write_run(self._db, row)

        self._write_now(f"run {run_id}'s journal entry v{command.version}", write)

    def _insert_journal(self, run_id: str, command: Any, old_lrs: Sequence[float]) -> None:
        write_journal(self._db, (run_id, command, old_lrs))

    def save_run(self, row: dict[str, Any]) -> None:
        """Write a run's whole state now, with a snapshot (a new run).
        StoreWriteError if it cannot be written."""
        self._write_now(f"run {row.get('run_id')}'s state", lambda: write_run(self._db, row))

    def _write_now(self, what: str, write: Callable[[], None]) -> None:
        """One transaction on the loop's connection. A failure is rolled back
        (the connection stays usable) and raised as StoreWriteError."""
        try:
            with self._loop_writes(), transaction(self._db):
                write()
        except Exception as exc:
            self.failed_commits += 1
            if is_store_fault(exc):
                self._failing(exc)
            raise StoreWriteError(f"cannot write {what} to {self.path}: {exc}") from exc
        if not self._backlog:  # else the store works again once the writer says so
            self._works()

    @contextlib.contextmanager
    def _loop_writes(self) -> Iterator[None]:
        """The write lock for the loop's connection, given up on as SQLite
        gives up on its own (a writer stuck on a stalled disk): the entry is
        then journaled later, as for any write that fails."""
        if not self._write_lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise sqlite3.OperationalError(
                f"database is locked: the store's writer held it for {LOCK_TIMEOUT_S:.0f} s"
            )
        try:
            yield
        finally:
            self._write_lock.release()

    def load_runs(self) -> list[dict[str, Any]]:
        """Every run's row. A row the daemon cannot use is moved to the
        quarantine table, so that the daemon starts with the others."""
        try:
            raws = self._db.execute("SELECT rowid, * FROM runs ORDER BY created").fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot read the runs in {self.path}: {exc}") from None
        rows = []
        for raw in raws:
            try:
                rows.append(decode_run(raw))
            except BadRow as exc:
                self._quarantine(raw, str(exc))
        return rows

    def load_run(self, run_id: str) -> dict[str, Any] | None:
        """One run's row (a run the daemon let go of from memory), or None;
        a row it cannot use is quarantined, as at start."""
        raw = self._db.execute("SELECT rowid, * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if raw is None:
            return None
        try:
            return decode_run(raw)
        except BadRow as exc:
            self._quarantine(raw, str(exc))
            return None

    def quarantine(self, run_id: str, reason: str) -> None:
        """Move a run's row to the quarantine table: for the daemon, when it
        cannot build the run from a row that decodes (a policy that does not
        parse, a state it does not take). The run's journal, snapshots and
        records stay; if it comes back, it goes on from what its client says."""
        raw = self._db.execute("SELECT rowid, * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if raw is not None:
            self._quarantine(raw, reason)

    def _quarantine(self, raw: sqlite3.Row, reason: str) -> None:
        run_id = raw["run_id"]
        self.quarantined.append(str(run_id))
        log.warning(
            "the store %s: run %s's row cannot be used (%s); it is moved to the quarantine"
            " table and the daemon goes on without it",
            self.path,
            run_id,
            reason,
        )
        names = raw.keys()  # iterating a sqlite3.Row gives its values, not its names
        row = json.dumps({k: raw[k] for k in names if k != "rowid"}, default=repr)
        try:
            with self._loop_writes(), transaction(self._db):
                self._db.execute(
                    "INSERT INTO quarantine (run_id, row, reason, time) VALUES (?,?,?,?)",
                    (run_id, row, reason, time.time()),
                )
                self._db.execute("DELETE FROM runs WHERE rowid = ?", (raw["rowid"],))
        except sqlite3.Error as exc:  # left out all the same; it is tried again at the next start
            self.failed_commits += 1
            log.error("the store %s: cannot quarantine run %s's row: %s", self.path, run_id, exc)

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
        """Queue ops for the writer; ``notice`` comes back on ``committed``
        once they are committed. A notice that is a dict of ``{key: (run_id,
        ...)}`` comes back without the entries of runs whose ops failed: those
        runs' clients must not be told their records are persisted."""
        self._batches.put(Pending(list(ops), notice))

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until the writer has tried to commit everything submitted so
        far: True when all of it is committed; False when some of it waits
        for the store to work again (see ``error``), or after ``timeout``."""
        waiter = Waiter()
        self._batches.put(waiter)
        return waiter.done.wait(timeout) and waiter.committed

    def _write_loop(self, db: sqlite3.Connection) -> None:
        try:
            running = True
            while running:
                running, waiters = self._take()
                try:
                    self._write_if_due(db, force=bool(waiters) or not running)
                except Exception:  # a bug: the writer must live on (wait() and close() need it)
                    log.exception("internal error in the store's writer")
                    self._next_try = time.monotonic() + RETRY_S
                for waiter in waiters:
                    waiter.committed = not self._backlog
                    waiter.done.set()
            if self._backlog:
                self._give_up()
        finally:
            db.close()

    def _write_if_due(self, db: sqlite3.Connection, force: bool) -> None:
        # While the store fails it is tried every RETRY_S, and when someone
        # waits or the store closes; not at every tick.
        if self._backlog and (force or time.monotonic() >= self._next_try):
            self._write(db)

    def _take(self) -> tuple[bool, list[Waiter]]:
        """Move what was submitted to the backlog, waiting for the first item
        (until the next try, while the store fails): (still open, waiters)."""
        timeout = max(0.0, self._next_try - time.monotonic()) if self._backlog else None
        items: list[Any] = []
        with contextlib.suppress(queue.Empty):
            items.append(self._batches.get(timeout=timeout))
            while True:
                items.append(self._batches.get_nowait())
        self._backlog += [item for item in items if isinstance(item, Pending)]
        waiters = [item for item in items if isinstance(item, Waiter)]
        return not any(item is None for item in items), waiters

    def _write(self, db: sqlite3.Connection) -> None:
        """Commit the backlog, or keep it for the next try if the store fails."""
        pending = self._backlog
        try:
            failures = self._commit(db, pending)
        except Exception as exc:  # the store's fault (see _commit): keep it all
            self.failed_commits += 1
            self._next_try = time.monotonic() + RETRY_S
            self._failing(exc)
            self._trim_backlog()
            return
        self._backlog = []
        self.backlog_batches = self.backlog_bytes = 0
        self._works()
        for batch, failed in zip(pending, failures):
            for run_id, ops, error in failed:
                self._dropped(run_id, ops, error)
            self._notify(batch.notice, {run_id for run_id, _, _ in failed})

    def _commit(self, db: sqlite3.Connection, pending: list[Pending]) -> list[list[tuple]]:
        """All of it in one transaction; if an op fails by itself, all of it
        again, one run's ops of a batch at a time, so that only those that
        fail are left out. Per batch, the (run, ops, error) left out. Raises
        when the store fails."""
        try:
            with self._write_lock, transaction(db, "BEGIN"):
                for batch in pending:
                    apply_ops(db, batch.ops)
            return [[] for _ in pending]
        except Exception as exc:
            if is_store_fault(exc):
                raise
            self.failed_commits += 1
        return self._commit_each(db, pending)

    def _commit_each(self, db: sqlite3.Connection, pending: list[Pending]) -> list[list[tuple]]:
        failures: list[list[tuple]] = []
        with self._write_lock, transaction(db, "BEGIN"):
            for batch in pending:
                failed = []
                for run_id, ops in ops_by_run(batch.ops):
                    db.execute("SAVEPOINT one_run")
                    try:
                        apply_ops(db, ops)
                    except Exception as exc:
                        if is_store_fault(exc):
                            raise
                        db.execute("ROLLBACK TO one_run")
                        failed.append((run_id, ops, exc))
                    db.execute("RELEASE one_run")
                failures.append(failed)
        return failures

    def _notify(self, notice: Any, failed_runs: set[str]) -> None:
        if isinstance(notice, dict) and failed_runs:
            notice = {key: v for key, v in notice.items() if run_of("notice", v) not in failed_runs}
        if notice:
            self.committed.put(notice)

    def _dropped(self, run_id: str, ops: list[tuple[str, Any]], exc: BaseException) -> None:
        """Count an op that failed by itself; log it once per run and error."""
        reason = drop_reason(exc)
        self.dropped[reason] += len(ops)
        names = " and ".join(sorted({OP_NAMES.get(op, op) for op, _ in ops}))
        key = (run_id, names, type(exc).__name__)
        if key in self._logged:
            return
        self._logged.add(key)
        log.error(
            "the store left out run %s's %s (%s: %s); the other runs' went in"
            " (counted as dropped %s; logged once per run and error)",
            run_id,
            names,
            type(exc).__name__,
            exc,
            reason,
        )

    # --- the store's health -------------------------------------------------

    def _failing(self, exc: BaseException) -> None:
        """The store takes no writes: say so (logged when it starts, and when
        the cause changes)."""
        if self.error_since is None:
            self.error_since = time.time()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.error_since))
        error = f"cannot write to {self.path} since {started}: {exc}"
        if error != self.error:
            log.error(
                "%s; the daemon keeps what it could not write (up to %s) and tries"
                " again every %g s",
                error,
                mib(self._backlog_limit),
                RETRY_S,
            )
        self.error = error

    def _works(self) -> None:
        if self.error_since is None:
            return
        log.warning(
            "the store %s takes writes again, after %.0f s; what waited is written",
            self.path,
            time.time() - self.error_since,
        )
        self.error = self.error_since = None
        self._trim_logged = False

    def _trim_backlog(self) -> None:
        """Keep the backlog within its bytes. The oldest records go first
        (lost to the recorded stream), then run rows that a newer row of the
        same run supersedes (lost: snapshot history only). Journal marks,
        truncations and each run's newest row always stay: without them the
        store's runs and journal would be wrong, not just thinner."""
        total = sum(batch.size for batch in self._backlog)
        if total > self._backlog_limit:
            total = self._drop_oldest_records(total)
        if total > self._backlog_limit:
            total = self._drop_superseded_rows(total)
        self.backlog_batches, self.backlog_bytes = len(self._backlog), total

    def _drop_oldest_records(self, total: int) -> int:
        for batch in self._backlog:
            kept: list[tuple[str, Any]] = []
            for op, arg in batch.ops:
                if op == "batches":
                    rows = list(arg)
                    while rows and total > self._backlog_limit:
                        total -= op_size(op, [rows[0]])
                        self._note_trimmed(f"run {rows.pop(0)[0]}'s records")
                    if rows:
                        kept.append((op, rows))
                else:
                    kept.append((op, arg))
            batch.replace_ops(kept)
            if total <= self._backlog_limit:
                break
        return total

    def _drop_superseded_rows(self, total: int) -> int:
        newest = {}
        for batch in self._backlog:
            for op, arg in batch.ops:
                if op == "run":
                    newest[run_of(op, arg)] = arg
        for batch in self._backlog:
            kept: list[tuple[str, Any]] = []
            for op, arg in batch.ops:
                superseded = op == "run" and newest[run_of(op, arg)] is not arg
                if superseded and total > self._backlog_limit:
                    total -= op_size(op, arg)
                    self._note_trimmed(f"run {run_of(op, arg)}'s snapshots")
                else:
                    kept.append((op, arg))
            batch.replace_ops(kept)
        return total

    def _note_trimmed(self, what: str) -> None:
        self.dropped["backlog_full"] += 1
        if not self._trim_logged:
            self._trim_logged = True
            log.error(
                "the store %s has taken no writes for a while and what waits is over %s:"
                " dropping the oldest records and snapshots first (%s first); the recorded"
                " stream will lack them",
                self.path,
                mib(self._backlog_limit),
                what,
            )

    def _give_up(self) -> None:
        """The store closes with a backlog it could not write: the clients
        were not told those records are persisted, and send them again to
        the next daemon."""
        ops = sum(len(batch.ops) for batch in self._backlog)
        self.dropped["closed"] += ops
        log.error(
            "the store %s closes with %d batch(es) (%d ops) it could not write: %s",
            self.path,
            len(self._backlog),
            ops,
            self.error,
        )
        self._backlog = []

    def health(self) -> dict[str, Any]:
        """The store's health now, for /metrics and /healthz: a copy, as the
        writer thread changes it."""
        return {
            "error": self.error,
            "error_since": self.error_since,
            "failed_commits": self.failed_commits,
            "dropped": dict(self.dropped),
            "backlog_batches": self.backlog_batches,
            "backlog_bytes": self.backlog_bytes,
            "check_problems": list(self.check_problems),
            "quarantined": list(self.quarantined),
        }

    def size_bytes(self) -> int:
        """The database file plus its write-ahead log, on disk now."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):  # no WAL yet, or checkpointed away
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def close(self) -> None:
        self._batches.put(None)
        self._writer.join(timeout=30)
        self._db.close()


def mib(size: int) -> str:
    return f"{size / 2**20:.3g} MiB"
