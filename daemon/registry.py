"""The run registry: which runs exist, which sessions (one per connected
rank) belong to each, and what each session last said."""

from __future__ import annotations

from dataclasses import dataclass, field

from lrpilot.protocol import ClientStats, Hello

from .engine import PolicyEngine


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
    stats: ClientStats = field(default_factory=ClientStats)
    applied_version: int = 0
    applied_step: int = 0
    late_acks: int = 0


@dataclass
class Run:
    run_id: str
    group_names: list[str]
    world_size: int
    engine: PolicyEngine
    started: float
    sessions: dict[int, Session] = field(default_factory=dict)  # by rank
    ended: float | None = None

    @property
    def driver(self) -> Session | None:
        """The session whose metrics drive the policy: the lowest rank
        connected (rank 0 under torchrun), so every rank gets one decision."""
        return self.sessions[min(self.sessions)] if self.sessions else None


class RunRegistry:
    def __init__(self, lead_steps: int = 0) -> None:
        self.runs: dict[str, Run] = {}
        self.sessions: dict[bytes, Session] = {}
        self.lead_steps = lead_steps

    def hello(self, identity: bytes, hello: Hello, now: float) -> Run:
        """Open (or take back) the session; create the run or join it."""
        run = self.runs.get(hello.run)
        base_lrs = [g.lr for g in hello.groups]
        if run is None or self._client_state_wins(run, hello):
            engine = PolicyEngine.from_client(
                hello.run,
                hello.policy,
                hello.policy_state,
                base_lrs,
                hello.step,
                hello.applied_version,
                self.lead_steps,
            )
            if run is None:
                run = Run(hello.run, [g.name for g in hello.groups], hello.world_size, engine, now)
                self.runs[hello.run] = run
            run.engine = engine
        run.ended = None
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
        )
        run.sessions[hello.rank] = session
        self.sessions[identity] = session
        return run

    @staticmethod
    def _client_state_wins(run: Run, hello: Hello) -> bool:
        """A client behind the daemon's run restarted from a checkpoint: the
        training will redo those steps, so its state is the truth. So is a
        client whose optimizer no longer matches the run's groups."""
        return hello.step < run.engine.step or len(hello.groups) != len(run.group_names)

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
            run.ended = now
        return run

    def silent(self, now: float, timeout: float) -> list[bytes]:
        return [i for i, s in self.sessions.items() if now - s.last_seen > timeout]
