"""``onecycle``: the 1cycle policy (torch's ``OneCycleLR``, Smith 2018): warm up
from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of
``total_steps``, then anneal to ``initial_lr / final_div_factor``; momentum
moves the other way, from ``max_momentum`` to ``base_momentum`` and back.

Phase ends are torch's: ``pct_start * total_steps - 1`` (then
``2 * pct_start * total_steps - 2`` with ``three_phase``) and
``total_steps - 1``. Within a phase the value is ``anneal(start, end, pct)``,
cosine or linear. At step ``total_steps`` the last phase is extended rather
than clamped (a linear anneal can go below the final LR), and one step more is
an error (:class:`ScheduleExhausted`), as in torch.

    spec = OneCycleSpec(max_lr=0.1, total_steps=10_000)
    policy = spec.build([0.1])   # lrs 0.004 at step 0, 0.1 at step 2999
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field, model_validator

from .base import (
    Gauge,
    NonNegativePerGroup,
    Policy,
    PolicySpec,
    PositiveFloat,
    PositiveInt,
    PositivePerGroup,
    ScheduleExhausted,
    check_base_lrs,
    check_finite_lrs,
    check_not_below,
    count,
    cycled_momenta,
    fields,
    group_floats,
    per_group,
)


def anneal_cos(start: float, end: float, pct: float) -> float:
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def anneal_linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


class OneCycleSpec(PolicySpec):
    kind: Literal["onecycle"] = "onecycle"
    max_lr: PositivePerGroup
    total_steps: PositiveInt | None = None
    # torch's alternative to total_steps: total_steps = epochs * steps_per_epoch
    epochs: PositiveInt | None = None
    steps_per_epoch: PositiveInt | None = None
    pct_start: float = Field(0.3, ge=0, le=1)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: NonNegativePerGroup = 0.85
    max_momentum: NonNegativePerGroup = 0.95
    div_factor: PositiveFloat = 25.0
    final_div_factor: PositiveFloat = 1e4
    three_phase: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> OneCycleSpec:
        if self.total_steps is None and (self.epochs is None or self.steps_per_epoch is None):
            raise ValueError("give total_steps, or epochs and steps_per_epoch")
        if self.cycle_momentum:
            check_not_below(self, "base_momentum", "max_momentum")
        # torch divides by each phase's length; a phase of length 0 that a step
        # can land in is a ZeroDivisionError there, a clear error here.
        start = 0.0
        for end in self.phase_ends():
            if end == start:
                raise ValueError(
                    f"pct_start={self.pct_start} with total_steps={self.steps} "
                    "gives a phase of zero steps"
                )
            start = end
        return self

    @property
    def steps(self) -> int:
        if self.total_steps is not None:
            return self.total_steps
        return self.epochs * self.steps_per_epoch  # type: ignore[operator]

    def phase_ends(self) -> list[float]:
        first = float(self.pct_start * self.steps) - 1
        if self.three_phase:
            return [first, float(2 * self.pct_start * self.steps) - 2, self.steps - 1]
        return [first, self.steps - 1]

    def build(self, base_lrs: Sequence[float]) -> OneCyclePolicy:
        return OneCyclePolicy(self, base_lrs)


class OneCyclePolicy(Policy):
    GAUGES = (Gauge("cycle_position_ratio", "gauge", "how far into the cycle, 0 to 1"),)

    def gauges(self) -> dict[str, float]:
        return {"cycle_position_ratio": min(1.0, self.step_num / self.spec.steps)}

    spec: OneCycleSpec
    STATE = fields(
        # At step total_steps a linear anneal is extended past the final LR,
        # below 0 when the last phase is short (torch's too).
        lrs=group_floats(low=None),
        momenta=cycled_momenta,
        step_num=count(high=lambda policy: policy.spec.steps),
    )

    def __init__(self, spec: OneCycleSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        n = len(check_base_lrs(base_lrs))  # only the group count: onecycle sets its own LRs
        peak = per_group(spec, "max_lr", n)
        initial = [lr / spec.div_factor for lr in peak]
        check_finite_lrs(spec.kind, "max_lr / div_factor", initial)
        final = [lr / spec.final_div_factor for lr in initial]
        check_finite_lrs(spec.kind, "max_lr / div_factor / final_div_factor", final)
        ends = spec.phase_ends()
        # (end_step, lr from, lr to, momentum from, momentum to), per torch.
        if spec.three_phase:
            self.phases = [
                (ends[0], initial, peak, "max", "base"),
                (ends[1], peak, initial, "base", "max"),
                (ends[2], initial, final, "max", "max"),
            ]
        else:
            self.phases = [
                (ends[0], initial, peak, "max", "base"),
                (ends[1], peak, final, "base", "max"),
            ]
        if spec.cycle_momentum:
            self.momentum_ends = {
                "base": per_group(spec, "base_momentum", n),
                "max": per_group(spec, "max_momentum", n),
            }
        self.anneal = anneal_cos if spec.anneal_strategy == "cos" else anneal_linear
        self.step_num = 0
        self._evaluate()

    def _advance(self, metrics: Mapping[str, float]) -> None:
        if self.step_num + 1 > self.spec.steps:
            raise ScheduleExhausted(
                f"onecycle: step {self.step_num + 1} is past total_steps={self.spec.steps}"
            )
        self.step_num += 1
        self._evaluate()

    def _evaluate(self) -> None:
        start_step, last = 0.0, len(self.phases) - 1
        for i, phase in enumerate(self.phases):
            end_step = phase[0]
            if self.step_num <= end_step or i == last:
                break
            start_step = end_step
        _, lr_from, lr_to, m_from, m_to = phase
        pct = (self.step_num - start_step) / (end_step - start_step)
        self.lrs = [self.anneal(a, b, pct) for a, b in zip(lr_from, lr_to)]
        if self.spec.cycle_momentum:
            self.momenta = [
                self.anneal(a, b, pct)
                for a, b in zip(self.momentum_ends[m_from], self.momentum_ends[m_to])
            ]
