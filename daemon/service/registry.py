"""The run registry: which runs exist, which sessions (one per connected
rank) belong to each, and what each session last said."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lrpilot.protocol import SEND_INTERVAL, ClientStats, Hello

from .engine import UNBOUNDED_GAP, PolicyEngine
from .ledger import RunLedger
from .reduction import RankReduction

# Steps-per-second smoothing: each batch moves the estimate this far.
RATE_WEIGHT = 0.2
# How far ahead a command for several ranks is scheduled, in seconds of the
# run's steps: enough for it to reach every rank over loopback or a LAN, and
# for the ranks' steps the daemon has not seen yet (an async client sends
# its step records every SEND_INTERVAL).
COMMAND_LEAD_SECONDS = 0.1 + SEND_INTERVAL


@dataclass
class Session:
    identity: bytes
    run: str
    rank: int
    host: str
    pid: int
    sync: bool
    last_seen: float
    step: int = 0
    steps_per_s: float = 0.0
    stats: ClientStats = field(default_factory=ClientStats)
    applied_version: int = 0
    applied_step: int = 0
    late_by: int = 0  # steps the last command landed after its effective step
    key: Any = None  # the allowed Key it said hello with (a daemon with keys)
    attempt: int = 0  # torchrun's restart count of its process
    _rate_at: tuple[float, int] = (0.0, 0)

    def saw_step(self, step: int, now: float) -> None:
        then, before = self._rate_at
        if then and now > then and step > before:
            rate = (step - before) / (now - then)
            self.steps_per_s += RATE_WEIGHT * (rate - self.steps_per_s)
        if not then or now - then >= 0.05:  # measure over >= 50 ms
            self._rate_at = (now, step)
        self.step = step


@dataclass
class Run:
    run_id: str
    group_names: list[str]
    base_lrs: list[float]
    world_size: int
    engine: PolicyEngine
    created: float
    requested_policy: dict[str, Any] | None = None
    sessions: dict[int, Session] = field(default_factory=dict)  # by rank
    ended: float | None = None  # wall clock, like created
    # Where the driver's records stand: folded in, stored, committed.
    ledger: RunLedger = field(default_factory=RunLedger)
    rev: int = 0  # orders the run's rows (see store.upsert_run)
    # The last value of each metric the driver reported (steps and reports).
    last_metrics: dict[str, float] = field(default_factory=dict)
    # The loss, sampled once a second (the last minute), for `lrpilot top`.
    loss_history: deque = field(default_factory=lambda: deque(maxlen=60))
    # Several ranks and a policy that decides on a reduced metric: the
    # driver's records waiting for the other ranks' (reduction.py).
    reduction: RankReduction | None = None
    rank_wait_timeouts: int = 0  # records decided on without a silent rank

    def sample_loss(self) -> None:
        if self.sessions and self.last_metrics:
            value = self.last_metrics.get("loss", next(iter(self.last_metrics.values())))
            self.loss_history.append(value)

    @property
    def driver(self) -> Session | None:
        """The session whose metrics drive the policy: the lowest rank
        connected (rank 0 under torchrun), so every rank gets one decision."""
        return self.sessions[min(self.sessions)] if self.sessions else None

    @property
    def step(self) -> int:
        return max((s.step for s in self.sessions.values()), default=self.engine.step)

    def lead_steps(self, seconds: float) -> int:
        """Steps the run makes in ``seconds``, at least 1: how far ahead an
        operator's command is scheduled so every rank gets it in time."""
        rate = max((s.steps_per_s for s in self.sessions.values()), default=0.0)
        return max(1, round(rate * seconds))

    @property
    def multi_rank(self) -> bool:
        return self.world_size > 1 or len(self.sessions) > 1

    def command_lead(self, extra: int = 0) -> int:
        """Steps ahead to schedule a command that every rank must apply at the
        same step. The ranks have already set the LRs of their next step, so
        at least one; lock-step ranks hear it before the one after (each waits
        for its record to be processed, and DDP keeps them in step); async
        ranks get ~200 ms of steps to hear it (and to send the steps the
        daemon has not seen yet). ``extra``: --command-lead-steps.

        The lead counts from the driver's step (the engine's), and another
        rank can be a step ahead of it (DDP lets rank 1 run on once rank 0's
        record is answered, before rank 0's next one): a rank that has
        already been answered for its next step would hear the command a step
        late, so the lead covers the distance too."""
        return self.command_lead_at(self.engine.step, extra)

    def command_lead_at(self, step: int, extra: int = 0) -> int:
        """command_lead() for a decision on a record of ``step`` (one that
        waited for the other ranks: they may be past it)."""
        ahead = max(0, self.step - step)
        if self.sessions and all(s.sync for s in self.sessions.values()):
            return ahead + 1 + extra
        return ahead + self.lead_steps(COMMAND_LEAD_SECONDS) + extra

    def row(self, now: float, committed_only: bool = False) -> dict[str, Any]:
        """The run's state for the store. Its ``stored_seq`` says how far the
        run's records are in the store along with this row: those handed to
        the store (a tick's row, which goes with them), or with
        ``committed_only`` those committed (a row written on its own)."""
        self.rev += 1
        ledger = self.ledger.row()
        if committed_only:
            ledger["stored_seq"] = self.ledger.committed_seq
        return {
            "rev": self.rev,
            **ledger,
            "run_id": self.run_id,
            "created": self.created,
            "updated": now,
            "ended": self.ended,
            "group_names": self.group_names,
            "base_lrs": self.base_lrs,
            "world_size": self.world_size,
            "requested_policy": self.requested_policy,
            **self.engine.state_row(),
        }

    @classmethod
    def from_row(
        cls, row: dict[str, Any], lead_steps: int = 0, max_gap: int = UNBOUNDED_GAP
    ) -> Run:
        return cls(
            run_id=row["run_id"],
            group_names=row["group_names"],
            base_lrs=row["base_lrs"],
            world_size=row["world_size"],
            engine=PolicyEngine.from_row(row["run_id"], row, lead_steps, max_gap),
            created=row["created"],
            requested_policy=row["requested_policy"],
            ended=row["ended"] or time.time(),
            ledger=RunLedger.from_row(row),
            rev=row["rev"],
        )


