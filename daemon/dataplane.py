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

from lrpilot.protocol import (
    REPORT,
    Ack,
    Bye,
    Error,
    Hello,
    LRCommand,
    MessageTooLarge,
    MetricsHeader,
    Persisted,
    Processed,
    ProtocolError,
    Welcome,
    decode,
    decode_records,
    encode,
    first_non_finite,
    record_layouts,
)

from .config import DaemonConfig
from .registry import Run, RunRegistry, Session
from .store import Store

log = logging.getLogger("lrpilot.daemon")

Outgoing = list[tuple[bytes, list[bytes]]]
# Called with (run, command, old LRs) after a change is journaled, on the
# daemon loop: a listener must return at once (queue the work, never do I/O).
ChangeListener = Callable[[Run, LRCommand, list[float]], None]
ASK_AGAIN_AFTER = 1.0  # seconds between unknown_session answers to one sender


def error(code: str, message: str) -> list[bytes]:
    return [encode(Error(code=code, message=message))]


class DataPlane:
    def __init__(self, config: DaemonConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or Store(config.state_dir, config.durability)
        self.registry = RunRegistry(lead_steps=config.command_lead_steps)
        self.records_ingested = 0
        self.rejected: Counter[str] = Counter()  # messages and records refused, by reason
        self.commands_sent = 0
        self.change_listeners: list[ChangeListener] = []
        self._asked: dict[bytes, float] = {}  # unknown senders, when last asked for a hello
        self._rows: list[tuple] = []  # records for the next tick's batch
        self._dirty: set[str] = set()  # runs whose state changed since the last tick
        self._to_ack: dict[bytes, tuple[str, int]] = {}  # sender -> (run, last seq)
        self._acks: Outgoing = []  # persisted messages not yet sent
        for row in self.store.load_runs():
            run = Run.from_row(row, config.command_lead_steps)
            run.engine.last_change = self.store.last_command(run.run_id)
            self.registry.add(run)

    # --- messages ---------------------------------------------------------

    def handle(self, identity: bytes, frames: Sequence[bytes], now: float) -> Outgoing:
        try:
            message = decode(frames, self.config.max_message_bytes)
        except MessageTooLarge as exc:
            self.rejected["oversized"] += 1
            return [(identity, error("oversized", str(exc)))]
        except ProtocolError as exc:
            self.rejected["malformed"] += 1
            return [(identity, error("malformed", str(exc)))]
        if isinstance(message, MetricsHeader):
            return self._metrics(identity, message, frames[1], now, frames[0])
        if isinstance(message, Hello):
            return self._hello(identity, message, now)
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
            self._dirty.add(run.run_id)
            log.info("run %s rank %d said bye at step %d", run.run_id, session.rank, message.step)
            return []
        self.rejected["unexpected"] += 1
        return [(identity, error("unexpected", f"a client does not send {message.t!r}"))]

    def _hello(self, identity: bytes, hello: Hello, now: float) -> Outgoing:
        self._asked.pop(identity, None)
        run = self.registry.runs.get(hello.run)
        try:
            if run is None:
                run = self.registry.new_run(hello)
                self.store.save_run(run.row(time.time()))
            elif len(hello.groups) != len(run.group_names):
                log.warning(
                    "run %s came back with %d param groups, not %d: taking its state",
                    hello.run,
                    len(hello.groups),
                    len(run.group_names),
                )
                self.registry.regroup(run, hello)
            elif hello.step < run.engine.step and hello.rank <= min(run.sessions, default=0):
                # Only the rank that drives (the lowest; rank 0 of a run that
                # comes back) sets the run's step: another rank joining behind
                # it does not take the policy back.
                self._rewind(run, hello)
        except ValueError as exc:  # a policy spec or state the daemon cannot use
            self.rejected["bad_hello"] += 1
            return [(identity, error("bad_hello", str(exc)))]
        session = self.registry.join(identity, run, hello, now)
        if run.driver is session:
            # An async client has already set the LRs of its next step when a
            # decision reaches it; scheduling one step later lets it apply the
            # decision on time (and say so) instead of always one step late.
            run.engine.lead_steps = self.config.command_lead_steps + (0 if hello.sync else 1)
        self._dirty.add(run.run_id)
        log.info(
            "run %s rank %d/%d hello from %s pid %d at step %d",
            hello.run,
            hello.rank,
            hello.world_size,
            hello.host,
            hello.pid,
            hello.step,
        )
        engine = run.engine
        behind = engine.version > hello.applied_version or engine.held is not None
        welcome = Welcome(
            run=run.run_id, version=engine.version, command=engine.current() if behind else None
        )
        return [(identity, [encode(welcome)])]

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
        self.flush()  # the snapshot and records up to now must be readable
        snapshot = self.store.snapshot_at(run.run_id, step)
        current = run.engine.spec.model_dump() if run.engine.spec else None
        # Either way, what was recorded after the step is a timeline that no
        # longer is: a later resume or replay must not read it.
        self.store.submit([("truncate", (run.run_id, step))])
        if snapshot is None or snapshot["policy"] != current:
            log.info("run %s %s: the current policy and state go on from there", run.run_id, why)
            run.engine.step = step
            return
        engine = type(run.engine).from_row(run.run_id, snapshot, run.engine.lead_steps)
        engine.replay(
            self.store.records(
                run.run_id, after=snapshot["step"], until=step, after_seq=snapshot["seq"]
            )
        )
        engine.version, engine.held = run.engine.version, run.engine.held
        engine.last_change = run.engine.last_change
        run.engine = engine
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
        known = self.registry.session(identity)
        if known is None:
            return self._unknown(identity, header, body, now)
        run, session = known
        session.last_seen = now
        if header.stats is not None:
            session.stats = header.stats
        out: Outgoing = []
        engine = run.engine
        drives = run.driver is session
        if drives and run.multi_rank:
            # Every rank must apply a decision at the same step, and the
            # others hear it after the driver: as far ahead as an operator's.
            engine.lead_steps = run.command_lead(self.config.command_lead_steps)
        me = identity.hex()
        if drives and engine.driver != me:
            # A new client drives, with its own seq numbers.
            engine.driver, engine.seq = me, 0
            run.stored_seq = run.committed_seq = 0
        bad: list[str] = []
        seq = header.first_seq - 1
        fresh = first_step = step = stepped = 0
        try:
            for step, kind, metrics in decode_records(header, body):
                seq += 1
                name = first_non_finite(metrics)
                if name is not None:
                    self.rejected["non_finite"] += 1
                    bad.append(f"step {step}: {name}={metrics[name]}")
                    continue
                self.records_ingested += 1
                if kind != REPORT:
                    stepped = step
                if not drives:
                    continue  # telemetry only
                if seq > run.stored_seq and not fresh:
                    fresh, first_step = seq, step  # the store lacks it from here on
                if seq <= engine.seq:
                    continue  # folded in before a restart
                engine.seq = seq
                run.last_metrics.update(metrics)
                if kind == REPORT:
                    command = engine.on_report(step, metrics)
                else:
                    command = engine.on_step(step, metrics)
                if command is not None:
                    out += self.send_command(run, command)
        except ProtocolError as exc:
            self.rejected["malformed"] += 1
            out.append((identity, error("malformed", str(exc))))
        if stepped:  # once a batch: the rate is measured between batches
            session.saw_step(stepped, now)
        if fresh:
            run.stored_seq = seq
            self._dirty.add(run.run_id)
            self._rows.append(
                (
                    run.run_id,
                    first_step,
                    step,
                    raw,  # the header frame as it came
                    body,
                    fresh - header.first_seq,
                )
            )
        self._to_ack[identity] = (run.run_id, seq)
        if bad:
            message = f"{len(bad)} record(s) with a non-finite metric were dropped, first {bad[0]}"
            out.append((identity, error("non_finite", message)))
        if session.sync:
            out.append((identity, [encode(Processed(run=run.run_id, seq=seq))]))
        return out

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

    def send_command(self, run: Run, command: LRCommand) -> Outgoing:
        """Journal the command with the run's state (on disk), then address it
        to every rank. The state goes with it so that a daemon killed right
        after does not make the decision again from records sent again."""
        row = run.row(time.time(), stored_seq=run.committed_seq)
        self.store.journal(run.run_id, command, run.engine.old_lrs, row)
        self._dirty.add(run.run_id)
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
                listener(run, command, list(run.engine.old_lrs))
            except Exception:  # an observer must not stop the command
                log.exception("a change listener failed on run %s v%d", run.run_id, command.version)
        frames = [encode(command)]
        self.commands_sent += len(run.sessions)
        return [(s.identity, frames) for s in run.sessions.values()]

    # --- periodic work ----------------------------------------------------

    def tick(self, now: float) -> None:
        """Hand the store what changed since the last tick (one transaction)."""
        wall = time.time()
        ops: list = []
        if self._rows:
            ops.append(("batches", self._rows))
            self._rows = []
        for run_id in self._dirty:
            run = self.registry.runs.get(run_id)
            if run is not None:
                ops.append(("run", run.row(wall)))
        self._dirty.clear()
        if ops or self._to_ack:
            self.store.submit(ops, notice=self._to_ack)
            self._to_ack = {}

    def flush(self) -> None:
        """Tick and wait until the store has committed it."""
        self.tick(time.monotonic())
        self.store.wait()
        self._note_committed()

    def persisted(self) -> Outgoing:
        """`persisted` messages for every batch the store has committed."""
        self._note_committed()
        out, self._acks = self._acks, []
        return out

    def _note_committed(self) -> None:
        while not self.store.committed.empty():
            for identity, (run_id, seq) in self.store.committed.get().items():
                self._acks.append((identity, [encode(Persisted(run=run_id, seq=seq))]))
                run = self.registry.runs.get(run_id)
                if run is not None and run.engine.driver == identity.hex():
                    run.committed_seq = max(run.committed_seq, min(seq, run.stored_seq))

    def sweep(self, now: float) -> None:
        """Once a second: sample each run's loss; end sessions silent for
        longer than the timeout."""
        for run in self.registry.runs.values():
            run.sample_loss()
        timeout = self.config.silence_timeout
        for identity in self.registry.silent(now, timeout):
            run = self.registry.end_session(identity, now)
            if run is not None:
                self._dirty.add(run.run_id)
                log.info("run %s: a session was silent for %.0fs; ended it", run.run_id, timeout)
        for identity in [i for i, t in self._asked.items() if now - t > timeout]:
            del self._asked[identity]

    def sessions_of(self, run_id: str) -> list[Session]:
        run = self.registry.runs.get(run_id)
        return list(run.sessions.values()) if run else []

    def close(self) -> None:
        self.flush()
        self.store.close()
