"""``cosine_restarts``: cosine annealing with warm restarts (SGDR; torch's
``CosineAnnealingWarmRestarts``).

    lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2

``T_cur`` counts steps since the last restart; when it reaches ``T_i`` it wraps
to 0 and the next period is ``T_i * T_mult`` long.

    spec = CosineRestartsSpec(T_0=100, T_mult=2, eta_min=1e-5)
    policy = spec.build([0.1])
    policy.step()   # -> [0.09997...]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .base import (
    MAX_COUNT,
    BadValue,
    Gauge,
    NonNegativeFloat,
    Policy,
    PolicySpec,
    PositiveInt,
    check_base_lrs,
    count,
    fields,
    group_floats,
)


class CosineRestartsSpec(PolicySpec):
    kind: Literal["cosine_restarts"] = "cosine_restarts"
    T_0: PositiveInt
    T_mult: PositiveInt = 1
    eta_min: NonNegativeFloat = 0.0

    def build(self, base_lrs: Sequence[float]) -> CosineRestartsPolicy:
        return CosineRestartsPolicy(self, base_lrs)


class CosineRestartsPolicy(Policy):
    GAUGES = (
        Gauge("cycle", "gauge", "the cycle the policy is in, from 1"),
        Gauge("cycle_position_ratio", "gauge", "how far into the cycle, 0 to 1"),
        Gauge("restarts", "counter", "warm restarts so far"),
    )

    def gauges(self) -> dict[str, float]:
        return {
            "cycle": self.restarts + 1,
            "cycle_position_ratio": self.T_cur / self.T_i,
            "restarts": self.restarts,
        }

    spec: CosineRestartsSpec
    STATE = fields(lrs=group_floats(), T_cur=count(), T_i=count(low=1), restarts=count())

    def __init__(self, spec: CosineRestartsSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.base_lrs = check_base_lrs(base_lrs)
        self.T_cur = 0
        self.T_i = spec.T_0
        self.restarts = 0
        self.lrs = self._lrs()

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self.T_cur += 1
        if self.T_cur >= self.T_i:  # torch wraps on >=, so T_cur never equals T_i
            self.T_cur = self.T_cur % self.T_i
            self.T_i = self.T_i * self.spec.T_mult
            self.restarts += 1
        self.lrs = self._lrs()

    def check_state(self, state: Mapping[str, Any]) -> None:
        if state["T_cur"] >= state["T_i"]:
            raise BadValue(f"T_cur must be below T_i ({state['T_i']}), got {state['T_cur']}")
        period = self.period(state["restarts"])
        if state["T_i"] != period:
            raise BadValue(
                f"T_i must be T_0 * T_mult ** restarts ({period or 'past 2**53'}), "
                f"got {state['T_i']}"
            )

    def period(self, restarts: int) -> int | None:
        """T_0 * T_mult ** restarts, the period after that many restarts; None
        past 2**53, where no state's T_i can be."""
        spec = self.spec
        if spec.T_mult == 1:
            return spec.T_0
        if restarts > MAX_COUNT.bit_length():  # T_mult >= 2: T_i would pass 2**53
            return None
        period = spec.T_0 * spec.T_mult**restarts
        return period if period <= MAX_COUNT else None

    def _lrs(self) -> list[float]:
        eta_min = self.spec.eta_min
        cosine = 1 + math.cos(math.pi * self.T_cur / self.T_i)
        return [eta_min + (base_lr - eta_min) * cosine / 2 for base_lr in self.base_lrs]