class RunRegistry:
    def __init__(self, lead_steps: int = 0, max_gap: int = UNBOUNDED_GAP) -> None:
        self.runs: dict[str, Run] = {}
        self.sessions: dict[bytes, Session] = {}
        self.lead_steps = lead_steps
        self.max_gap = max_gap  # every engine it makes steps through at most this

    def add(self, run: Run) -> None:
        self.runs[run.run_id] = run

    def new_run(self, hello: Hello) -> Run:
        run = Run(
            run_id=hello.run,
            group_names=[g.name for g in hello.groups],
            base_lrs=[g.lr for g in hello.groups],
            world_size=hello.world_size,
            engine=self.engine_from(hello),
            created=time.time(),
            requested_policy=hello.policy,
        )
        self.runs[hello.run] = run
        return run

    def regroup(self, run: Run, hello: Hello) -> None:
        """The run came back with other param groups: it is the client's run
        now, groups, LRs and policy state as the client says. Its versions go
        on (the journal's are unique per run); an operator's hold, whose LRs
        were for the old groups, ends."""
        old = run.engine
        engine = self.engine_from(hello)
        engine.version = max(old.version, hello.applied_version)
        engine.last_change = old.last_change
        run.group_names = [g.name for g in hello.groups]
        run.base_lrs = [g.lr for g in hello.groups]
        run.engine = engine
        run.ledger.forget_driver()

    def restart(self, run: Run, hello: Hello) -> None:
        """A fresh start of the run: what the script says, as for a new run."""
        engine = self.engine_from(hello)  # may raise: a refused hello changes nothing
        run.group_names = [g.name for g in hello.groups]
        run.base_lrs = [g.lr for g in hello.groups]
        run.world_size = hello.world_size
        run.requested_policy = hello.policy
        run.engine = engine
        run.ledger.forget_driver()
        run.created = time.time()
        run.last_metrics.clear()
        run.loss_history.clear()

    def active_count(self) -> int:
        return sum(1 for run in self.runs.values() if run.sessions)

    def engine_from(self, hello: Hello) -> PolicyEngine:
        """An engine that takes over where the client says it is. ValueError
        (SpecError) when the policy, its base LRs or its state do not hold."""
        base = hello.policy_base_lrs or [g.lr for g in hello.groups]
        if len(base) != len(hello.groups):
            raise ValueError(
                f"policy_base_lrs has {len(base)} LRs for {len(hello.groups)} param groups"
            )
        return PolicyEngine.from_client(
            hello.run,
            hello.policy,
            hello.policy_state,
            base,
            hello.step,
            hello.applied_version,
            self.lead_steps,
            self.max_gap,
        )

    def join(self, identity: bytes, run: Run, hello: Hello, now: float) -> Session:
        # A client that said hello for another run (or rank) before has left
        # that one: its old session must not keep that run active forever.
        self.end_session(identity, now)
        run.ended = None
        run.world_size = hello.world_size  # torchelastic may restart it at another size
        old = run.sessions.get(hello.rank)
        if old is not None and old.identity != identity:
            self.sessions.pop(old.identity, None)
        session = Session(
            identity,
            hello.run,
            hello.rank,
            hello.host,
            hello.pid,
            hello.sync,
            now,
            step=hello.step,
            applied_version=hello.applied_version,
            attempt=hello.attempt,
        )
        run.sessions[hello.rank] = session
        self.sessions[identity] = session
        return session

    def session(self, identity: bytes) -> tuple[Run, Session] | None:
        session = self.sessions.get(identity)
        if session is None:
            return None
        return self.runs[session.run], session

    def end_session(self, identity: bytes, now: float) -> Run | None:
        session = self.sessions.pop(identity, None)
        if session is None:
            return None
        run = self.runs[session.run]
        if run.sessions.get(session.rank) is session:
            del run.sessions[session.rank]
        if not run.sessions:
            run.ended = time.time()
        return run

    def silent(self, now: float, timeout: float) -> list[bytes]:
        return [i for i, s in self.sessions.items() if now - s.last_seen > timeout]
