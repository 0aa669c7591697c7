"""``exponential``: multiply the LR by ``gamma`` every step (torch's
``ExponentialLR``).

    lr_t = base_lr * gamma ** t

    spec = ExponentialSpec(gamma=0.999)
    policy = spec.build([0.1])
    policy.step()   # -> [0.0999]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from .base import Policy, PolicySpec, PositiveFloat, check_base_lrs, check_finite_lrs


class ExponentialSpec(PolicySpec):
    kind: Literal["exponential"] = "exponential"
    gamma: PositiveFloat

    def build(self, base_lrs: Sequence[float]) -> ExponentialPolicy:
        return ExponentialPolicy(self, base_lrs)


class ExponentialPolicy(Policy):
    spec: ExponentialSpec

    def __init__(self, spec: ExponentialSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.lrs = check_base_lrs(base_lrs)
        check_finite_lrs(
            spec.kind, "the first step (base_lr * gamma)", [lr * spec.gamma for lr in self.lrs]
        )

    def _advance(self, metrics: Mapping[str, float]) -> None:
        # Recursive like torch; base_lr * gamma ** t rounds differently.
        self.lrs = [lr * self.spec.gamma for lr in self.lrs]
