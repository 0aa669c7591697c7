"""The data plane: what the daemon does with each message from a training
process. Pure logic over (identity, frames) in and (identity, frames) out,
so the server owns the socket and the tests can drive it without one.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Sequence

from lrpilot.protocol import (
    REPORT,
    Ack,
    Bye,
    Error,
    Hello,
    LRCommand,
    MetricsHeader,
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

log = logging.getLogger("lrpilot.daemon")

Outgoing = list[tuple[bytes, list[bytes]]]

# Sessions whose batches the daemon parks while it waits for their hello: more
# than a restarted daemon sees come back at once, few enough that a stranger
# sending from many ids cannot fill memory (each id holds max_pending_batches).
MAX_PARKED_SESSIONS = 256
ASK_AGAIN_AFTER = 1.0  # seconds: re-send unknown_session in case the hello was lost


def error(code: str, message: str) -> list[bytes]:
    return [encode(Error(code=code, message=message))]


class DataPlane:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.registry = RunRegistry(lead_steps=config.command_lead_steps)
        self.records_ingested = 0
        self.rejected: Counter[str] = Counter()  # messages and records refused, by reason
        self.commands_sent = 0
        # Batches from sessions the daemon does not know (it restarted): kept
        # until their hello comes, then replayed, so nothing queued is lost.
        # identity -> (parked batches, when we last asked for a hello)
        self._parked: dict[bytes, tuple[deque, float]] = {}

    def handle(self, identity: bytes, frames: Sequence[bytes], now: float) -> Outgoing:
        size = sum(len(f) for f in frames)
        if size > self.config.max_message_bytes:
            self.rejected["oversized"] += 1
            return [
                (
                    identity,
                    error(
                        "oversized",
                        f"message of {size} bytes exceeds the "
                        f"limit of {self.config.max_message_bytes}",
                    ),
                )
            ]
        try:
            message = decode(frames)
        except ProtocolError as exc:
            self.rejected["malformed"] += 1
            return [(identity, error("malformed", str(exc)))]
        if isinstance(message, MetricsHeader):
            return self._metrics(identity, message, frames[1], now)
        if isinstance(message, Hello):
            return self._hello(identity, message, now)
        known = self.registry.session(identity)
        if known is None:
            if isinstance(message, Bye):
                return []
            self.rejected["unknown_session"] += 1
            return [(identity, error("unknown_session", "say hello first"))]
        run, session = known
        session.last_seen = now
        if isinstance(message, Ack):
            session.applied_version = max(session.applied_version, message.version)
            session.applied_step = message.applied_step
            session.late_acks += message.late
            return []
        if isinstance(message, Bye):
            session.stats = message.stats
            self.registry.end_session(identity, now)
            log.info("run %s rank %d said bye at step %d", run.run_id, session.rank, message.step)
            return []
        self.rejected["unexpected"] += 1
        return [(identity, error("unexpected", f"a client does not send {message.t!r}"))]

    def _hello(self, identity: bytes, hello: Hello, now: float) -> Outgoing:
        try:
            run = self.registry.hello(identity, hello, now)
        except ValueError as exc:  # a policy spec or state the daemon cannot use
            self.rejected["bad_hello"] += 1
            return [(identity, error("bad_hello", str(exc)))]
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
        behind = engine.version > hello.applied_version
        welcome = Welcome(
            run=run.run_id, version=engine.version, command=engine.current() if behind else None
        )
        out: Outgoing = [(identity, [encode(welcome)])]
        parked, _ = self._parked.pop(identity, ((), 0.0))
        for header, body in parked:
            out += self._metrics(identity, header, body, now)
        return out

    def _park(self, identity: bytes, header: MetricsHeader, body: bytes, now: float) -> Outgoing:
        """Keep a batch from a session the daemon does not know until its hello."""
        try:
            record_layouts(header, body)
        except ProtocolError as exc:
            self.rejected["malformed"] += 1
            return [(identity, error("malformed", str(exc)))]
        self.rejected["unknown_session"] += 1
        entry = self._parked.get(identity)
        if entry is None:
            if len(self._parked) >= MAX_PARKED_SESSIONS:
                oldest = min(self._parked, key=lambda i: self._parked[i][1])
                del self._parked[oldest]
            entry = (deque(maxlen=max(1, self.config.max_pending_batches)), -ASK_AGAIN_AFTER)
        batches, asked = entry
        batches.append((header, body))
        if now - asked < ASK_AGAIN_AFTER:
            self._parked[identity] = (batches, asked)
            return []
        self._parked[identity] = (batches, now)
        return [(identity, error("unknown_session", "say hello first"))]

    def _metrics(self, identity: bytes, header: MetricsHeader, body: bytes, now: float) -> Outgoing:
        known = self.registry.session(identity)
        if known is None:
            return self._park(identity, header, body, now)
        run, session = known
        session.last_seen = now
        if header.stats is not None:
            session.stats = header.stats
        out: Outgoing = []
        drives = run.driver is session
        engine = run.engine
        bad: list[str] = []
        try:
            for step, kind, metrics in decode_records(header, body):
                name = first_non_finite(metrics)
                if name is not None:
                    self.rejected["non_finite"] += 1
                    bad.append(f"step {step}: {name}={metrics[name]}")
                    continue
                self.records_ingested += 1
                if kind == REPORT:
                    command = engine.on_report(step, metrics) if drives else None
                else:
                    session.step = step
                    command = engine.on_step(step, metrics) if drives else None
                if command is not None:
                    out += self._broadcast(run, command)
        except ProtocolError as exc:
            self.rejected["malformed"] += 1
            out.append((identity, error("malformed", str(exc))))
        if bad:
            message = f"{len(bad)} record(s) with a non-finite metric were dropped, first {bad[0]}"
            out.append((identity, error("non_finite", message)))
        if session.sync:
            count = sum(c for _, c in header.blocks)
            seq = header.first_seq + count - 1
            out.append((identity, [encode(Processed(run=run.run_id, seq=seq))]))
        return out

    def _broadcast(self, run: Run, command: LRCommand) -> Outgoing:
        log.info(
            "run %s v%d from step %d: lrs %s (%s, %s)",
            run.run_id,
            command.version,
            command.effective_step,
            command.lrs,
            command.reason,
            command.actor,
        )
        frames = [encode(command)]
        self.commands_sent += len(run.sessions)
        return [(s.identity, frames) for s in run.sessions.values()]

    def sweep(self, now: float) -> None:
        """End sessions silent for longer than the timeout; forget batches
        parked for a hello that never came."""
        timeout = self.config.silence_timeout
        for identity in [i for i, (_, asked) in self._parked.items() if now - asked > timeout]:
            del self._parked[identity]
        for identity in self.registry.silent(now, self.config.silence_timeout):
            run = self.registry.end_session(identity, now)
            if run is not None:
                log.info(
                    "run %s: a session was silent for %.0fs; ended it",
                    run.run_id,
                    self.config.silence_timeout,
                )

    def sessions_of(self, run_id: str) -> list[Session]:
        run = self.registry.runs.get(run_id)
        return list(run.sessions.values()) if run else []
