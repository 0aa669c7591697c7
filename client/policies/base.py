"""What every LR policy is: a pydantic spec (the config, as sent on the wire)
and a pure policy object built from it (the state, stepped once per record).

A policy never touches an optimizer, a socket, a clock or a file: LRs in
(``base_lrs`` at build time), LRs out (``step()``), which is what lets the same
code run in the daemon, in the training process and in ``lrpilot simulate``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import LRPilotError

NO_METRICS: Mapping[str, float] = MappingProxyType({})

# Step counts, in specs and in states, are bounded as on the wire (2**53: a
# float64 holds them exactly), so no product of a few leaves the float range.
MAX_COUNT = 2**53

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1, le=MAX_COUNT)]
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_COUNT)]
# torch accepts "float or list per group" for these fields; so do we.
PositivePerGroup = PositiveFloat | list[PositiveFloat]
NonNegativePerGroup = NonNegativeFloat | list[NonNegativeFloat]


class SpecError(LRPilotError, ValueError):
    """A policy spec (or its use with a set of param groups) is invalid.

    The message is one line that names the field and the rule.
    """


class ScheduleExhausted(LRPilotError, RuntimeError):
    """A finite schedule (``onecycle``) was stepped past its end, as torch refuses,
    or a step would take the LRs out of the finite range (a ``gamma > 1`` that
    compounds to infinity): either way the schedule has nothing more to give
    and the last LRs hold."""


class PolicySpec(BaseModel):
    """Base of every policy's config. Field names and defaults are torch's.

    Strict: ``"3"`` or ``true`` is not a number and ``2.0`` is not an integer,
    so a typo in a JSON file is an error rather than a silently coerced value.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    kind: str

    def build(self, base_lrs: Sequence[float]) -> Policy:
        raise NotImplementedError

    def reduced_metrics(self) -> dict[str, str]:
        """The metrics the policy decides on, each with how a run of several
        ranks reduces it (``mean``, ``min``, ``max``, ``rank0``): the daemon
        waits for every live rank's value of these before it decides. Empty
        for a step-driven policy."""
        return {}


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


def all_finite(values: Sequence[float]) -> bool:
    # sum() is one pass in C; only a non-finite sum (or finite values that
    # overflow when added) needs a look at each value.
    return math.isfinite(sum(values)) or all(map(math.isfinite, values))


def check_finite_lrs(kind: str, what: str, lrs: Sequence[float]) -> None:
    """Refuse, at build time, LRs that a spec already takes out of the float range."""
    if not all_finite(lrs):
        raise SpecError(f"{kind}: {what} gives LRs {lrs}, not finite numbers")


def check_base_lrs(base_lrs: Sequence[float]) -> list[float]:
    lrs = [float(lr) for lr in base_lrs]
    if not lrs:
        raise SpecError("base_lrs: at least one param group is needed")
    for i, lr in enumerate(lrs):
        if not (math.isfinite(lr) and lr > 0):
            raise SpecError(f"base_lrs[{i}]: a learning rate must be a positive number, got {lr}")
    return lrs


# --- state checks ---------------------------------------------------------
# A state comes from the network (a hello, a command) or a file: each field is
# checked by its own rule before anything is assigned.


class BadValue(ValueError):
    """The rule a state value breaks (``must be ..., got ...``); ``at`` is where
    inside the field (``[1]``)."""

    def __init__(self, rule: str, at: str = "") -> None:
        super().__init__(rule)
        self.at = at


# A field's check: (the policy loading it, the value) -> the value to assign
# (normalised, and never the caller's own list), or BadValue.
StateCheck = Callable[["Policy", Any], Any]


def fields(**checks: StateCheck) -> Mapping[str, StateCheck]:
    """A policy's ``STATE``: its fields, in order, each with its check."""
    return MappingProxyType(checks)


def shown(value: Any) -> str:
    """A value for a one-line message, cut short: it may be anything from the network."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def as_number(value: Any) -> float | None:
    """A JSON number (int or float, not a bool) as a float; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int past the float range
        return None


def count(low: int = 0, high: Callable[[Any], int] | None = None) -> StateCheck:
    """An integer (not a bool, not 2.0) from ``low`` to ``high(policy)``, else 2**53."""
    # high takes Any: each policy's lambda reads its own spec (policy.spec.patience).

    def check(policy: Policy, value: Any) -> int:
        top = MAX_COUNT if high is None else high(policy)
        if type(value) is not int or not low <= value <= top:
            shown_top = "2**53" if top == MAX_COUNT else str(top)
            raise BadValue(f"must be an integer from {low} to {shown_top}, got {shown(value)}")
        return value

    return check


def group_floats(low: float | None = 0.0) -> StateCheck:
    """A list of finite numbers (``>= low`` unless None), one per param group."""
    rule = "a finite number" if low is None else f"a finite number >= {low:g}"

    def check(policy: Policy, value: Any) -> list[float]:
        n = policy.n_groups
        if not isinstance(value, list) or len(value) != n:
            raise BadValue(
                f"must be a list of {n} ({rule}, one per param group), got {shown(value)}"
            )
        floats = [as_number(item) for item in value]
        for i, (item, number) in enumerate(zip(value, floats)):
            if number is None or not math.isfinite(number) or (low is not None and number < low):
                raise BadValue(f"must be {rule}, got {shown(item)}", at=f"[{i}]")
        return floats  # type: ignore[return-value]

    return check


def optional(check: StateCheck) -> StateCheck:
    """``check``'s value, or null."""

    def check_or_null(policy: Policy, value: Any) -> Any:
        return None if value is None else check(policy, value)

    return check_or_null


