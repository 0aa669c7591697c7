"""The store's file: its tables, the migrations that build them, and what
opens, checks and decodes it. Kept apart from the Store (the daemon's
connections and writer thread) so that the command line can read a running
daemon's file without loading any of that.

The schema has a version; ``MIGRATIONS[i]`` takes a store from version i to
i + 1, and opening a store applies whatever it lacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lrpilot.errors import LRPilotError

DB_NAME = "lrpilot.sqlite3"

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
    # 1 -> 2: runs rows the daemon could not use, moved out of runs at open
    # (``row`` is the row as it was, as JSON) so that the others start.
    """
    CREATE TABLE quarantine (
        run_id TEXT,
        row TEXT NOT NULL,
        reason TEXT NOT NULL,
        time REAL NOT NULL
    );
    """,
    # 2 -> 3: the wire protocol version each batch was received in, so that
    # batches stay readable after the protocol changes (daemon/service/records.py
    # keeps a reader for every version a store may hold). Older rows are v1.
    """
    ALTER TABLE batches ADD COLUMN wire INTEGER NOT NULL DEFAULT 1;
    """,
    # 3 -> 4: the policy's whole state as of each change, so the journal
    # holds what a decision saw and made (a range test's curve and
    # suggestion, a guard's trip). Older entries have none.
    """
    ALTER TABLE journal ADD COLUMN policy_state TEXT;
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
BATCH_COLUMNS = ("run_id", "first_step", "last_step", "header", "body", "skip", "wire")
JOURNAL_COLUMNS = (
    "run_id",
    "version",
    "effective_step",
    "state_step",
    "old_lrs",
    "new_lrs",
    "reason",
    "actor",
    "time",
    "policy",
    "hold",
    "policy_state",
)
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
INT64 = range(-(2**63), 2**63)  # what an SQLite INTEGER holds
PROBLEMS_SHOWN = 20  # quick_check lines kept and logged


class StoreError(LRPilotError, RuntimeError):
    """The store cannot be opened or read (bad path, newer schema, not a store)."""


class OutOfRange(ValueError):
    """A value the store cannot hold: an int beyond SQLite's 64 bits (Python's
    sqlite3 raises OverflowError for it, mid-statement, naming nothing)."""


class BadRow(ValueError):
    """A runs row the daemon cannot use (not JSON, a field missing or of the
    wrong type)."""


def storable(values: Sequence[Any], names: Sequence[str], what: str) -> tuple:
    """``values`` as a row SQLite can hold, else OutOfRange naming the field."""
    for name, value in zip(names, values):
        if isinstance(value, int) and value not in INT64:
            raise OutOfRange(f"{what}: {name} {value} is beyond the store's 64-bit integers")
    return tuple(values)


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


def connect(
    path: Path, durability: str = "normal", thread_bound: bool = True
) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=thread_bound)
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


def migrate(db: sqlite3.Connection, where: Path | str = "the store") -> int:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{where} has schema version {version}; this lrpilot knows up to {SCHEMA_VERSION}"
        )
    for target in range(version, SCHEMA_VERSION):
        with transaction(db):
            for statement in MIGRATIONS[target].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={target + 1}")
    return SCHEMA_VERSION


def quick_check(db: sqlite3.Connection) -> list[str]:
    """What ``PRAGMA quick_check`` finds wrong with the file (empty: nothing).
    On some damage SQLite stops the check with an error: that is the finding."""
    try:
        found = [line for (line,) in db.execute(f"PRAGMA quick_check({PROBLEMS_SHOWN})")]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    return [] if found == ["ok"] else found


def decode_row(row: sqlite3.Row) -> dict[str, Any]:
    names = row.keys()  # iterating a sqlite3.Row gives its values, not its names
    return {
        k: (json.loads(row[k]) if k in JSON_COLUMNS and row[k] is not None else row[k])
        for k in names
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(test(v) for v in value)


def _or_null(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


# What each runs column must hold, as the daemon builds a run from it.
RUN_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "run_id": ("text", lambda v: isinstance(v, str) and v != ""),
    "created": ("a number", _is_number),
    "updated": ("a number", _is_number),
    "ended": ("a number or null", _or_null(_is_number)),
    "group_names": ("a list of names", _list_of(lambda v: isinstance(v, str))),
    "base_lrs": ("a list of numbers", _list_of(_is_number)),
    "world_size": ("an integer", _is_int),
    "requested_policy": ("an object or null", _or_null(_is_object)),
    "policy": ("an object or null", _or_null(_is_object)),
    "policy_base_lrs": ("a list of numbers", _list_of(_is_number)),
    "policy_state": ("an object or null", _or_null(_is_object)),
    "step": ("an integer", _is_int),
    "driver": ("text or null", _or_null(lambda v: isinstance(v, str))),
    "seq": ("an integer", _is_int),
    "stored_seq": ("an integer", _is_int),
    "rev": ("an integer", _is_int),
    "version": ("an integer", _is_int),
    "lrs": ("a list of numbers", _list_of(_is_number)),
    "held": ("a list of numbers or null", _or_null(_list_of(_is_number))),
}


def decode_run(raw: sqlite3.Row) -> dict[str, Any]:
    """A runs row as the daemon builds a run from it, else BadRow saying
    which field is wrong."""
    row = {}
    for name in RUN_COLUMNS:
        value = raw[name]
        if name in JSON_COLUMNS and value is not None:
            try:
                value = json.loads(value)
            except (TypeError, ValueError) as exc:
                raise BadRow(f"{name} is not JSON ({exc})") from None
        what, fits = RUN_FIELDS[name]
        if not fits(value):
            raise BadRow(f"{name} is {_shown(value)}, not {what}")
        row[name] = value
    return row


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_readonly(path: Path) -> sqlite3.Connection:
    """For the command line: read a daemon's store while it runs."""
    if not path.exists():
        raise StoreError(f"no lrpilot store at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    return db
