"""The recorded metric stream: how the store keeps a run's records and reads
them back (for a replay, a rewind to a checkpoint, ``lrpilot policy
--preview`` and ``simulate --from-run``).

Records are kept as the metrics batches came off the wire, header and packed
body, with the wire protocol version they came in (``batches.wire``):
decoding them into rows in the daemon's loop cost more than all the rest of
ingest. The store reads them with a reader of its own per protocol version
(:data:`BATCH_READERS`), not with the protocol module's current models, so a
store written by an older lrpilot stays readable when the protocol changes.
A protocol version without a reader here fails the test suite
(tests/test_store.py), not a user's replay.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from collections.abc import Callable, Iterator

from lrpilot.errors import LRPilotError

# (step, kind, metrics); kind is "s" (a step) or "r" (a report).
StoredRecord = tuple[int, str, dict[str, float]]


class UnreadableBatch(LRPilotError, ValueError):
    """A stored batch this lrpilot cannot read (a newer protocol's, or damaged)."""


def read_batch_v1(header: str | bytes, body: bytes) -> tuple[int, Iterator[StoredRecord]]:
    """Protocol 1's batch: the header is JSON with ``first_seq``, ``shapes``
    (``[kind, [names]]``) and ``blocks`` (``[shape, count]`` in record order);
    the body is each record packed as ``<q`` step and ``<d`` per name."""
    try:
        parsed = json.loads(header)
        first_seq = int(parsed["first_seq"])
        shapes = [(str(kind), [str(n) for n in names]) for kind, names in parsed["shapes"]]
        blocks = [(int(shape), int(count)) for shape, count in parsed["blocks"]]
        layouts = [(struct.Struct(f"<q{len(shapes[s][1])}d"), *shapes[s], n) for s, n in blocks]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise UnreadableBatch(
            f"a stored batch's header does not read as protocol 1: {exc}"
        ) from None
    if sum(packer.size * count for packer, _, _, count in layouts) != len(body):
        raise UnreadableBatch("a stored batch's body does not match its header")

    def records() -> Iterator[StoredRecord]:
        offset = 0
        for packer, kind, names, count in layouts:
            end = offset + packer.size * count
            for step, *values in packer.iter_unpack(body[offset:end]):
                yield step, kind, dict(zip(names, values))
            offset = end

    return first_seq, records()


# A reader for every wire protocol version a store may hold.
BATCH_READERS: dict[int, Callable[[str | bytes, bytes], tuple[int, Iterator[StoredRecord]]]] = {
    1: read_batch_v1,
}


def read_records(
    db: sqlite3.Connection,
    run_id: str,
    after: int = 0,
    until: int | None = None,
    after_seq: int | None = None,
) -> Iterator[StoredRecord]:
    """(step, kind, metrics) of a run's recorded stream, in arrival order,
    for the steps after ``after`` up to ``until``; with ``after_seq``, also
    the records of step ``after`` itself whose seq is later (a snapshot taken
    between a step and its report has the step, not the report).

    Records a batch repeated (``skip``) are left out. Non-finite metrics are
    data (a diverged loss) and come back as they were."""
    until = until if until is not None else 2**62
    first = after if after_seq is not None else after + 1
    rows = db.execute(
        "SELECT header, body, skip, valid_until, wire FROM batches WHERE run_id = ?"
        " AND last_step >= ? AND first_step <= ? ORDER BY rowid",
        (run_id, first, until),
    )
    for header, body, skip, valid_until, wire in rows:
        reader = BATCH_READERS.get(wire)
        if reader is None:
            raise UnreadableBatch(
                f"run {run_id!r} has records in wire protocol {wire}; this lrpilot reads "
                f"{', '.join(map(str, sorted(BATCH_READERS)))} (a newer lrpilot wrote them)"
            )
        last = min(until, valid_until if valid_until is not None else until)
        seq, records = reader(header, body)
        for i, (step, kind, metrics) in enumerate(records):
            if i < skip or not first <= step <= last:
                continue
            if step == after and (after_seq is None or seq + i <= after_seq):
                continue
            yield step, kind, metrics
