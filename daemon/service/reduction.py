"""One decision from every rank's metrics: a run of several ranks whose
policy decides on a metric (plateau's ``val_loss``, say) decides on that
metric reduced over the ranks (``mean`` by default, ``min``, ``max``; or
``rank0``, the driver's alone), and not before every live rank has sent its
value for the step.

The driver's records (the lowest rank's: its numbering is the run's, see
ledger.py) wait here until each other live rank has sent the record at the
same place in the stream, has gone past it, or is known not to report the
metric; then they go to the policy with the reduced value in place of the
driver's, and are stored that way, so a replay of the stored stream
(``lrpilot simulate``, a resume) decides as the live run did.

A record's place is its :data:`Key`: a step's record ``(step, 0, 0)``, the
n-th report after it ``(step, 1, n)``. A rank that sends nothing for
``timeout`` seconds while a record waits for it is left out of decisions
(counted, logged, shown) until it sends again; a rank that was waited for at
a report and went on to its next step without the metric (it does not
report it: validation on rank 0 only) is not waited for at reports of that
metric again until it reports it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from lrpilot.protocol import REPORT

Key = tuple[int, int, int]
# A rank this far ahead of the driver keeps at most this many records here;
# older ones go (counted): a driver that far behind is stuck, not slow.
MAX_AHEAD = 10_000


def reduce_values(how: str, values: list[float]) -> float:
    """``values[0]`` is the driver's. NaN in any rank's value is NaN in the
    result (a diverging rank is news, not noise), as an all-reduce gives."""
    if how == "rank0" or len(values) == 1:
        return values[0]
    if any(math.isnan(v) for v in values):
        return math.nan
    if how == "min":
        return min(values)
    if how == "max":
        return max(values)
    return math.fsum(values) / len(values)


class KeyCounter:
    """Gives each record of one rank's stream its key."""

    def __init__(self) -> None:
        self.step = -1
        self.reports = 0

    def key(self, step: int, kind: str) -> Key:
        if kind != REPORT:
            self.step, self.reports = step, 0
            return (step, 0, 0)
        if step != self.step:
            self.step, self.reports = step, 0
        self.reports += 1
        return (step, 1, self.reports - 1)


@dataclass
class Waiting:
    """A driver record not yet decided on."""

    seq: int
    step: int
    kind: str
    metrics: dict[str, float]
    key: Key
    since: float  # when it came (monotonic)


@dataclass
class RankInput:
    """What one other rank has sent that a waiting record may need."""

    counter: KeyCounter = field(default_factory=KeyCounter)
    values: deque = field(default_factory=deque)  # (key, seq, {metric: value})
    last_key: Key = (-1, 0, 0)  # the furthest place it has sent
    last_seq: int = 0  # its last record's seq
    told_seq: int = 0  # the seq it may be told is persisted (its records used)
    sent_seq: int = 0  # the last told_seq handed on to be told
    silent_on: set[str] = field(default_factory=set)  # metrics it does not report
    left_out: bool = False  # it kept a decision waiting past the timeout

    def done_with(self, key: Key, names: list[str]) -> bool:
        if self.last_key >= key:
            return True  # sent it, or went past it without it
        # A report of metrics this rank does not report: nothing to wait for.
        return key[1] == 1 and all(name in self.silent_on for name in names)

    def value_at(self, key: Key) -> dict[str, float] | None:
        for at, _, values in self.values:
            if at == key:
                return values
            if at > key:
                return None
        return None

    def used_up_to(self, key: Key) -> None:
        """Every record of this rank at or before ``key`` is used (or never
        will be): it may be told they are persisted once the driver's are."""
        values = self.values
        while values and values[0][0] <= key:
            values.popleft()
        self.told_seq = values[0][1] - 1 if values else self.last_seq


@dataclass
class Released:
    """A driver record decided on: its metrics with the reduced values."""

    seq: int
    step: int
    kind: str
    metrics: dict[str, float]


