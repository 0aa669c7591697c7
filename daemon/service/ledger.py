"""The ingest ledger: where each run's records stand between the wire, the
policy and the disk, and what the next tick hands the store.

A run's records are numbered by the client that drives it (``seq``, one per
record, from 1). The ledger keeps, per run (:class:`RunLedger`): which client
drives, the last seq folded into the policy, the last handed to the store and
the last the store committed. The data plane's metrics path is

    decode -> ledger.open_batch -> engine (each record to fold) -> change
           -> ledger.close_batch

and once per tick :meth:`Ledger.tick` gives the store one transaction (the
batches, the rows of the runs that changed, who to tell when it commits).
What the store has committed comes back through :meth:`Ledger.committed` as
``persisted`` messages, after which the clients forget those records.

Why the numbers: a client keeps every record until it is persisted and sends
it again after a daemon restart; the restarted daemon resumes from the store
(``seq`` and ``stored_seq`` are in the run's row) and skips by seq what it
has already folded in and stored, so each record is taken once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lrpilot.protocol import REPORT, BatchEncoder, ClientStats, MetricsHeader, Persisted

Outgoing = list[tuple[bytes, list[bytes]]]
# (step, kind, metrics) as decode_records gives them.
DecodedRecord = tuple[int, str, dict[str, float]]


@dataclass
class RunLedger:
    """One run's place in its driver's record numbering."""

    driver: str = ""  # the driving client's routing id, hex ("" until one sends)
    seq: int = 0  # its last record folded into the policy
    stored_seq: int = 0  # its last record handed to the store
    committed_seq: int = 0  # its last record the store has committed

    def drive(self, identity: bytes) -> None:
        """``identity`` drives from its next batch: a new client numbers its
        records from 1, so the old numbers mean nothing."""
        me = identity.hex()
        if self.driver != me:
            self.driver, self.seq = me, 0
            self.stored_seq = self.committed_seq = 0

    def forget_driver(self) -> None:
        """The run's state was rebuilt (a rewind, a regroup, a fresh start):
        whoever drives next starts the numbering again."""
        self.driver, self.seq = "", 0
        self.stored_seq = self.committed_seq = 0

    def take_over(self, identity: bytes, seq: int) -> None:
        """The run is taken back from a client's state: its numbering goes on
        from the record it says it last had folded in."""
        self.driver, self.seq = identity.hex(), seq

    def row(self) -> dict[str, Any]:
        return {"driver": self.driver, "seq": self.seq, "stored_seq": self.stored_seq}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunLedger:
        stored = int(row.get("stored_seq") or 0)
        # What a row says is stored was committed with it.
        return cls(str(row.get("driver") or ""), int(row.get("seq") or 0), stored, stored)


@dataclass
class Batch:
    """One metrics batch on its way through the ledger."""

    run_id: str
    identity: bytes
    rank: int
    header: MetricsHeader
    records: list[DecodedRecord]
    raw: bytes  # the header frame as it came (stored as is when kept whole)
    body: bytes
    drives: bool  # from the run's driver (else telemetry only)
    seq: int = 0  # the last record's seq taken in
    fresh: int = 0  # 1 + the index of the first record the store lacks; 0: none
    folded: int = 0  # records taken in (a refused one stops the batch)
    stepped: int = 0  # the last STEP record's step taken in, for the rate


class Ledger:
    """Every run's ingest bookkeeping, and the buffers of the next tick."""

    def __init__(self) -> None:
        self._rows: list[tuple] = []  # record batches for the next tick
        self._dirty: set[str] = set()  # runs whose row changed since the last tick
        self._to_tell: dict[bytes, tuple[str, int]] = {}  # sender -> (run, last seq)
        self._persisted: Outgoing = []  # `persisted` messages not yet sent

    def changed(self, run_id: str) -> None:
        """The run's row goes to the store at the next tick."""
        self._dirty.add(run_id)

    def open_batch(
        self,
        ledger: RunLedger,
        run_id: str,
        identity: bytes,
        rank: int,
        header: MetricsHeader,
        records: list[DecodedRecord],
        raw: bytes,
        body: bytes,
        drives: bool,
    ) -> Batch:
        if drives:
            ledger.drive(identity)
        return Batch(run_id, identity, rank, header, records, raw, body, drives)

    def to_fold(self, ledger: RunLedger, batch: Batch) -> Iterator[tuple[int, DecodedRecord]]:
        """(index, record) for each record of the batch the policy has not
        taken yet. A caller that refuses one calls :meth:`refused` and stops. A
        batch from another rank than the driver is telemetry: nothing to fold."""
        records = batch.records
        first = batch.header.first_seq
        if not batch.drives:
            batch.seq, batch.folded = first - 1 + len(records), len(records)
            batch.stepped = next((r[0] for r in reversed(records) if r[1] != REPORT), 0)
            return
        stored, seq = ledger.stored_seq, first - 1
        for i, record in enumerate(records):
            seq += 1
            if seq > stored and not batch.fresh:
                batch.fresh = i + 1
            batch.seq, batch.folded = seq, i + 1
            if seq <= ledger.seq:
                continue  # folded in before a restart
            # Counted as folded before the engine takes it: a decision it
            # makes is journaled with the run's row, which must not have the
            # daemon fold this record again after a restart.
            ledger.seq = seq
            yield i, record
            if record[1] != REPORT:  # taken: the caller went on
                batch.stepped = record[0]

    def refused(self, ledger: RunLedger, batch: Batch, index: int) -> None:
        """The record at ``index`` was not taken (nor those after it): the
        client sends them again."""
        batch.folded = index
        batch.seq = ledger.seq = batch.header.first_seq + index - 1

    def close_batch(self, ledger: RunLedger, batch: Batch, stats: Mapping[str, int]) -> None:
        """Hand what the store lacks of the batch to the next tick, and note
        that the sender is to be told when it is committed."""
        fresh, folded, records = batch.fresh, batch.folded, batch.records
        if fresh and fresh <= folded:
            ledger.stored_seq = batch.seq
            self._dirty.add(batch.run_id)
            raw, body = batch.raw, batch.body
            if folded < len(records):  # store what was folded in, no more
                first = batch.header.first_seq
                kept = [(first + j, *records[j]) for j in range(fresh - 1, folded)]
                raw, body = BatchEncoder(batch.run_id, batch.rank).encode(kept, stats)
                skip = 0
            else:
                skip = fresh - 1  # the records before it are in the store already
            self._rows.append(
                (batch.run_id, records[fresh - 1][0], records[folded - 1][0], raw, body, skip)
            )
        self._to_tell[batch.identity] = (batch.run_id, batch.seq)

    def store_folded(
        self,
        ledger: RunLedger,
        run_id: str,
        identity: bytes,
        rank: int,
        records: list[tuple[int, int, str, dict[str, float]]],
        stats: ClientStats,
    ) -> None:
        """Records folded in after waiting for the other ranks ((seq, step,
        kind, metrics), with the reduced values: what the policy took is what
        is stored), for the next tick; their driver is told once committed."""
        raw, body = BatchEncoder(run_id, rank).encode(records, stats)
        self._rows.append((run_id, records[0][1], records[-1][1], raw, body, 0))
        ledger.stored_seq = records[-1][0]
        self._dirty.add(run_id)
        self._to_tell[identity] = (run_id, records[-1][0])

    def tell(self, identity: bytes, run_id: str, seq: int) -> None:
        """``identity``'s records up to ``seq`` are done with: it is told so
        with the next tick's commit."""
        self._to_tell[identity] = (run_id, seq)

    def drop_records(self, run_id: str) -> None:
        """Records of the run not yet handed to the store belong to a timeline
        that ended (a fresh start): they are not stored."""
        self._rows = [row for row in self._rows if row[0] != run_id]

    def tick(
        self, rows_of: Callable[[str, float], dict[str, Any] | None], wall: float
    ) -> tuple[list, dict[bytes, tuple[str, int]]]:
        """The store's next transaction: (ops, who to tell when committed).
        ``rows_of(run_id, wall)`` gives a changed run's row, or None when the
        run is gone."""
        ops: list = []
        if self._rows:
            ops.append(("batches", self._rows))
            self._rows = []
        for run_id in self._dirty:
            row = rows_of(run_id, wall)
            if row is not None:
                ops.append(("run", row))
        self._dirty.clear()
        notice, self._to_tell = self._to_tell, {}
        return ops, notice

    def committed(
        self,
        notice: Mapping[bytes, tuple[str, int]],
        ledgers: Callable[[str], RunLedger | None],
    ) -> None:
        """The store committed a tick: tell its senders (``persisted``), and
        move each run's committed_seq up to what its driver was told.
        ``ledgers(run_id)`` gives a run's ledger, or None."""
        for identity, (run_id, seq) in notice.items():
            self._persisted.append((identity, [Persisted.frame(run_id, seq)]))
            ledger = ledgers(run_id)
            if ledger is not None and ledger.driver == identity.hex():
                ledger.committed_seq = max(ledger.committed_seq, min(seq, ledger.stored_seq))

    def persisted(self) -> Outgoing:
        out, self._persisted = self._persisted, []
        return out
