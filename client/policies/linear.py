"""``linear``: scale the LR linearly from ``start_factor`` to ``end_factor``
of the base LR over ``total_iters`` steps, then hold it (torch's ``LinearLR``;
the usual warmup).

    lr_t = base_lr * (start_factor
                      + (end_factor - start_factor) * min(t, total_iters) / total_iters)

Stepped with torch's recursive form (each step multiplies the last LR), which
rounds differently from the closed form above.

    spec = LinearSpec(start_factor=0.01, total_iters=500)
    policy = spec.build([0.1])   # 0.001 at step 0, 0.1 from step 500 on
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field

from .base import Policy, PolicySpec, PositiveInt, check_base_lrs, count, fields, group_floats


class LinearSpec(PolicySpec):
    kind: Literal["linear"] = "linear"
    start_factor: float = Field(1.0 / 3, gt=0, le=1)
    end_factor: float = Field(1.0, ge=0, le=1)
    total_iters: PositiveInt = 5

    def build(self, base_lrs: Sequence[float]) -> LinearPolicy:
        return LinearPolicy(self, base_lrs)


class LinearPolicy(Policy):
    spec: LinearSpec
    # With end_factor 0 the last factor rounds to about +-1e-16, as torch's
    # does: an LR a hair below 0 is a state this policy reaches.
    STATE = fields(lrs=group_floats(low=None), last_epoch=count())

    def __init__(self, spec: LinearSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.lrs = [lr * spec.start_factor for lr in check_base_lrs(base_lrs)]
        self.last_epoch = 0

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self.last_epoch += 1
        spec = self.spec
        if self.last_epoch <= spec.total_iters:
            delta = spec.end_factor - spec.start_factor
            factor = 1.0 + delta / (
                spec.total_iters * spec.start_factor + (self.last_epoch - 1) * delta
            )
            self.lrs = [lr * factor for lr in self.lrs]
