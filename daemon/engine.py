"""The policy engine: one run's policy in the daemon.

It feeds the policy the run's record stream (steps and reports, in order) and
turns each metric-driven decision into a versioned :class:`LRCommand`. The
training process runs the same policy without metrics, so step-driven changes
need no command; a command carries the policy's whole state, which the
client loads and fast-forwards to the step it is at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lrpilot.policies import NO_METRICS, Policy, PolicySpec, ScheduleExhausted, parse_policy
from lrpilot.protocol import LRCommand


class PolicyEngine:
    def __init__(
        self,
        run: str,
        spec: PolicySpec | None,
        base_lrs: Sequence[float],
        lead_steps: int = 0,
    ) -> None:
        self.run = run
        self.spec = spec
        self.base_lrs = list(base_lrs)
        self.policy: Policy | None = spec.build(self.base_lrs) if spec else None
        self.lrs = list(self.policy.lrs) if self.policy else list(self.base_lrs)
        self.step = 0  # the last record step the policy has taken
        self.version = 0
        self.lead_steps = lead_steps
        self.exhausted = False
        self.last_change: LRCommand | None = None

    @classmethod
    def from_client(
        cls,
        run: str,
        policy: dict[str, Any] | None,
        state: dict[str, Any] | None,
        base_lrs: Sequence[float],
        step: int,
        version: int,
        lead_steps: int = 0,
    ) -> PolicyEngine:
        """An engine that takes over where a client says it is (no daemon state)."""
        engine = cls(run, parse_policy(policy) if policy else None, base_lrs, lead_steps)
        if engine.policy is not None and state is not None:
            engine.policy.load_state_dict(state)
            engine.lrs = list(engine.policy.lrs)
        engine.step, engine.version = step, version
        return engine

    def on_step(self, step: int, metrics: Mapping[str, float]) -> LRCommand | None:
        """Record ``step`` (1-based optimizer step count). Records at or before
        the engine's step are old news (a replay after a reconnect); missing
        steps (dropped by a client whose queue overflowed) are taken without
        metrics so the schedule stays aligned with the client's."""
        if step <= self.step:
            return None
        policy = self.policy
        if policy is None or self.exhausted:
            self.step = step
            return None
        try:
            while self.step < step - 1:
                policy.step(NO_METRICS)
                self.step += 1
            policy.step(metrics)
        except ScheduleExhausted:
            self.exhausted = True
        self.step = step
        self.lrs = list(policy.lrs)
        return self._decision()

    def on_report(self, step: int, metrics: Mapping[str, float]) -> LRCommand | None:
        """A report belongs after record ``step``; one from before the engine's
        step is old news (replayed after a restart) and must not act again."""
        if self.policy is None or step < self.step:
            return None
        self.policy.observe(metrics)
        self.lrs = list(self.policy.lrs)
        return self._decision()

    def _decision(self) -> LRCommand | None:
        reason = self.policy.decided if self.policy else None
        if reason is None:
            return None
        return self.command(reason, actor="policy")

    def command(self, reason: str, actor: str, policy_changed: bool = False) -> LRCommand:
        """Snapshot the policy into the next versioned command."""
        self.version += 1
        command = LRCommand(
            run=self.run,
            version=self.version,
            effective_step=self.step + 1 + self.lead_steps,
            state_step=self.step,
            lrs=list(self.lrs),
            policy=self.spec.model_dump() if (policy_changed and self.spec) else None,
            policy_state=self.policy.state_dict() if self.policy else None,
            reason=reason,
            actor=actor,
        )
        self.last_change = command
        return command

    def current(self) -> LRCommand:
        """The run's state as a command, at the current version: for a client
        that comes back having missed a command."""
        return LRCommand(
            run=self.run,
            version=self.version,
            effective_step=self.step + 1,
            state_step=self.step,
            lrs=list(self.lrs),
            policy=self.spec.model_dump() if self.spec else None,
            policy_state=self.policy.state_dict() if self.policy else None,
            reason="the daemon's state of the run",
            actor="daemon",
        )
