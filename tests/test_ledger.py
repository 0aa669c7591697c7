"""The ingest ledger (daemon/service/ledger.py) on its own: which records of
a batch the policy takes, what the store is handed, who is told when the
store commits, and how a run's numbering survives a restart and resets when
another client drives."""

from __future__ import annotations

from lrpilot.daemon.service.ledger import Ledger, RunLedger
from lrpilot.protocol import REPORT, STEP, BatchEncoder, MetricsHeader, Persisted, decode


def batch_of(ledger: Ledger, run: RunLedger, identity: bytes, first_seq: int, records, drives=True):
    frames = BatchEncoder("r", 0).encode(
        [(first_seq + i, *record) for i, record in enumerate(records)], {}
    )
    header = MetricsHeader.model_validate_json(frames[0])
    decoded = [(step, kind, dict(metrics)) for step, kind, metrics in records]
    return ledger.open_batch(run, "r", identity, 0, header, decoded, frames[0], frames[1], drives)


def rows_of(_run_id: str, _wall: float) -> dict:
    return {"run_id": "r"}


def test_a_batch_is_folded_once_and_stored_once():
    ledger, run = Ledger(), RunLedger()
    records = [(1, STEP, {"loss": 1.0}), (1, REPORT, {"val_loss": 2.0}), (2, STEP, {"loss": 0.9})]
    batch = batch_of(ledger, run, b"a", 1, records)
    taken = [i for i, _ in ledger.to_fold(run, batch)]
    ledger.close_batch(run, batch, {})
    assert taken == [0, 1, 2] and (run.driver, run.seq, run.stored_seq) == (b"a".hex(), 3, 3)
    assert batch.stepped == 2  # the last STEP taken, for the step rate
    ops, notice = ledger.tick(rows_of, 0.0)
    assert [op for op, _ in ops] == ["batches", "run"]
    [row] = ops[0][1]
    assert row[:3] == ("r", 1, 2) and row[5] == 0  # steps 1..2, nothing skipped
    assert notice == {b"a": ("r", 3)}
    # Sent again (the client did not hear `persisted`): nothing new.
    again = batch_of(ledger, run, b"a", 1, records)
    assert list(ledger.to_fold(run, again)) == []
    ledger.close_batch(run, again, {})
    ops, notice = ledger.tick(rows_of, 0.0)
    assert ops == [] and notice == {b"a": ("r", 3)}


def test_a_batch_that_overlaps_the_store_keeps_only_what_it_lacks():
    ledger, run = Ledger(), RunLedger(driver=b"a".hex(), seq=2, stored_seq=1, committed_seq=1)
    records = [(1, STEP, {}), (2, STEP, {}), (3, STEP, {})]
    batch = batch_of(ledger, run, b"a", 1, records)
    # Folded up to seq 2 (before a restart), stored up to 1: the store lacks
    # records 2 and 3, the policy lacks 3.
    assert [i for i, _ in ledger.to_fold(run, batch)] == [2]
    ledger.close_batch(run, batch, {})
    ops, _ = ledger.tick(rows_of, 0.0)
    [row] = ops[0][1]
    assert row[1:3] == (2, 3) and row[5] == 1  # the first record is skipped on read


def test_a_refused_record_and_those_after_it_are_neither_folded_nor_stored():
    ledger, run = Ledger(), RunLedger()
    records = [(1, STEP, {}), (2, STEP, {}), (9, STEP, {}), (10, STEP, {})]
    batch = batch_of(ledger, run, b"a", 1, records)
    for i, (step, _, _) in ledger.to_fold(run, batch):
        if step == 9:
            ledger.refused(run, batch, i)
            break
    ledger.close_batch(run, batch, {})
    assert (run.seq, run.stored_seq, batch.seq, batch.stepped) == (2, 2, 2, 2)
    ops, _ = ledger.tick(rows_of, 0.0)
    [row] = ops[0][1]
    # Re-encoded to the two records taken: a replay must not see step 9.
    assert row[1:3] == (1, 2) and row[5] == 0
    header = MetricsHeader.model_validate_json(row[3])
    assert header.first_seq == 1 and sum(count for _, count in header.blocks) == 2


def test_another_ranks_batch_is_telemetry():
    ledger, run = Ledger(), RunLedger(driver=b"a".hex(), seq=5, stored_seq=5, committed_seq=5)
    batch = batch_of(ledger, run, b"b", 1, [(1, STEP, {}), (1, REPORT, {"x": 1.0})], drives=False)
    assert list(ledger.to_fold(run, batch)) == []
    ledger.close_batch(run, batch, {})
    assert (run.driver, run.seq, batch.stepped, batch.seq) == (b"a".hex(), 5, 1, 2)
    ops, notice = ledger.tick(rows_of, 0.0)
    assert ops == [] and notice == {b"b": ("r", 2)}  # told, so it forgets them


def test_a_new_driver_numbers_afresh_and_committed_follows_the_driver():
    ledger, run = Ledger(), RunLedger(driver=b"a".hex(), seq=7, stored_seq=7, committed_seq=7)
    batch = batch_of(ledger, run, b"b", 1, [(8, STEP, {})])
    assert [i for i, _ in ledger.to_fold(run, batch)] == [0]
    ledger.close_batch(run, batch, {})
    assert (run.driver, run.seq, run.stored_seq, run.committed_seq) == (b"b".hex(), 1, 1, 0)
    _, notice = ledger.tick(rows_of, 0.0)
    ledger.committed({**notice, b"a": ("r", 7)}, lambda run_id: run)
    assert run.committed_seq == 1  # a's old numbers do not count
    told = sorted((to, decode(frames)) for to, frames in ledger.persisted())
    assert told == [(b"a", Persisted(run="r", seq=7)), (b"b", Persisted(run="r", seq=1))]
    assert ledger.persisted() == []


def test_a_run_ledger_round_trips_through_its_row():
    run = RunLedger(driver="ab", seq=9, stored_seq=6, committed_seq=4)
    back = RunLedger.from_row(run.row())
    # What a row says is stored was committed with it.
    assert (back.driver, back.seq, back.stored_seq, back.committed_seq) == ("ab", 9, 6, 6)
    back.forget_driver()
    assert back.row() == {"driver": "", "seq": 0, "stored_seq": 0}
    back.take_over(b"\x01", 12)
    assert (back.driver, back.seq) == ("01", 12)


def test_a_fresh_start_drops_the_records_not_yet_stored():
    ledger, run = Ledger(), RunLedger()
    batch = batch_of(ledger, run, b"a", 1, [(1, STEP, {})])
    list(ledger.to_fold(run, batch))
    ledger.close_batch(run, batch, {})
    ledger.drop_records("r")
    ops, _ = ledger.tick(rows_of, 0.0)
    assert [op for op, _ in ops] == ["run"]
