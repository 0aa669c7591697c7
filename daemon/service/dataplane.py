"""The data plane: what the daemon does with each message from a training
process. Logic over (identity, frames) in and (identity, frames) out, so the
server owns the socket and tests can drive it without one.

Durability: a command is journaled (on disk) before it is returned for
sending. Records and run state go to the store's writer once per ``tick()``;
when a tick's batch is committed, the clients that sent its records are told
(``persisted``) and forget them. A client keeps what is not yet persisted and
sends it again after a daemon restart, so the restarted daemon, which resumes
from the store, sees every record exactly once (it skips by sequence number
what it already had).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from lrpilot.policies import parse_policy
from lrpilot.protocol import (
    MAX_COUNT,
    REPORT,
    Ack,
    Bye,
    ClientStats,
    Error,
    Hello,
    LRCommand,
    MessageTooLarge,
    MetricsHeader,
    Moved,
    Processed,
    ProtocolError,
    Welcome,
    decode,
    decode_records,
    encode,
    record_layouts,
)

from .auth import Key, data_refusal
from .config import DaemonConfig
from .engine import Change, StepGapTooLarge
from .ledger import Ledger, RunLedger
from .reduction import RankReduction
from .registry import Run, RunRegistry, Session
from .store import Store, StoreWriteError

log = logging.getLogger("lrpilot.daemon")

Outgoing = list[tuple[bytes, list[bytes]]]
# Called with (run, change) after a change is journaled, on the daemon loop:
# a listener must return at once (queue the work, never do I/O).
ChangeListener = Callable[[Run, Change], None]
ASK_AGAIN_AFTER = 1.0  # seconds between unknown_session answers to one sender


def error(code: str, message: str) -> list[bytes]:
    return [encode(Error(code=code, message=message))]


class DataPlane:
    def __init__(self, config: DaemonConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or Store(config.state_dir, config.durability)
        self.registry = RunRegistry(config.command_lead_steps, config.max_step_gap)
        self.records_ingested = 0
        self.rejected: Counter[str] = Counter()  # messages and records refused, by reason
        self.commands_sent = 0
        self.journal_deferred = 0  # commands sent while the store could not write them
        # Where a decision made inside a batch goes the moment it is journaled
        # (the server's socket), rather than after the rest of the batch is
        # folded in and its store ops are made: None returns it with the
        # batch's replies (tests, replays).
        self.send_now: Callable[[Outgoing], None] | None = None
        # In a shard (--shards): the address of the shard that serves a run,
        # None for this one (daemon/service/sharding.py).
        self.elsewhere: Callable[[str], str | None] | None = None
        self.hellos_moved = 0
        self.forgotten_runs = 0  # ended runs let go of from memory (still in the store)
        self.change_listeners: list[ChangeListener] = []
        # With --keys: every message must come with an allowed key (the
        # server passes it); handshakes refused before a message are counted
        # by the Gatekeeper, whose counter the exporter reads from here.
        self.keys_required = config.keys is not None
        self.auth_refused: Counter[str] = Counter()
        self._asked: dict[bytes, float] = {}  # unknown senders, when last asked for a hello
        self.ledger = Ledger()  # where records stand; what the next tick stores
        self._told_metrics: set[str] = set()  # runs told they report too many names
        self._waiting_runs: set[str] = set()  # runs with records waiting for their ranks
        for row in self.store.load_runs():
            run = self._build_run(row)
            if run is not None:
                self.registry.add(run)
        self._forget_ended()

    def _build_run(self, row: dict[str, Any]) -> Run | None:
        """A stored run as the daemon serves it; None (and the row set aside)
        when it cannot be built: one such run must not stop the others."""
        try:
            run = Run.from_row(row, self.config.command_lead_steps, self.config.max_step_gap)
        except (ValueError, TypeError, KeyError) as exc:  # SpecError is a ValueError
            self.store.quarantine(row["run_id"], f"the daemon cannot build the run: {exc}")
            return None
        engine = run.engine
        engine.last_change = last = self.store.last_command(run.run_id)
        if last is not None and last.policy is not None and last.state_step >= engine.step:
            # A switch journaled with its start ahead: it starts there still.
            engine.starts_at = last.state_step + 1
        return run

    def _forget_ended(self) -> None:
        """Keep at most --max-ended-runs ended runs in memory (the oldest go;
        the store keeps them, and a run that comes back is read from it)."""
        runs = self.registry.runs
        ended = [r for r in runs.values() if not r.sessions]
        extra = len(ended) - self.config.max_ended_runs
        if extra <= 0:
            return
        ended.sort(key=lambda r: (r.ended or 0.0, r.created))
        for run in ended[:extra]:
            del runs[run.run_id]
            self._told_metrics.discard(run.run_id)
        self.forgotten_runs += extra

    # --- messages ---------------------------------------------------------

    def handle(
        self, identity: bytes, frames: Sequence[bytes], now: float, key: Key | None = None
    ) -> Outgoing:
        """One message from a training process. ``key``: the allowed key it
        came with when the daemon has keys (None: no keys, or, with keys, a
        key removed since it connected, which may do nothing)."""
        try:
            message = decode(frames, self.config.max_message_bytes)
        except MessageTooLarge as exc:
            self.rejected["oversized"] += 1
            return [(identity, error("oversized", str(exc)))]
        except ProtocolError as exc:
            self.rejected["malformed"] += 1
            return [(identity, error("malformed", str(exc)))]
        if self.keys_required:
            refused = self._forbidden(identity, message, key)
            if refused is not None:
                return refused
        if isinstance(message, MetricsHeader):
            return self._metrics(identity, message, frames[1], now, frames[0])
        if isinstance(message, Hello):
            moved = self.elsewhere(message.run) if self.elsewhere is not None else None
            if moved is not None:
                self.hellos_moved += 1
                return [(identity, [encode(Moved(run=message.run, address=moved))])]
            return self._hello(identity, message, now, key)
        known = self.registry.session(identity)
        if known is None:
            if isinstance(message, (Bye, Ack)):
                return []
            self.rejected["unknown_session"] += 1
            return [(identity, error("unknown_session", "say hello first"))]
        run, session = known
        session.last_seen = now
        if isinstance(message, Ack):
            session.applied_version = max(session.applied_version, message.version)
            session.applied_step = message.applied_step
            last = run.engine.last_change
            if last is not None and last.version == message.version:
                session.late_by = max(0, message.applied_step - last.effective_step)
            if session is run.driver:
                self.store.submit(
                    [("applied", (run.run_id, message.version, message.applied_step, message.late))]
                )
            return []
        if isinstance(message, Bye):
            session.stats = message.stats
            self.registry.end_session(identity, now)
            self.ledger.changed(run.run_id)
            log.info("run %s rank %d said bye at step %d", run.run_id, session.rank, message.step)
            return []
        self.rejected["unexpected"] += 1
        return [(identity, error("unexpected", f"a client does not send {message.t!r}"))]

    def _forbidden(self, identity: bytes, message: Any, key: Key | None) -> Outgoing | None:
        """With keys: a message its key may not send, answered with one line
        (counted); None when it may. A trainer key speaks only for its runs
        (checked at every message: SIGHUP may have narrowed them); a session
        keeps the key it said hello with."""
        known = None if isinstance(message, Hello) else self.registry.session(identity)
        run = known[0].run_id if known is not None else getattr(message, "run", None)
        said_hello_with = getattr(known[1].key, "public", None) if known is not None else None
        if key is not None and known is not None and said_hello_with != key.public:
            why: str | None = f"key {key.name!r} is not the key this session said hello with"
        else:
            why = data_refusal(key, run if isinstance(run, str) else None)
        if why is None:
            return None
        self.auth_refused["forbidden"] += 1
        if isinstance(message, (Ack, Bye)):
            return []
        return [(identity, error("forbidden", why))]

    def _hello(self, identity: bytes, hello: Hello, now: float, key: Key | None = None) -> Outgoing:
        run = self.registry.runs.get(hello.run) or self._restore(hello.run)
        refusal = self._refusal(identity, hello, run, now)
        if refusal is not None:
            code, message = refusal
            self.rejected[code] += 1
            # The client says hello again when told unknown_session; not
            # before a second has passed (see _unknown), not at every step.
            self._asked[identity] = now
            log.warning("run %s rank %d: hello refused: %s", hello.run, hello.rank, message)
            return [(identity, error(code, message))]
        self._asked.pop(identity, None)
        if run is not None:
            self._end_earlier_attempts(run, hello, now)
        if run is not None and run.reduction is not None:
            if hello.rank <= min(run.sessions, default=hello.rank):
                # The driver (again): what waited is sent again after this
                # hello, against whatever state the hello leaves the run in.
                run.reduction = None
            else:
                run.reduction.forget_rank(hello.rank)
        # A lower rank of the same attempt connected: this one joins it
        # (late); none: it may be resuming ahead of the rank that will drive.
        lower_connected = run is not None and any(r < hello.rank for r in run.sessions)
        rewound = False
        try:
            if run is None:
                run = self.registry.new_run(hello)
                try:
                    self.store.save_run(run.row(time.time()))
                except StoreWriteError as exc:  # the next tick's row waits in the writer
                    log.error("run %s: %s", hello.run, exc)
            elif self._is_fresh_start(run, hello):
                self._fresh_start(run, hello)
            elif len(hello.groups) != len(run.group_names):
                log.warning(
                    "run %s came back with %d param groups, not %d: taking its state",
                    hello.run,
                    len(hello.groups),
                    len(run.group_names),
                )
                self.registry.regroup(run, hello)
            elif hello.applied_version > run.engine.version and self._would_drive(
                identity, run, hello
            ):
                self._take_back(identity, run, hello)
            elif hello.step < run.engine.step and hello.rank <= min(run.sessions, default=0):
                # Only the rank that drives (the lowest; rank 0 of a run that
                # comes back) sets the run's step: another rank joining behind
                # it does not take the policy back.
                self._rewind(run, hello)
                rewound = True
            elif self._is_driver(identity, run) and self._past_gap(run, hello):
                self._skip_to(run, hello)
        except ValueError as exc:  # a policy spec or state the daemon cannot use
            self.rejected["bad_hello"] += 1
            return [(identity, error("bad_hello", f"run {hello.run}: {exc}"))]
        session = self.registry.join(identity, run, hello, now)
        session.key = key
        if run.driver is session:
            # An async client has already set the LRs of its next step when a
            # decision reaches it; scheduling one step later lets it apply the
            # decision on time (and say so) instead of always one step late.
            run.engine.lead_steps = self.config.command_lead_steps + (0 if hello.sync else 1)
        self.ledger.changed(run.run_id)
        log.info(
            "run %s rank %d/%d hello from %s pid %d at step %d",
            hello.run,
            hello.rank,
            hello.world_size,
            hello.host,
            hello.pid,
            hello.step,
        )
        welcome = Welcome(
            run=run.run_id,
            version=run.engine.version,
            command=self._welcome_command(run, hello, rewound, lower_connected),
        )
        out: Outgoing = [(identity, [encode(welcome)])]
        command = welcome.command
        if rewound and command is not None:
            # The other ranks, connected before the rewind, lack it too.
            frames = [encode(command)]
            out += [
                (other.identity, frames)
                for other in run.sessions.values()
                if other is not session and other.applied_version < command.version
            ]
        return out

    @staticmethod
    def _welcome_command(
        run: Run, hello: Hello, rewound: bool, lower_connected: bool
    ) -> LRCommand | None:
        """What a client saying hello lacks. The journaled command itself, at
        its own effective step, when the engine has it: for a rank resuming
        from a checkpoint, the newest made on a state at or before its step
        (decided before the checkpoint, due after it), not the state of the
        timeline it left. Else the run's whole state, one step ahead for an
        async client (it has set its next step's LRs)."""
        engine, applied = run.engine, hello.applied_version
        behind = engine.version > applied or engine.held is not None
        if not behind:
            return None
        if engine.knows(applied):
            resuming = rewound or (hello.step < engine.step and not lower_connected)
            return engine.as_of(hello.step if resuming else MAX_COUNT, applied)
        return engine.current(lead=0 if hello.sync else 1)

    def _end_earlier_attempts(self, run: Run, hello: Hello, now: float) -> None:
        """torchrun stops every worker of an attempt before it starts the next:
        the sessions of an earlier attempt are of processes that are gone
        (killed: they said no bye), and must neither hold their ranks nor be
        waited for."""
        stale = [s for s in run.sessions.values() if s.attempt < hello.attempt]
        for session in stale:
            self.registry.end_session(session.identity, now)
        if stale:
            self.ledger.changed(run.run_id)
            log.info(
                "run %s: attempt %d of the job (torchrun restarted it): ended %d session(s) "
                "of an earlier attempt",
                run.run_id,
                hello.attempt,
                len(stale),
            )

    def _refusal(
        self, identity: bytes, hello: Hello, run: Run | None, now: float
    ) -> tuple[str, str] | None:
        """Why a hello may not join, as (error code, one line), or None.

        Until clients have keys, anything that reaches the data plane may say
        hello; what it may not do is take a rank another live process holds,
        or change what a live run is (its groups); nor start more runs than
        the daemon serves."""
        if run is None:
            if self.registry.active_count() >= self.config.max_runs:
                return "too_many_runs", (
                    f"the daemon serves {self.config.max_runs} active runs (--max-runs); "
                    f"run {hello.run!r} is refused"
                )
            return None
        holder = run.sessions.get(hello.rank)
        if holder is not None and holder.identity != identity:
            same_process = (holder.host, holder.pid) == (hello.host, hello.pid)
            silent = now - holder.last_seen
            newer_attempt = hello.attempt > holder.attempt  # torchrun stopped the holder
            if not (same_process or newer_attempt) and silent < self.config.rank_takeover_after:
                return "rank_taken", (
                    f"run {hello.run!r} rank {hello.rank} is held by a live session "
                    f"(host {holder.host!r} pid {holder.pid}, heard {silent:.1f}s ago); "
                    f"a second one is refused (a restarted process gets it after "
                    f"{self.config.rank_takeover_after:g}s of silence)"
                )
        others = [s for rank, s in run.sessions.items() if rank != hello.rank]
        if others and len(hello.groups) != len(run.group_names):
            return "bad_hello", (
                f"run {hello.run!r} is live with {len(run.group_names)} param group(s); "
                f"this hello has {len(hello.groups)}"
            )
        return None

    def _restore(self, run_id: str) -> Run | None:
        """A run let go of from memory (--max-ended-runs) that comes back."""
        row = self.store.load_run(run_id)
        run = self._build_run(row) if row is not None else None
        if run is not None:
            self.registry.add(run)
        return run

    def _is_driver(self, identity: bytes, run: Run) -> bool:
        driver = run.driver
        return driver is not None and driver.identity == identity

    @staticmethod
    def _past_gap(run: Run, hello: Hello) -> bool:
        return hello.step > run.engine.step + run.engine.max_gap

    @staticmethod
    def _is_fresh_start(run: Run, hello: Hello) -> bool:
        """A script started again from scratch under a run id that has a
        past (a common habit): no rank of the old one is connected, and the
        client is at step 0 having applied nothing. A resume from a
        checkpoint says the step it is at; a rank joining a live run joins."""
        return (
            not run.sessions
            and hello.step == 0
            and hello.applied_version == 0
            and (run.engine.step > 0 or run.engine.version > 0)
        )

    def _fresh_start(self, run: Run, hello: Hello) -> None:
        """Begin a new timeline for the run: the script's groups and policy,
        step 0; the old timeline's records and snapshots go (the journal
        keeps its changes, and a marker entry says where it ended). Versions
        go on from the old ones, so no command of the old timeline can be
        taken for one of the new."""
        old = run.engine
        ended_at = old.step
        self.registry.restart(run, hello)
        run.engine.version = old.version
        # Records not yet handed to the store are the old timeline's too.
        self.ledger.drop_records(run.run_id)
        self.store.submit([("truncate", (run.run_id, 0))])
        # Journaled; no rank is connected yet to send it to (the welcome has it).
        self._daemon_change(
            run,
            f"fresh start: the run's previous timeline ended at step {ended_at}",
            "fresh_start",
            old.lrs,
        )
        log.info(
            "run %s started afresh (its previous timeline ended at step %d, version %d)",
            run.run_id,
            ended_at,
            old.version,
        )

    @staticmethod
    def _would_drive(identity: bytes, run: Run, hello: Hello) -> bool:
        others = [rank for rank, s in run.sessions.items() if s.identity != identity]
        return hello.rank <= min(others, default=hello.rank)

    def _take_back(self, identity: bytes, run: Run, hello: Hello) -> None:
        """The driver has applied versions this daemon does not have: it lost
        them (its store could not write them, then it stopped). Making the
        decisions again from the records sent again would give other changes
        the same versions; instead the run is taken back from the client's
        state (policy, step, the records it took in, the operator's hold),
        and the journal says so."""
        old = run.engine
        engine = self.registry.engine_from(hello)
        engine.lead_steps = old.lead_steps
        engine.held = list(hello.held) if hello.held is not None else None
        run.engine = engine
        run.ledger.take_over(identity, hello.seq)
        lost = f"v{old.version + 1}" + (
            f"..v{hello.applied_version}" if hello.applied_version > old.version + 1 else ""
        )
        self._daemon_change(
            run,
            f"the daemon had lost {lost} (its store could not write them before it stopped): "
            f"the run is taken back from rank {hello.rank}'s state at step {hello.step}",
            "resync",
            old.lrs,
        )
        log.warning("run %s: lost %s; took the run back from its client", run.run_id, lost)

    def _daemon_change(self, run: Run, reason: str, cause: str, old_lrs: list[float]) -> None:
        """Journal (and send) the daemon's own change to a run: its whole
        state as a new version, where a timeline turned. One step ahead: the
        client has set the LRs of its next step when it reads the answer to
        its hello (the command would land a step late and say so)."""
        change = run.engine.command(
            reason, actor="daemon", lead=1, policy_changed=True, cause=cause, old_lrs=old_lrs
        )
        self.send_command(run, change)

    def _skip_to(self, run: Run, hello: Hello) -> None:
        """The driver is further ahead than the engine steps through (it
        dropped records while the daemon was away, or was told step_gap):
        take the policy's state from it when it runs the same policy, else
        move the clock alone. Version, hold and the last command stay."""
        engine = run.engine
        theirs = parse_policy(hello.policy) if hello.policy is not None else None
        same = theirs == engine.spec
        if same and hello.policy_state is not None and engine.policy is not None:
            engine.load(hello.policy_state)
        engine.step = hello.step
        engine.exhausted = False
        log.warning(
            "run %s: the driver is at step %d, past a gap of more than %d steps: took %s from it",
            run.run_id,
            hello.step,
            engine.max_gap,
            "the policy's state" if same else "the step (not the policy: it runs another)",
        )

    def _rewind(self, run: Run, hello: Hello) -> None:
        """A client came back at an earlier step (restarted from a checkpoint):
        rebuild the run's state at that step from the newest snapshot before
        it and the recorded stream. If an operator switched the policy since,
        the current policy keeps its state (a switch is not undone)."""
        step = hello.step
        driver = run.driver
        if driver is not None and driver.rank != hello.rank:
            # Under torchrun the ranks say hello in any order; a lower rank
            # a step behind the one that drove so far takes the run over.
            why = f"rank {hello.rank} joined at step {step}, behind rank {driver.rank}"
        else:
            why = f"resumed from a checkpoint at step {step}"
        if not self.flush():  # the snapshot and records up to now must be readable
            log.warning(
                "run %s %s: the store is behind (%s); the current state goes on from there",
                run.run_id,
                why,
                self.store.error,
            )
            run.engine.step = step
            return
        snapshot = self.store.snapshot_at(run.run_id, step)
        current = run.engine.spec.model_dump() if run.engine.spec else None
        # Either way, what was recorded after the step is a timeline that no
        # longer is: a later resume or replay must not read it.
        self.store.submit([("truncate", (run.run_id, step))])
        if snapshot is None or snapshot["policy"] != current:
            log.info("run %s %s: the current policy and state go on from there", run.run_id, why)
            run.engine.step = step
            return
        engine = type(run.engine).from_row(
            run.run_id, snapshot, run.engine.lead_steps, run.engine.max_gap
        )
        engine.replay(
            self.store.records(
                run.run_id, after=snapshot["step"], until=step, after_seq=snapshot["seq"]
            )
        )
        engine.version, engine.held = run.engine.version, run.engine.held
        engine.last_change, engine.recent = run.engine.last_change, run.engine.recent
        engine.recent_since = run.engine.recent_since
        engine.forget_after(step)
        run.engine = engine
        run.ledger.forget_driver()  # whoever drives next numbers its records afresh
        # The state holds every record of this step stored so far; the
        # snapshot the next tick takes at it must say so, or a second resume
        # at this step would replay them again on top of it (the next
        # driver's seq numbers, from 1, cannot say it). Reset by that driver.
        run.ledger.seq = MAX_COUNT
        log.info(
            "run %s %s: state rebuilt from step %d and %d recorded steps",
            run.run_id,
            why,
            snapshot["step"],
            step - snapshot["step"],
        )

    def _metrics(
        self, identity: bytes, header: MetricsHeader, body: bytes, now: float, raw: bytes
    ) -> Outgoing:
        """decode -> ledger -> engine -> change: fold the driver's new records
        into the run's policy, send what it decides, and hand the store what
        it lacks; another rank's records are telemetry."""
        known = self.registry.session(identity)
        if known is None:
            return self._unknown(identity, header, body, now)
        run, session = known
        session.last_seen = now
        if header.stats is not None:
            session.stats = header.stats
        try:
            records = list(decode_records(header, body))
        except ProtocolError as exc:
            self.rejected["malformed"] += 1
            return [(identity, error("malformed", str(exc)))]
        wild = next((step for step, _, _ in records if not 0 <= step <= MAX_COUNT), None)
        if wild is not None:
            self.rejected["malformed"] += 1
            return [(identity, error("malformed", f"metrics: step {wild} is out of range"))]
        if run.multi_rank:
            watched = run.engine.waits_for()
            if watched or run.reduction is not None:
                return self._metrics_reduced(identity, run, session, header, records, now, watched)
        out: Outgoing = []
        engine, ledger = run.engine, run.ledger
        drives = run.driver is session
        if drives and run.multi_rank:
            # Every rank must apply a decision at the same step, and the
            # others hear it after the driver: as far ahead as an operator's.
            engine.lead_steps = run.command_lead(self.config.command_lead_steps)
        # Every record may be max_gap ahead of the last: the gap budget is per
        # batch, or a batch of records each just under it adds up to a stall.
        engine.gap_budget = engine.max_gap
        batch = self.ledger.open_batch(
            ledger, run.run_id, identity, session.rank, header, records, raw, body, drives
        )
        # A NaN or infinite metric is a training event (divergence), not a
        # bad message: it is kept, shown and given to the policy.
        self.records_ingested += len(records)
        last_metrics, max_names = run.last_metrics, self.config.max_metric_names
        for i, (step, kind, metrics) in self.ledger.to_fold(ledger, batch):
            try:
                if kind == REPORT:
                    change = engine.on_report(step, metrics)
                else:
                    change = engine.on_step(step, metrics)
            except StepGapTooLarge as exc:
                # Not folded in, not stored: the client sends these records
                # again after its hello, which carries its state past the gap.
                self.ledger.refused(ledger, batch, i)
                self.records_ingested -= len(records) - i
                self.rejected["step_gap"] += 1
                message = f"run {run.run_id}: {exc}; say hello again"
                out.append((identity, error("step_gap", message)))
                break
            if len(last_metrics) + len(metrics) <= max_names:  # the common case, inline
                last_metrics.update(metrics)
            else:
                self._keep_metrics(identity, run, metrics, out)
            if change is not None:
                self._decided(self.send_command(run, change), out)
        if batch.stepped:  # once a batch: the rate is measured between batches
            session.saw_step(batch.stepped, now)
        self.ledger.close_batch(ledger, batch, header.stats or {})
        if session.sync:
            out.append((identity, [encode(Processed(run=run.run_id, seq=batch.seq))]))
        return out

    def _metrics_reduced(
        self,
        identity: bytes,
        run: Run,
        session: Session,
        header: MetricsHeader,
        records: list,
        now: float,
        watched: dict[str, str],
    ) -> Outgoing:
        """A batch of a run whose decisions wait for every rank: the driver's
        records queue until the others have sent theirs (reduction.py), the
        others' records are what they wait for."""
        reduction = run.reduction
        if reduction is None:
            reduction = run.reduction = RankReduction(
                self.config.rank_wait_timeout, run.engine.step
            )
        first = header.first_seq
        self.records_ingested += len(records)
        out: Outgoing = []
        if run.driver is session:
            ledger = run.ledger
            numbered = list(enumerate(records, start=first))
            if ledger.driver != identity.hex() or reduction.driver_identity != identity:
                if reduction.waiting and reduction.driver_rank != session.rank:
                    # The driver left with records waiting: they are decided
                    # on first, with this rank's values among the others'.
                    for seq, (step, kind, metrics) in numbered:
                        reduction.add(session.rank, seq, step, kind, metrics, watched)
                    out += self._release(run, now, watched, final=True)
                    numbered = reduction.skip_to_released(records, first)
                ledger.drive(identity)
                reduction.new_driver(session.rank, identity)
            skip = ledger.seq  # folded in already (before a restart)
            for seq, (step, kind, metrics) in numbered:
                if seq > skip:
                    reduction.wait(seq, step, kind, metrics, now)
        else:
            for i, (step, kind, metrics) in enumerate(records):
                reduction.add(session.rank, first + i, step, kind, metrics, watched)
        stepped = next((r[0] for r in reversed(records) if r[1] != REPORT), 0)
        if stepped:
            session.saw_step(stepped, now)
        out += self._release(run, now, watched)
        if session.sync:
            last = first + len(records) - 1
            out.append((identity, [encode(Processed(run=run.run_id, seq=last))]))
        return out

    def _release(
        self, run: Run, now: float, watched: dict[str, str], final: bool = False
    ) -> Outgoing:
        """Fold in the driver's records that have waited enough (every live
        rank sent its value, or the wait timed out), with the reduced values,
        and store them so; tell each rank what of its records is done with."""
        reduction = run.reduction
        if reduction is None:
            return []
        engine, ledger = run.engine, run.ledger
        driver, driver_rank = reduction.driver_identity, reduction.driver_rank
        engine.gap_budget = engine.max_gap
        out: Outgoing = []
        folded: list[tuple[int, int, str, dict[str, float]]] = []
        timeouts_before = reduction.timeouts
        top = lead = -1  # worked out at the first record that goes
        for record in reduction.release(now, run.sessions, watched, final):
            if top < 0:
                # The lead counts from the record decided on: the ranks may be past it.
                top = run.step
                lead = run.command_lead_at(top, self.config.command_lead_steps)
            engine.lead_steps = lead + max(0, top - record.step)
            ledger.seq = record.seq  # folded before the engine takes it (see Ledger.to_fold)
            try:
                if record.kind == REPORT:
                    change = engine.on_report(record.step, record.metrics)
                else:
                    change = engine.on_step(record.step, record.metrics)
            except StepGapTooLarge as exc:
                ledger.seq = record.seq - 1
                reduction.new_driver(driver_rank, driver)  # sent again after its hello
                self.rejected["step_gap"] += 1
                message = f"run {run.run_id}: {exc}; say hello again"
                out.append((driver, error("step_gap", message)))
                break
            self._keep_metrics(driver, run, record.metrics, out)
            folded.append((record.seq, record.step, record.kind, record.metrics))
            if change is not None:
                self._decided(self.send_command(run, change), out)
        if folded:
            session = run.sessions.get(driver_rank)
            stats = session.stats if session is not None else ClientStats()
            self.ledger.store_folded(ledger, run.run_id, driver, driver_rank, folded, stats)
        for rank, seq in reduction.told():
            session = run.sessions.get(rank)
            if session is not None:
                self.ledger.tell(session.identity, run.run_id, seq)
        run.rank_wait_timeouts += reduction.timeouts - timeouts_before
        for rank in reduction.left_out_now:
            log.warning(
                "run %s: rank %d sent nothing for %gs while a decision waited for it; "
                "decided without it, and it is left out until it sends again",
                run.run_id,
                rank,
                reduction.timeout,
            )
        if reduction.waiting:
            self._waiting_runs.add(run.run_id)
        else:
            self._waiting_runs.discard(run.run_id)
            if not watched:  # the policy no longer waits for ranks
                run.reduction = None
        return out

    def due(self, now: float) -> Outgoing:
        """What became due since the last message: records whose wait for a
        silent rank timed out, or whose rank ended (the server calls it every
        turn of its loop; nothing to do unless a run waits)."""
        out: Outgoing = []
        for run_id in list(self._waiting_runs):
            run = self.registry.runs.get(run_id)
            if run is None or run.reduction is None:
                self._waiting_runs.discard(run_id)
                continue
            out += self._release(run, now, run.engine.waits_for())
        return out

    def _keep_metrics(
        self, identity: bytes, run: Run, metrics: dict[str, float], out: Outgoing
    ) -> None:
        """The last value of each metric, for /metrics, show and top, when
        the record's names may pass --max-metric-names (a client that invents
        names must not grow every scrape without bound): the names it has
        room for are kept, the rest counted."""
        last = run.last_metrics
        dropped = 0
        for name, value in metrics.items():
            if name in last or len(last) < self.config.max_metric_names:
                last[name] = value
            else:
                dropped += 1
        if dropped:
            self.rejected["too_many_metrics"] += dropped
            if run.run_id not in self._told_metrics:
                self._told_metrics.add(run.run_id)
                out.append(
                    (
                        identity,
                        error(
                            "too_many_metrics",
                            f"run {run.run_id} reports more than {self.config.max_metric_names} "
                            "metric names (--max-metric-names); the values of the others are "
                            "not kept",
                        ),
                    )
                )

    def _unknown(self, identity: bytes, header: MetricsHeader, body: bytes, now: float) -> Outgoing:
        """A batch from a session this daemon does not know (it restarted, or
        ended the session for silence). The client keeps what it sent until
        it is persisted, and sends it again after its hello: drop this one."""
        try:
            record_layouts(header, body)
        except ProtocolError as exc:
            self.rejected["malformed"] += 1
            return [(identity, error("malformed", str(exc)))]
        self.rejected["unknown_session"] += 1
        if now - self._asked.get(identity, -ASK_AGAIN_AFTER) < ASK_AGAIN_AFTER:
            return []
        self._asked[identity] = now
        return [(identity, error("unknown_session", "say hello first"))]

    def _decided(self, command: Outgoing, out: Outgoing) -> None:
        """A journaled decision goes out now where the server lets it (the
        ranks apply it a step sooner at a high step rate), else with ``out``."""
        if self.send_now is not None:
            self.send_now(command)
        else:
            out += command

    def send_command(self, run: Run, change: Change) -> Outgoing:
        """Journal the command with the run's state (on disk), then address it
        to every rank. The state goes with it so that a daemon killed right
        after does not make the decision again from records sent again."""
        command = change.command
        row = run.row(time.time(), committed_only=True)
        try:
            self.store.journal(run.run_id, command, change.old_lrs, row)
        except StoreWriteError as exc:
            # The store cannot write (a full disk): the training is steered
            # from memory all the same, and the entry waits in the writer's
            # backlog (never trimmed) until the store takes writes again.
            self.journal_deferred += 1
            self.store.submit(
                [("journal", (run.run_id, command, list(change.old_lrs))), ("run", row)]
            )
            log.error("run %s v%d: journaled later: %s", run.run_id, command.version, exc)
        self.ledger.changed(run.run_id)
        log.info(
            "run %s v%d from step %d: lrs %s (%s, %s)",
            run.run_id,
            command.version,
            command.effective_step,
            command.lrs,
            command.reason,
            command.actor,
        )
        for listener in self.change_listeners:
            try:
                listener(run, change)
            except Exception:  # an observer must not stop the command
                log.exception("a change listener failed on run %s v%d", run.run_id, command.version)
        frames = [encode(command)]
        self.commands_sent += len(run.sessions)
        return [(s.identity, frames) for s in run.sessions.values()]

    # --- periodic work ----------------------------------------------------

    def tick(self, now: float) -> None:
        """Hand the store what changed since the last tick (one transaction)."""
        ops, notice = self.ledger.tick(self._row_of, time.time())
        if ops or notice:
            self.store.submit(ops, notice=notice)

    def _row_of(self, run_id: str, wall: float) -> dict[str, Any] | None:
        run = self.registry.runs.get(run_id)
        return run.row(wall) if run is not None else None

    def flush(self) -> bool:
        """Tick and wait until the store has committed it; False when it
        could not (the store is failing: what waits is kept and retried)."""
        self.tick(time.monotonic())
        done = self.store.wait()
        self._note_committed()
        return done

    def persisted(self) -> Outgoing:
        """`persisted` messages for every batch the store has committed."""
        self._note_committed()
        return self.ledger.persisted()

    def _note_committed(self) -> None:
        while not self.store.committed.empty():
            self.ledger.committed(self.store.committed.get(), self._ledger_of)

    def _ledger_of(self, run_id: str) -> RunLedger | None:
        run = self.registry.runs.get(run_id)
        return run.ledger if run is not None else None

    def sweep(self, now: float) -> None:
        """Once a second: sample each run's loss; end sessions silent for
        longer than the timeout."""
        for run in self.registry.runs.values():
            run.sample_loss()
        timeout = self.config.silence_timeout
        for identity in self.registry.silent(now, timeout):
            ended = self.registry.end_session(identity, now)
            if ended is not None:
                self.ledger.changed(ended.run_id)
                log.info("run %s: a session was silent for %.0fs; ended it", ended.run_id, timeout)
        for identity in [i for i, t in self._asked.items() if now - t > timeout]:
            del self._asked[identity]
        self._forget_ended()

    def sessions_of(self, run_id: str) -> list[Session]:
        run = self.registry.runs.get(run_id)
        return list(run.sessions.values()) if run else []

    def close(self) -> None:
        self.flush()
        self.store.close()
