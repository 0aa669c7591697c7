"""``cyclic``: the LR cycles between ``base_lr`` and ``max_lr`` (torch's
``CyclicLR``, Smith 2017), and the momentum cycles the other way.

    cycle = floor(1 + t / (up + down));  x = 1 + t / (up + down) - cycle
    s     = x / r if x <= r else (x - 1) / (r - 1),   r = up / (up + down)
    lr    = base_lr + (max_lr - base_lr) * s * scale
    m     = max_momentum - (max_momentum - base_momentum) * s * scale

``scale`` is 1 (``triangular``), ``1 / 2 ** (cycle - 1)`` (``triangular2``) or
``gamma ** t`` (``exp_range``; ``gamma`` is ignored in the other modes, as in
torch). The groups' own LRs are replaced by ``base_lr``.

    spec = CyclicSpec(base_lr=1e-4, max_lr=1e-2, step_size_up=2000)
    policy = spec.build([0.1])   # lrs 1e-4 at step 0, 1e-2 at step 2000
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import model_validator

from .base import (
    Gauge,
    NonNegativePerGroup,
    Policy,
    PolicySpec,
    PositiveFloat,
    PositiveInt,
    PositivePerGroup,
    check_base_lrs,
    check_not_below,
    count,
    cycled_momenta,
    fields,
    group_floats,
    per_group,
)


class CyclicSpec(PolicySpec):
    kind: Literal["cyclic"] = "cyclic"
    base_lr: PositivePerGroup
    max_lr: PositivePerGroup
    step_size_up: PositiveInt = 2000
    step_size_down: PositiveInt | None = None
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    gamma: PositiveFloat = 1.0
    cycle_momentum: bool = True
    base_momentum: NonNegativePerGroup = 0.8
    max_momentum: NonNegativePerGroup = 0.9

    @model_validator(mode="after")
    def _ordered(self) -> CyclicSpec:
        check_not_below(self, "base_lr", "max_lr")
        if self.cycle_momentum:
            check_not_below(self, "base_momentum", "max_momentum")
        return self

    def build(self, base_lrs: Sequence[float]) -> CyclicPolicy:
        return CyclicPolicy(self, base_lrs)


class CyclicPolicy(Policy):
    GAUGES = (
        Gauge("cycle", "gauge", "the cycle the policy is in, from 1"),
        Gauge("cycle_position_ratio", "gauge", "how far into the cycle, 0 to 1"),
    )

    def gauges(self) -> dict[str, float]:
        done = self.last_epoch / self.total_size
        return {"cycle": self.cycle, "cycle_position_ratio": done - math.floor(done)}

    spec: CyclicSpec
    STATE = fields(lrs=group_floats(), momenta=cycled_momenta, last_epoch=count())

    def __init__(self, spec: CyclicSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        n = len(check_base_lrs(base_lrs))  # only the group count: cyclic sets its own LRs
        self.base_lrs = per_group(spec, "base_lr", n)
        self.max_lrs = per_group(spec, "max_lr", n)
        if spec.cycle_momentum:
            self.base_momenta = per_group(spec, "base_momentum", n)
            self.max_momenta = per_group(spec, "max_momentum", n)
        up = float(spec.step_size_up)
        down = float(spec.step_size_down) if spec.step_size_down is not None else up
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        self.last_epoch = 0
        self._evaluate()

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self.last_epoch += 1
        self._evaluate()

    @property
    def cycle(self) -> int:
        return math.floor(1 + self.last_epoch / self.total_size)

    def _scale(self, cycle: int) -> float:
        mode = self.spec.mode
        if mode == "triangular":
            return 1.0
        if mode == "triangular2":
            # 1 / 2.0 ** (cycle - 1), exactly, without its OverflowError past
            # 1024 cycles (torch's): the amplitude is then 0, as it tends to.
            return math.ldexp(1.0, 1 - cycle)
        return self.spec.gamma**self.last_epoch  # exp_range scales by iteration

    def _evaluate(self) -> None:
        cycle = self.cycle
        x = 1.0 + self.last_epoch / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
        scale = self._scale(cycle)
        self.lrs = [
            base + (peak - base) * scale_factor * scale
            for base, peak in zip(self.base_lrs, self.max_lrs)
        ]
        if self.spec.cycle_momentum:
            self.momenta = [
                peak - (peak - base) * scale_factor * scale
                for base, peak in zip(self.base_momenta, self.max_momenta)
            ]
