"""``plateau``: cut the LR when a watched metric stops improving
(torch's ``ReduceLROnPlateau``).

Per record that carries the metric ``m``: if ``m`` beats ``best`` (strictly;
``best * (1 - threshold)`` in ``rel`` mode for ``min``, ``best - threshold`` in
``abs``) it becomes ``best`` and the bad count resets, else the count grows;
during cooldown the count stays 0; once the count exceeds ``patience`` every
group is cut to ``max(lr * factor, min_lr)``, unless that changes it by ``eps``
or less. A record without the metric changes nothing.

    spec = PlateauSpec(metric="val_loss", patience=3, factor=0.5)
    policy = spec.build([0.1])
    policy.step({"val_loss": 0.42})   # -> [0.1]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import (
    BadValue,
    Decision,
    Gauge,
    NonNegativeFloat,
    NonNegativeInt,
    NonNegativePerGroup,
    Policy,
    PolicySpec,
    as_number,
    check_base_lrs,
    count,
    fields,
    group_floats,
    per_group,
    shown,
)


class PlateauSpec(PolicySpec):
    kind: Literal["plateau"] = "plateau"
    metric: str = Field("loss", min_length=1)
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: NonNegativeInt = 10
    threshold: NonNegativeFloat = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: NonNegativeInt = 0
    min_lr: NonNegativePerGroup = 0.0
    eps: NonNegativeFloat = 1e-8
    # Several ranks: the value decided on is this reduction of the ranks' own
    # (rank0: the lowest rank's alone, not waiting for the others).
    reduce: Literal["mean", "min", "max", "rank0"] = "mean"

    @model_validator(mode="after")
    def _threshold_fits_mode(self) -> PlateauSpec:
        # torch accepts it, but then best * (1 - threshold) <= 0 and nothing
        # ever counts as an improvement: every patience + 1 reports, a cut.
        if self.threshold_mode == "rel" and self.mode == "min" and self.threshold >= 1:
            raise ValueError("threshold must be below 1 with threshold_mode 'rel' in mode 'min'")
        return self

    def build(self, base_lrs: Sequence[float]) -> PlateauPolicy:
        return PlateauPolicy(self, base_lrs)

    def reduced_metrics(self) -> dict[str, str]:
        return {self.metric: self.reduce}


def initial_best(spec: PlateauSpec) -> float:
    return math.inf if spec.mode == "min" else -math.inf


def best_value(policy: Policy, value: Any) -> float:
    """A number, infinities included (``best`` starts at one, and a reported
    -inf in mode min becomes best, as in torch); never NaN (no comparison
    makes a NaN best)."""
    number = as_number(value)
    if number is None or math.isnan(number):
        raise BadValue(f"must be a number (not NaN), got {shown(value)}")
    return number


class PlateauPolicy(Policy):
    BOUNDED = True  # a step only compares, and cuts by factor < 1 to at least min_lr
    GAUGES = (
        Gauge("plateau_best", "gauge", "the best value of its metric"),
        Gauge("plateau_bad_steps", "gauge", "records since the metric improved"),
        Gauge("plateau_cooldown_steps", "gauge", "records of cooldown left"),
    )

    def gauges(self) -> dict[str, float]:
        return {
            "plateau_best": self.best,
            "plateau_bad_steps": self.num_bad_steps,
            "plateau_cooldown_steps": self.cooldown_counter,
        }

    spec: PlateauSpec
    STATE = fields(
        lrs=group_floats(),
        best=best_value,
        # step() zeroes the count once it passes patience, and the cooldown
        # starts at cooldown: a state outside these never follows a step.
        num_bad_steps=count(high=lambda policy: policy.spec.patience),
        cooldown_counter=count(high=lambda policy: policy.spec.cooldown),
    )

    def __init__(self, spec: PlateauSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.lrs = check_base_lrs(base_lrs)
        self.min_lrs = per_group(spec, "min_lr", len(self.lrs))
        self.best = initial_best(spec)
        self.num_bad_steps = 0
        self.cooldown_counter = 0

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self.decided = None
        value = metrics.get(self.spec.metric)
        if value is None:
            return
        current = float(value)
        # The order below is torch's: best and the bad count first, then the
        # cooldown (which zeroes the count), then the cut.
        if self.is_better(current):
            self.best = current
            self.num_bad_steps = 0
        else:
            self.num_bad_steps += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_steps = 0
        if self.num_bad_steps > self.spec.patience:
            self._reduce()
            self.cooldown_counter = self.spec.cooldown
            self.num_bad_steps = 0

    def observe(self, metrics: Mapping[str, float]) -> list[float]:
        # Plateau does not count steps: a reported metric is as good as a step's.
        return self.step(metrics)

    def is_better(self, value: float) -> bool:
        spec = self.spec
        # torch's relative threshold is best * (1 -/+ threshold) even when best
        # is negative, where it loosens instead of tightens; we match it.
        if spec.mode == "min":
            if spec.threshold_mode == "rel":
                return value < self.best * (1.0 - spec.threshold)
            return value < self.best - spec.threshold
        if spec.threshold_mode == "rel":
            return value > self.best * (spec.threshold + 1.0)
        return value > self.best + spec.threshold

    def _reduce(self) -> None:
        lrs = list(self.lrs)  # a new list: callers may hold the old one
        for i, old in enumerate(lrs):
            new = max(old * self.spec.factor, self.min_lrs[i])
            if old - new > self.spec.eps:
                lrs[i] = new
        if lrs != self.lrs:
            self.lrs = lrs
            self.decided = Decision(
                "plateau",
                f"plateau: {self.spec.metric} has not improved on {self.best:.6g} "
                f"for {self.spec.patience + 1} reports; LR x{self.spec.factor}",
            )
