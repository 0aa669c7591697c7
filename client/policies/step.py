"""``step``: multiply the LR by ``gamma`` every ``step_size`` steps (torch's
``StepLR``).

    lr_t = base_lr * gamma ** (t // step_size)

    spec = StepSpec(step_size=30, gamma=0.1)
    policy = spec.build([0.1])   # 0.1 for steps 0-29, 0.01 for 30-59, ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from .base import (
    Policy,
    PolicySpec,
    PositiveFloat,
    PositiveInt,
    check_base_lrs,
    check_finite_lrs,
    count,
    fields,
    group_floats,
)


class StepSpec(PolicySpec):
    kind: Literal["step"] = "step"
    step_size: PositiveInt
    gamma: PositiveFloat = 0.1

    def build(self, base_lrs: Sequence[float]) -> StepPolicy:
        return StepPolicy(self, base_lrs)


class StepPolicy(Policy):
    spec: StepSpec
    STATE = fields(lrs=group_floats(), last_epoch=count())

    def __init__(self, spec: StepSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.lrs = check_base_lrs(base_lrs)
        check_finite_lrs(
            spec.kind, "the first cut (base_lr * gamma)", [lr * spec.gamma for lr in self.lrs]
        )
        self.last_epoch = 0

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self.last_epoch += 1
        # Recursive like torch (lr * gamma at each boundary), not the closed
        # form: the products round differently from gamma ** n.
        if self.last_epoch % self.spec.step_size == 0:
            self.lrs = [lr * self.spec.gamma for lr in self.lrs]
