"""What every LR policy is: a pydantic spec (the config, as sent on the wire)
and a pure policy object built from it (the state, stepped once per record).

A policy never touches an optimizer, a socket, a clock or a file: LRs in
(``base_lrs`` at build time), LRs out (``step()``), which is what lets the same
code run in the daemon, in the training process and in ``lrpilot simulate``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

NO_METRICS: Mapping[str, float] = MappingProxyType({})

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
# torch accepts "float or list per group" for these fields; so do we.
PositivePerGroup = PositiveFloat | list[PositiveFloat]
NonNegativePerGroup = NonNegativeFloat | list[NonNegativeFloat]


class SpecError(ValueError):
    """A policy spec (or its use with a set of param groups) is invalid.

    The message is one line that names the field and the rule.
    """


class ScheduleExhausted(RuntimeError):
    """A finite schedule (``onecycle``) was stepped past its end, as torch refuses."""


class PolicySpec(BaseModel):
    """Base of every policy's config. Field names and defaults are torch's.

    Strict: ``"3"`` or ``true`` is not a number and ``2.0`` is not an integer,
    so a typo in a JSON file is an error rather than a silently coerced value.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    kind: str

    def build(self, base_lrs: Sequence[float]) -> Policy:
        raise NotImplementedError


def per_group(spec: PolicySpec, field: str, n_groups: int) -> list[float]:
    """Expand a "number or list per group" field to one float per param group."""
    value = getattr(spec, field)
    if not isinstance(value, list):
        return [float(value)] * n_groups
    if len(value) != n_groups:
        raise SpecError(
            f"{spec.kind}.{field}: expected {n_groups} value(s), one per param group, "
            f"got {len(value)}"
        )
    return [float(v) for v in value]


def check_not_below(spec: PolicySpec, low: str, high: str) -> None:
    """Raise unless ``high >= low`` for every group where both are given."""
    lows, highs = getattr(spec, low), getattr(spec, high)
    lows = lows if isinstance(lows, list) else [lows]
    highs = highs if isinstance(highs, list) else [highs]
    if len(lows) > 1 and len(highs) > 1 and len(lows) != len(highs):
        return  # the group count is checked when the policy is built
    for i in range(max(len(lows), len(highs))):
        lo, hi = lows[min(i, len(lows) - 1)], highs[min(i, len(highs) - 1)]
        if hi < lo:
            raise ValueError(f"{high} ({hi}) must not be below {low} ({lo})")


def check_base_lrs(base_lrs: Sequence[float]) -> list[float]:
    lrs = [float(lr) for lr in base_lrs]
    if not lrs:
        raise SpecError("base_lrs: at least one param group is needed")
    for i, lr in enumerate(lrs):
        if not (math.isfinite(lr) and lr > 0):
            raise SpecError(f"base_lrs[{i}]: a learning rate must be a positive number, got {lr}")
    return lrs


class Policy:
    """A learning-rate policy: ``step(metrics) -> lrs``, like a torch scheduler.

    After construction ``lrs`` holds the LRs for the first optimizer step (torch
    schedulers take one step when they are created); each ``step()`` is one
    scheduler step and returns the LRs for the next optimizer step. ``momenta``
    is the momentum (or Adam's beta1) per group for policies that cycle it,
    else ``None``.

    ``lrs`` is replaced by a new list when it changes, never mutated in
    place, so a caller may keep the reference it got.

    State is the attributes named in ``STATE``: ``state_dict()`` copies them
    (JSON-serialisable), ``load_state_dict()`` writes them back, so a policy
    stopped, saved and loaded into a fresh one built from the same spec and
    base LRs goes on with the identical sequence.
    """

    STATE: ClassVar[tuple[str, ...]] = ("lrs",)
    spec: PolicySpec
    lrs: list[float]
    momenta: list[float] | None = None
    # Why the last step()/observe() changed the LRs because of a metric, or
    # None. Only such decisions need the daemon; step-driven changes are
    # reproduced by the training process itself.
    decided: str | None = None

    def step(self, metrics: Mapping[str, float] = NO_METRICS) -> list[float]:
        raise NotImplementedError

    def observe(self, metrics: Mapping[str, float]) -> list[float]:
        """Metrics that are not a new step (a validation loss): step-driven
        policies ignore them; metric-driven ones act as on a step's."""
        return list(self.lrs)

    def state_dict(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in self.STATE}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [name for name in self.STATE if name not in state]
        if missing:
            raise SpecError(f"{self.spec.kind} state: missing {', '.join(missing)}")
        for name in self.STATE:
            setattr(self, name, copy.deepcopy(state[name]))