def cycled_momenta(policy: Policy, value: Any) -> list[float] | None:
    """One momentum per group where the spec cycles momentum, else null."""
    if getattr(policy.spec, "cycle_momentum", False):
        return group_floats()(policy, value)
    if value is not None:
        raise BadValue(f"must be null: this spec does not cycle momentum, got {shown(value)}")
    return None


def an_object(policy: Policy, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BadValue(f"must be an object, got {shown(value)}")
    return value


@dataclass(frozen=True)
class Decision:
    """Why a policy changed the LRs because of a metric: a bounded ``cause``
    (a Prometheus label, a Grafana tag: the policy's kind) and the ``reason``
    people read in the journal."""

    cause: str
    reason: str


@dataclass(frozen=True)
class Trip:
    """A guard's trip: the record ``step`` whose ``metric`` tripped it,
    ``cause`` (``guard:nan`` for a value that is not finite, ``guard:spike``)
    and the value (None when it was not finite)."""

    step: int
    cause: str
    metric: str
    value: float | None


@dataclass(frozen=True)
class Gauge:
    """A number a policy exports about its state: Prometheus family
    ``lrpilot_policy_<name>`` (a counter gets ``_total``), and what it means."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str


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
    base LRs goes on with the identical sequence. ``STATE`` maps each name to
    its check: a state comes from the network, and is refused whole
    (:class:`SpecError`) unless every field passes its check and
    :meth:`check_state`.

    A subclass implements ``_advance``; ``step()`` never lets a non-finite LR
    out (see :meth:`step`).
    """

    STATE: ClassVar[Mapping[str, StateCheck]] = fields(lrs=group_floats())
    spec: PolicySpec
    lrs: list[float]
    momenta: list[float] | None = None
    # Why the last step()/observe() changed the LRs because of a metric, or
    # None. Only such decisions need the daemon; step-driven changes are
    # reproduced by the training process itself.
    decided: Decision | None = None

    @property
    def n_groups(self) -> int:
        return len(self.lrs)

    @property
    def sweeping(self) -> bool:
        """True while the policy runs an LR sweep whose parameter updates are
        to be undone (``range_test``): the hook copies the model's parameters
        and the optimizer's state when it turns True and puts them back when
        it turns False, at the same step on every rank (commands are applied
        at their effective step)."""
        return False

    @property
    def trips(self) -> int:
        """How many times a ``guard`` in this policy has tripped: the hook
        compares it before and after a command to tell the training loop."""
        return 0

    @property
    def last_trip(self) -> Trip | None:
        """The guard's last trip, or None."""
        return None

    # A policy whose step can neither raise nor take the LRs out of the float
    # range skips the guard in step() (plateau only ever cuts, to no less
    # than min_lr): it runs on every pilot.step, twice for a plateau's mirror.
    BOUNDED: ClassVar[bool] = False

    def step(self, metrics: Mapping[str, float] = NO_METRICS) -> list[float]:
        """One scheduler step; the LRs for the next optimizer step.

        A step whose LRs (or momenta) would not be finite numbers raises
        :class:`ScheduleExhausted` and leaves the policy's state as it was, so
        a caller holds the last finite LRs as it does at the end of
        ``onecycle``. (A ``sequential`` counts the step, as it does when a
        ``onecycle`` stage runs out; its stage is left as it was.)
        """
        if self.BOUNDED:
            self._advance(metrics)
            return list(self.lrs)
        # A shallow copy is enough: lists are replaced, never mutated. One
        # dict copy (in C) is what this costs a step.
        kept = self.__dict__.copy()
        try:
            self._advance(metrics)
            momenta = self.momenta
            if all_finite(self.lrs) and (momenta is None or all_finite(momenta)):
                return list(self.lrs)
        except (OverflowError, ZeroDivisionError):  # float ** and / raise where * gives inf
            pass
        self.__dict__.update(kept)
        raise ScheduleExhausted(
            f"{self.spec.kind}: the LR left the finite range (the next step's LRs would not "
            "be finite numbers)"
        )

    def _advance(self, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def observe(self, metrics: Mapping[str, float]) -> list[float]:
        """Metrics that are not a new step (a validation loss): step-driven
        policies ignore them; metric-driven ones act as on a step's."""
        return list(self.lrs)

    # What the exporter shows of the state, and gauges() their values now:
    # each policy says what it exports, the exporter knows none by name.
    GAUGES: ClassVar[tuple[Gauge, ...]] = ()

    def gauges(self) -> dict[str, float]:
        """The values of ``GAUGES`` now, by name."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in self.STATE}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, value in self.checked_state(state).items():
            setattr(self, name, value)

    def checked_state(self, state: Any) -> dict[str, Any]:
        """``state``'s fields, checked and normalised, ready to assign.

        Raises :class:`SpecError`, one line naming the field and the rule.
        """
        kind = self.spec.kind
        if not isinstance(state, Mapping):
            raise SpecError(f"{kind} state: expected an object, got {shown(state)}")
        missing = [name for name in self.STATE if name not in state]
        if missing:
            raise SpecError(f"{kind} state: missing {', '.join(missing)}")
        unknown = [shown(name) for name in state if name not in self.STATE]
        if unknown:
            raise SpecError(f"{kind} state: unknown field(s) {', '.join(unknown[:3])}")
        checked = {}
        for name, check in self.STATE.items():
            try:
                checked[name] = check(self, state[name])
            except BadValue as exc:
                raise SpecError(f"{kind} state: {name}{exc.at} {exc}") from None
        try:
            self.check_state(checked)
        except BadValue as exc:
            raise SpecError(f"{kind} state: {exc}") from None
        return checked

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Rules between fields of a state whose fields passed their own checks;
        BadValue (naming the fields) for a state the policy cannot be in."""
