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

from .base import NO_METRICS, NonNegativeInt, Policy, PolicySpec, PositiveFloat, check_base_lrs


class MultiStepSpec(PolicySpec):
    kind: Literal["multistep"] = "multistep"
    milestones: list[NonNegativeInt]
    gamma: PositiveFloat = 0.1

    def build(self, base_lrs: Sequence[float]) -> MultiStepPolicy:
        return MultiStepPolicy(self, base_lrs)


class MultiStepPolicy(Policy):
    STATE = ("lrs", "last_epoch")

    def __init__(self, spec: MultiStepSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.milestone_counts = Counter(spec.milestones)
        # torch's creation step is step 0: a milestone at 0 applies at once.
        at_zero = spec.gamma ** self.milestone_counts[0] if 0 in self.milestone_counts else 1
        self.lrs = [lr * at_zero for lr in check_base_lrs(base_lrs)]
        self.last_epoch = 0

    def step(self, metrics: Mapping[str, float] = NO_METRICS) -> list[float]:
        self.last_epoch += 1
        count = self.milestone_counts.get(self.last_epoch, 0)
        if count:
            self.lrs = [lr * self.spec.gamma**count for lr in self.lrs]
        return list(self.lrs)
