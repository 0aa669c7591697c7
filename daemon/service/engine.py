"""The policy engine: one run's policy in the daemon.

It feeds the policy the run's record stream (steps and reports, in order) and
turns each metric-driven decision, and each operator action, into a versioned
:class:`LRCommand`. The training process runs the same policy without
metrics, so step-driven changes need no command; a command carries the
policy's whole state, which the client loads and fast-forwards to the step it
is at.

An operator can hold the LRs (``set-lr``, ``pause``): the policy goes on
taking the run's records (its clock and counters keep running) but its LRs are
not applied, and its decisions are not sent, until ``release`` gives the
policy back, at the LRs it has reached by then.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lrpilot.policies import NO_METRICS, Policy, PolicySpec, ScheduleExhausted, parse_policy
from lrpilot.protocol import MAX_COUNT, REPORT, LRCommand


@dataclass(frozen=True)
class Change:
    """One LR change, as every reader takes it (the journal, the exporter,
    the Grafana annotation): the command that carries it, the LRs in effect
    before it, its bounded cause (the policy's kind, set_lr, pause, resume,
    policy_switch, fresh_start, resync) and who made it."""

    command: LRCommand
    old_lrs: list[float]
    cause: str

    @property
    def actor(self) -> str:
        return self.command.actor


class StepGapTooLarge(ValueError):
    """A record further ahead of the engine's step than the engine steps
    through on the daemon's one loop; the driver's own state is taken instead."""


UNBOUNDED_GAP = 2**62  # a replay steps through any gap its stream has
RECENT_COMMANDS = 16  # kept whole per run, for ranks resuming from a checkpoint


class PolicyEngine:
    def __init__(
        self,
        run: str,
        spec: PolicySpec | None,
        base_lrs: Sequence[float],
        lead_steps: int = 0,
        max_gap: int = UNBOUNDED_GAP,
    ) -> None:
        self.run = run
        self.spec = spec
        self.base_lrs = list(base_lrs)  # what the policy was built from
        self.policy: Policy | None = spec.build(self.base_lrs) if spec else None
        self._fallback_lrs = list(base_lrs)  # the LRs when there is no policy
        self.step = 0  # the last record step the policy has taken
        self.version = 0
        self.held: list[float] | None = None
        self.lead_steps = lead_steps
        self.max_gap = max_gap  # --max-step-gap in the daemon; unbounded in a replay
        # Steps the engine may still step through without records: the data
        # plane sets it to max_gap for each batch (unbounded in a replay).
        self.gap_budget = UNBOUNDED_GAP
        # An operator's switch takes effect at a step ahead of the one it was
        # asked at: the new policy starts at its step 0 there, so the records
        # before it belong to the old one's tenure and do not step it.
        self.starts_at = 0
        self.exhausted = False
        self.last_change: LRCommand | None = None
        # The last commands made (whole, with their policy state), newest
        # last: a rank resuming from a checkpoint gets the one it lacks.
        self.recent: deque[LRCommand] = deque(maxlen=RECENT_COMMANDS)
        # Every command after this version is in `recent` (or was of a
        # timeline a rewind left); of those before, the engine may not know.
        self.recent_since = 0
        self._waits_for: tuple[PolicySpec | None, dict[str, str]] = (None, {})
        # LR changes since the daemon started, by cause: a bounded label for
        # the exporter (the policy's kind, set_lr, pause, resume, policy_switch);
        # the free-text reason is in the journal.
        self.changes: Counter[str] = Counter()
        self._before: list[float] = self.lrs  # before the last record's step

    @property
    def lrs(self) -> list[float]:
        """The LRs in effect: an operator's held ones, else the policy's."""
        if self.held is not None:
            return list(self.held)
        return list(self.policy.lrs) if self.policy else list(self._fallback_lrs)

    def load(self, state: Mapping[str, Any] | None) -> None:
        if self.policy is not None and state is not None:
            self.policy.load_state_dict(state)

    # --- the record stream ------------------------------------------------

    def on_step(self, step: int, metrics: Mapping[str, float]) -> Change | None:
        """Record ``step`` (1-based optimizer step count). Records at or before
        the engine's step are old news (a replay after a reconnect); missing
        steps (dropped by a client whose queue overflowed) are taken without
        metrics so the schedule stays aligned with the client's."""
        if step <= self.step:
            return None
        policy = self.policy
        if policy is None or self.exhausted or step < self.starts_at:
            self.step = step
            return None
        position = max(self.step, self.starts_at - 1)  # where the policy's clock is
        gap = step - position - 1
        if gap > self.max_gap:
            raise StepGapTooLarge(
                f"step {step} is {gap} steps past the last ({position}); "
                f"the limit is {self.max_gap}"
            )
        if gap > self.gap_budget:
            raise StepGapTooLarge(
                f"step {step} is {gap} steps past the last ({position}), more than the "
                f"{self.gap_budget} this batch has left of its limit of {self.max_gap}"
            )
        self.gap_budget -= gap
        self._before = policy.lrs  # policies replace, never mutate, their lrs
        try:
            for _ in range(step - position - 1):
                policy.step(NO_METRICS)
            policy.step(metrics)
        except ScheduleExhausted:
            self.exhausted = True
        self.step = step
        return self._decision()

    def on_report(self, step: int, metrics: Mapping[str, float]) -> Change | None:
        """A report belongs after record ``step``; one from before the engine's
        step is old news (replayed after a restart) and must not act again."""
        if self.policy is None or step < self.step or step < self.starts_at:
            return None
        self._before = self.policy.lrs
        self.policy.observe(metrics)
        return self._decision()

    def replay(self, records: Iterable[tuple[int, str, Mapping[str, float]]]) -> None:
        for step, kind, metrics in records:
            if kind == REPORT:
                self.on_report(step, metrics)
            else:
                self.on_step(step, metrics)

    def _decision(self) -> Change | None:
        decision = self.policy.decided if self.policy else None
        if decision is None or self.held is not None:
            return None
        return self.command(
            decision.reason, actor="policy", cause=decision.cause, old_lrs=list(self._before)
        )

    # --- operator actions -------------------------------------------------

    def hold(
        self, lrs: Sequence[float], reason: str, actor: str, lead: int, cause: str = "set_lr"
    ) -> Change:
        before = self.lrs
        self.held = [float(lr) for lr in lrs]
        return self.command(reason, actor, lead=lead, cause=cause, old_lrs=before)

    def release(self, actor: str, lead: int) -> Change:
        before = self.lrs
        self.held = None
        return self.command(
            "resume: the policy has the LRs again", actor, lead=lead, cause="resume", old_lrs=before
        )

    def switch(self, spec: PolicySpec | None, reason: str, actor: str, lead: int) -> Change:
        """Replace the policy; the new one is built from the LRs in effect now
        and starts at its step 0 at the step the command takes effect (every
        rank, and this engine, step it from there). The operator's hold, if
        any, ends."""
        base = self.lrs
        policy = spec.build(base) if spec else None  # may raise SpecError: nothing changed yet
        self.spec, self.policy, self.base_lrs = spec, policy, base
        self._fallback_lrs = base
        self.held, self.exhausted = None, False
        self.starts_at = self.effective_step(lead)
        return self.command(
            reason, actor, lead=lead, policy_changed=True, cause="policy_switch", old_lrs=base
        )

    # --- commands ---------------------------------------------------------

    def command(
        self,
        reason: str,
        actor: str,
        lead: int | None = None,
        policy_changed: bool = False,
        cause: str = "policy",
        old_lrs: Sequence[float] | None = None,
    ) -> Change:
        """Snapshot the run into the next versioned command; the change it is.
        ``old_lrs``: the LRs before it (default: those in effect now)."""
        before = list(old_lrs) if old_lrs is not None else self.lrs
        self.version += 1
        self.changes[cause] += 1
        effective = self.effective_step(self.lead_steps if lead is None else lead)
        command = self._snapshot(self.version, effective, reason, actor, policy_changed)
        self.last_change = command
        if len(self.recent) == self.recent.maxlen:
            self.recent_since = self.recent[0].version
        self.recent.append(command)
        return Change(command, before, cause)

    def effective_step(self, lead: int) -> int:
        """The first step a command made now can take effect at."""
        effective = max(self.step + 1 + lead, self.starts_at)
        last = self.last_change
        if last is not None and last.state_step <= self.state_step:
            # Clients apply commands in version order: never schedule a newer
            # one before an older one (unless the run went back to a
            # checkpoint before it, when the old one is history).
            effective = max(effective, last.effective_step)
        # A run at the last step the wire counts (a hello may say 2**53), or a
        # lead from a wild step rate, must not make a command that cannot be sent.
        return min(effective, MAX_COUNT)

    @property
    def state_step(self) -> int:
        """The record the policy's state is as of: a switched-in policy that
        has not started yet is as of the step before it starts."""
        return max(self.step, self.starts_at - 1)

    def as_of(self, step: int, applied_version: int) -> LRCommand | None:
        """The command a client at ``step`` that has applied commands up to
        ``applied_version`` lacks: the newest made on a state at or before its
        step (one after it belongs to a timeline a client resuming from a
        checkpoint is not on), when newer than what it applied; None if none.
        Only when ``knows(applied_version)``."""
        for command in reversed(self.recent):
            if command.version <= applied_version:
                return None
            if command.state_step <= step:
                return command
        return None

    def waits_for(self) -> dict[str, str]:
        """The metrics the policy decides on that a run of several ranks
        reduces over them (metric -> mean, min or max); empty when its
        decisions wait for no rank. Worked out once per policy: the data
        plane asks at every batch."""
        spec, found = self._waits_for
        if spec is not self.spec:
            reduced = self.spec.reduced_metrics() if self.spec is not None else {}
            found = {name: how for name, how in reduced.items() if how != "rank0"}
            self._waits_for = (self.spec, found)
        return found

    def knows(self, applied_version: int) -> bool:
        """Whether every command after ``applied_version`` is in ``recent``."""
        return applied_version >= self.recent_since

    def forget_after(self, step: int) -> None:
        """The run went back to ``step``: commands made on later states are of
        a timeline that no longer is (they stay in the journal, as history)."""
        kept = [command for command in self.recent if command.state_step <= step]
        self.recent = deque(kept, maxlen=RECENT_COMMANDS)

    def current(self, lead: int = 0) -> LRCommand:
        """The run's whole state as a command at the current version: for a
        client that comes back having missed commands. ``lead``: as for a
        command (an async client has set its next step's LRs already)."""
        return self._snapshot(
            self.version,
            min(max(self.step + 1 + lead, self.starts_at), MAX_COUNT),
            "the daemon's state of the run",
            "daemon",
            True,
        )

    def _snapshot(
        self, version: int, effective: int, reason: str, actor: str, with_policy: bool
    ) -> LRCommand:
        return LRCommand(
            run=self.run,
            version=version,
            effective_step=effective,
            state_step=self.state_step,
            lrs=self.lrs,
            policy=self.spec.model_dump() if (with_policy and self.spec) else None,
            policy_set=with_policy,
            base_lrs=list(self.base_lrs) if with_policy else None,
            policy_state=self.policy.state_dict() if self.policy else None,
            hold=self.held is not None,
            reason=reason,
            actor=actor,
        )

    # --- the store ----------------------------------------------------------

    def state_row(self) -> dict[str, Any]:
        return {
            "policy": self.spec.model_dump() if self.spec else None,
            "policy_base_lrs": list(self.base_lrs),
            "policy_state": self.policy.state_dict() if self.policy else None,
            "step": self.step,
            "version": self.version,
            "lrs": self.lrs,
            "held": self.held,
        }

    @classmethod
    def from_row(
        cls, run: str, row: Mapping[str, Any], lead_steps: int = 0, max_gap: int = UNBOUNDED_GAP
    ) -> PolicyEngine:
        spec = parse_policy(row["policy"]) if row.get("policy") else None
        engine = cls(run, spec, row["policy_base_lrs"], lead_steps, max_gap)
        engine.load(row.get("policy_state"))
        engine.step, engine.version = int(row["step"]), int(row["version"])
        engine.recent_since = engine.version
        engine.held = row.get("held")
        return engine

    @classmethod
    def from_client(
        cls,
        run: str,
        policy: Mapping[str, Any] | None,
        state: Mapping[str, Any] | None,
        base_lrs: Sequence[float],
        step: int,
        version: int,
        lead_steps: int = 0,
        max_gap: int = UNBOUNDED_GAP,
    ) -> PolicyEngine:
        """An engine that takes over where a client says it is (no daemon state)."""
        spec = parse_policy(dict(policy)) if policy else None
        engine = cls(run, spec, base_lrs, lead_steps, max_gap)
        engine.load(state)
        engine.step, engine.version = step, version
        engine.recent_since = version
        return engine
