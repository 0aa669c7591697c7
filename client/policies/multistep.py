"""``multistep``: multiply the LR by ``gamma`` at each milestone step (torch's
``MultiStepLR``).

    lr_t = base_lr * gamma ** (number of milestones <= t)

Milestones are counted, as torch counts them: a milestone listed twice applies
``gamma`` twice, and their order does not matter.

    spec = MultiStepSpec(milestones=[30, 80], gamma=0.1)
    policy = spec.build([0.1])   # 0.1 until step 29, 0.01 until 79, then 0.001
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal

from .base import (
    NonNegativeInt,
    Policy,
    PolicySpec,
    PositiveFloat,
    SpecError,
    check_base_lrs,
    check_finite_lrs,
    count,
    fields,
    group_floats,
)


class MultiStepSpec(PolicySpec):
    kind: Literal["multistep"] = "multistep"
    milestones: list[NonNegativeInt]
    gamma: PositiveFloat = 0.1

    def build(self, base_lrs: Sequence[float]) -> MultiStepPolicy:
        return MultiStepPolicy(self, base_lrs)


class MultiStepPolicy(Policy):
    spec: MultiStepSpec
    STATE = fields(lrs=group_floats(), last_epoch=count())

    def __init__(self, spec: MultiStepSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.milestone_counts = Counter(spec.milestones)
        # torch's creation step is step 0: a milestone at 0 applies at once.
        base = check_base_lrs(base_lrs)
        at_zero = gamma_power(spec, self.milestone_counts[0])
        self.lrs = [lr * at_zero for lr in base]
        # Every milestone is known, so is the last LR: refuse it here, not at its step.
        last = gamma_power(spec, len(spec.milestones))
        check_finite_lrs(spec.kind, "gamma at every milestone", [lr * last for lr in base])
        self.last_epoch = 0

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self.last_epoch += 1
        times = self.milestone_counts.get(self.last_epoch, 0)
        if times:
            self.lrs = [lr * self.spec.gamma**times for lr in self.lrs]


def gamma_power(spec: MultiStepSpec, times: int) -> float:
    try:
        return spec.gamma**times
    except OverflowError:  # float ** raises where * would give inf
        raise SpecError(
            f"{spec.kind}: gamma ** {times} (milestones) is past the float range"
        ) from None
