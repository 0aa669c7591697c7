"""``cosine``: cosine annealing from the base LR to ``eta_min`` over ``T_max``
steps (torch's ``CosineAnnealingLR``).

    lr_t = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2

Past ``T_max`` the curve climbs back up (period ``2 * T_max``), as torch's does.
We step it with torch's recursive form, not the closed form above, because
torch does and the two part by more than 1e-9 relative near ``eta_min``.

    spec = CosineSpec(T_max=1000, eta_min=1e-5)
    policy = spec.build([0.1])
    policy.step()   # -> [0.09999975...]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from .base import (
    NonNegativeFloat,
    Policy,
    PolicySpec,
    PositiveInt,
    check_base_lrs,
    count,
    fields,
    group_floats,
)


class CosineSpec(PolicySpec):
    kind: Literal["cosine"] = "cosine"
    T_max: PositiveInt
    eta_min: NonNegativeFloat = 0.0

    def build(self, base_lrs: Sequence[float]) -> CosinePolicy:
        return CosinePolicy(self, base_lrs)


class CosinePolicy(Policy):
    spec: CosineSpec
    STATE = fields(lrs=group_floats(), last_epoch=count())

    def __init__(self, spec: CosineSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.base_lrs = check_base_lrs(base_lrs)
        self.lrs = list(self.base_lrs)
        self.last_epoch = 0

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self.last_epoch += 1
        t, t_max, eta_min = self.last_epoch, self.spec.T_max, self.spec.eta_min
        if (t - 1 - t_max) % (2 * t_max) == 0:
            # The ratio below would divide by 1 + cos(pi) = 0 here; torch adds
            # the first step of the climb instead.
            rise = 1 - math.cos(math.pi / t_max)
            self.lrs = [
                lr + (base - eta_min) * rise / 2 for lr, base in zip(self.lrs, self.base_lrs)
            ]
        else:
            ratio = (1 + math.cos(math.pi * t / t_max)) / (1 + math.cos(math.pi * (t - 1) / t_max))
            self.lrs = [ratio * (lr - eta_min) + eta_min for lr in self.lrs]