class RankReduction:
    """One run's records waiting for its ranks (see the module's doc)."""

    def __init__(self, timeout: float, after_step: int) -> None:
        self.timeout = timeout
        self.waiting: deque[Waiting] = deque()
        self.driver_keys = KeyCounter()
        self.ranks: dict[int, RankInput] = {}
        self.released: Key = (after_step, 0, 0) if after_step > 0 else (-1, 0, 0)
        self.queued_seq = 0  # the driver's last seq queued here
        # Whose records wait: kept here, as the driver may leave (bye, killed)
        # while they wait; they are decided on all the same.
        self.driver_rank = -1
        self.driver_identity = b""
        self.timeouts = 0  # records decided on without a rank that kept them waiting
        self.dropped = 0  # other ranks' records let go of (MAX_AHEAD)
        self.left_out_now: list[int] = []  # ranks left out by the last release()
        # The rank the head record waited for when last looked at: looked at
        # first, so a record waiting for many ranks costs one look per batch
        # until that one has sent (not a look at every rank per batch).
        self.blocker: int | None = None
        self._told: set[int] = set()  # ranks whose told_seq moved since told()

    # --- input ----------------------------------------------------------------

    def wait(self, seq: int, step: int, kind: str, metrics: dict[str, float], now: float) -> None:
        """A driver record, in seq order; one already queued is skipped."""
        if seq <= self.queued_seq:
            return
        self.queued_seq = seq
        key = self.driver_keys.key(step, kind)
        self.waiting.append(Waiting(seq, step, kind, metrics, key, now))

    def add(
        self, rank: int, seq: int, step: int, kind: str, metrics: Mapping[str, float], watched
    ) -> None:
        """Another rank's record. Only the watched metrics' values are kept."""
        rank_input = self.ranks.get(rank)
        if rank_input is None:
            rank_input = self.ranks[rank] = RankInput()
        key = rank_input.counter.key(step, kind)
        rank_input.left_out = False
        rank_input.last_key = max(rank_input.last_key, key)
        rank_input.last_seq = max(rank_input.last_seq, seq)
        values = {name: float(metrics[name]) for name in watched if name in metrics}
        if values:
            rank_input.silent_on.difference_update(values)
        if values and key > self.released:
            rank_input.values.append((key, seq, values))
            if len(rank_input.values) > MAX_AHEAD:
                rank_input.values.popleft()
                self.dropped += 1
        if not rank_input.values:
            rank_input.told_seq = rank_input.last_seq
            self._told.add(rank)

    def new_driver(self, rank: int, identity: bytes) -> None:
        """Another client drives (or the driver says hello again): it numbers
        its records afresh and sends again what had not been folded in."""
        self.driver_rank, self.driver_identity = rank, identity
        self.ranks.pop(rank, None)  # its records are the driver's now
        self.waiting.clear()
        self.queued_seq = 0
        self.driver_keys = KeyCounter()

    def skip_to_released(self, records: list, first: int) -> list[tuple[int, tuple]]:
        """(seq, record) of the records past what is decided on, for a new
        driver whose earlier records fed the old driver's."""
        counter = KeyCounter()
        return [
            (first + i, record)
            for i, record in enumerate(records)
            if counter.key(record[0], record[1]) > self.released
        ]

    def forget_rank(self, rank: int) -> None:
        """The rank said hello again (a new session numbers from 1): what it
        sent before is sent again."""
        self.ranks.pop(rank, None)

    # --- output ---------------------------------------------------------------

    def release(
        self,
        now: float,
        live: Mapping[int, object],
        watched: Mapping[str, str],
        final: bool = False,
    ) -> Iterator[Released]:
        """The driver's records that may be decided on now, in order, with the
        reduced values. ``live``: the run's connected ranks (by rank), the
        ones waited for; ``watched``: metric -> how it is reduced. A value a
        rank sent counts even when it has left since. ``final``: the driver
        has gone and another takes over: every waiting record goes now, on
        the values that came."""
        self.left_out_now = []
        driver = self.driver_rank
        while self.waiting:
            head = self.waiting[0]
            names = [n for n in head.metrics if watched.get(n, "rank0") != "rank0"]
            held_by = self.blocker
            blocker = self.ranks.get(held_by) if held_by is not None and held_by in live else None
            if (
                names
                and blocker is not None
                and not blocker.left_out
                and not blocker.done_with(head.key, names)
                and now - head.since < self.timeout
            ):
                return  # still waiting for the same rank
            if names:
                missing = []
                for rank in live:
                    if rank == driver:
                        continue
                    rank_input = self.ranks.get(rank)
                    if rank_input is None:
                        rank_input = self.ranks[rank] = RankInput()
                    if not rank_input.left_out and not rank_input.done_with(head.key, names):
                        missing.append((rank, rank_input))
                if missing and not final:
                    if now - head.since < self.timeout:
                        self.blocker = missing[0][0]
                        return
                    self._give_up_on(head, names, missing)
            metrics = dict(head.metrics)
            for name in names:
                values = [metrics[name]]
                for rank_input in self.ranks.values():
                    theirs = rank_input.value_at(head.key)
                    if theirs is not None and name in theirs:
                        values.append(theirs[name])
                metrics[name] = reduce_values(watched[name], values)
            self.waiting.popleft()
            self.released = head.key
            self.blocker = None
            for rank, rank_input in self.ranks.items():
                if rank_input.values and rank_input.values[0][0] <= head.key:
                    rank_input.used_up_to(head.key)
                    self._told.add(rank)
            yield Released(head.seq, head.step, head.kind, metrics)

    def _give_up_on(self, head: Waiting, names: list[str], missing: list) -> None:
        self.timeouts += 1
        for rank, rank_input in missing:
            if head.kind == REPORT and rank_input.last_key >= (head.step, 0, 0):
                # It has the step and went no further: it does not report these.
                rank_input.silent_on.update(names)
            else:
                rank_input.left_out = True
                self.left_out_now.append(rank)

    def left_out(self) -> list[int]:
        # list() first: the exporter reads this from its own thread.
        return sorted(rank for rank, r in list(self.ranks.items()) if r.left_out)

    def told(self) -> Iterator[tuple[int, int]]:
        """(rank, seq) of each other rank whose records are used up to a seq
        it has not been told of yet."""
        changed, self._told = self._told, set()
        for rank in changed:
            rank_input = self.ranks.get(rank)
            if rank_input is not None and rank_input.told_seq > rank_input.sent_seq:
                rank_input.sent_seq = rank_input.told_seq
                yield rank, rank_input.told_seq
