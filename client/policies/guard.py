"""``guard``: a guard against divergence around any other policy. When the
watched metric (the training loss, by default) is not a finite number, or
spikes far above its recent values, the guard *trips*: every LR is multiplied
by ``cut`` for the next ``hold`` steps, then the inner policy has the LRs
again, where it stands by then.

Per scheduler step (``step(metrics)``):

1. the inner policy steps, always, with the same metrics: its clock runs
   through the hold, so at the hand-back its LRs are the ones it would have
   given without the guard (a plateau inside still counts the records);
2. the guard counts the step (``last_epoch``);
3. if the record carries ``metric`` with value ``v``:

   - ``v`` not finite (NaN, ±inf) and ``nan``: trip, cause ``guard:nan``;
     with ``nan`` false such a value is ignored;
   - else, while not holding and once the window holds ``min_points``
     values, a spike trips, cause
     ``guard:spike``. ``spike="ratio"``: ``v > factor * mean`` of the window,
     checked only while that mean is above 0 (the ratio suits a loss; for a
     metric that may be 0 or negative use ``zscore``). ``spike="zscore"``:
     ``(v - mean) / std > zscore``, the population std of the window, never
     while that std is 0. ``spike="off"``: no spike check;
   - else ``v`` joins the window (the last ``window`` values). The value
     that trips never enters it; those during the hold do, so a loss that
     settles at a new level after a trip is what the guard compares with
     when the hold ends (one event, one trip).

4. a trip sets ``hold_left = hold`` (a non-finite value while holding starts
   the hold again); a step without a trip while holding counts it down by one.

``lrs`` is the inner's LRs times ``cut`` while ``hold_left > 0``, else the
inner's. So the LRs a trip's step returns, and those of the ``hold - 1``
steps after it, are cut: ``hold`` optimizer steps, counted from the record
that tripped (a command takes effect a step or two later on the training
side, so the ranks apply a few cut steps fewer). The hold counts down
without metrics: only the trip needs the daemon.

A report (``observe(metrics)``, a validation loss) goes to the inner policy
and then through the same checks, so a report can trip the guard too (and a
finite reported value joins the window); a report does not count a step,
nor the hold down.

A trip is a decision (``decided``, cause ``guard:nan`` or ``guard:spike``):
the daemon sends the guard's whole state, and every rank loads it at the same
effective step and counts the hold down from there with ``step(NO_METRICS)``.
On a step where the guard does not trip, ``decided`` is the inner policy's
(a plateau's cut inside the guard).

``last_epoch`` is the guard's own step count: it is the run's record step
when the guard is the run's policy from step 0 (counted from the switch
otherwise); ``last_trip.step`` is that count at the trip.

When the inner schedule runs out (:class:`ScheduleExhausted`, e.g. past
``onecycle``'s ``total_steps``) the guard's step raises it too, before the
guard has done anything: the guard's own state is left as it was, and the
run holds its last LRs (cut, if the guard was holding then) like any run
whose schedule has ended.

    spec = GuardSpec(inner={"kind": "cosine", "T_max": 10_000})
    policy = spec.build([0.1])
    policy.step({"loss": 2.3})          # -> the cosine's LR
    policy.step({"loss": float("nan")})  # -> x0.1, for 100 steps
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from .base import (
    BadValue,
    Decision,
    Gauge,
    Policy,
    PolicySpec,
    PositiveInt,
    SpecError,
    Trip,
    an_object,
    as_number,
    check_base_lrs,
    count,
    fields,
    shown,
)
from .sequential import STAGE_SPECS, SequentialSpec

# The window is part of the state, which travels in every command.
# At most: the window is summed at every record, in the rank's copy too
# (training steps pay it): 3.9 us a step at 50 values, 21 us at 1,000 (ratio).
MAX_WINDOW = 1_000
CAUSES = ("guard:nan", "guard:spike")

# Every kind but guard itself.
INNER_SPECS: tuple[type[PolicySpec], ...] = (*STAGE_SPECS, SequentialSpec)
if TYPE_CHECKING:  # mypy cannot read a Union built from a tuple at runtime
    InnerSpec = PolicySpec
else:
    InnerSpec = Annotated[Union[INNER_SPECS], Field(discriminator="kind")]  # noqa: UP007


class GuardSpec(PolicySpec):
    kind: Literal["guard"] = "guard"
    inner: InnerSpec
    metric: str = Field("loss", min_length=1)
    spike: Literal["ratio", "zscore", "off"] = "ratio"
    factor: float = Field(10.0, gt=1)
    zscore: float = Field(4.0, gt=0)
    window: int = Field(50, ge=1, le=MAX_WINDOW)
    min_points: int = Field(10, ge=1, le=MAX_WINDOW)
    nan: bool = True
    cut: float = Field(0.1, gt=0, le=1)
    hold: PositiveInt = 100

    @model_validator(mode="after")
    def _min_points_fit(self) -> GuardSpec:
        if self.min_points > self.window:
            raise ValueError(
                f"min_points ({self.min_points}) must not be above window ({self.window})"
            )
        return self

    def build(self, base_lrs: Sequence[float]) -> GuardPolicy:
        return GuardPolicy(self, base_lrs)

    def reduced_metrics(self) -> dict[str, str]:
        # The guard's metric is the ranks' max (a spike on any one rank is a
        # spike; NaN on any rank is NaN under every rule but rank0). Where
        # the inner policy watches the same metric, its own rule is kept:
        # wrapping a policy never changes what it decides on.
        return {self.metric: "max", **self.inner.reduced_metrics()}


# The relative error of a window's mean of up to 1,000 values, and then some.
ROUNDING = 1e-12


def window_mean(values: Sequence[float]) -> float | None:
    """The mean of finite values, or None when it is not a finite number."""
    try:
        # fsum: correctly rounded, the same on every platform and Python.
        mean = math.fsum(values) / len(values)
    except OverflowError:  # an intermediate sum past the float range
        return None
    return mean if math.isfinite(mean) else None


def window_std(values: Sequence[float], mean: float) -> float | None:
    """The population standard deviation, or None when it is not finite."""
    try:
        variance = math.fsum((v - mean) * (v - mean) for v in values) / len(values)
    except OverflowError:
        return None
    return math.sqrt(variance) if math.isfinite(variance) else None


def window_values(policy: Any, value: Any) -> list[float]:
    top = policy.spec.window
    if not isinstance(value, list) or len(value) > top:
        raise BadValue(f"must be a list of at most {top} finite numbers, got {shown(value)}")
    numbers = [as_number(item) for item in value]
    for i, (item, number) in enumerate(zip(value, numbers)):
        if number is None or not math.isfinite(number):
            raise BadValue(f"must be a finite number, got {shown(item)}", at=f"[{i}]")
    return numbers  # type: ignore[return-value]


TRIP_FIELDS = ("step", "cause", "metric", "value")


def trip_value(policy: Any, value: Any) -> Trip | None:
    """null, or ``{step, cause, metric, value}``: the guard's last trip."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != set(TRIP_FIELDS):
        raise BadValue(
            f"must be null or an object with {', '.join(TRIP_FIELDS)}, got {shown(value)}"
        )
    try:
        step = count()(policy, value["step"])
    except BadValue as exc:
        raise BadValue(str(exc), at=".step") from None
    cause = value["cause"]
    if cause not in CAUSES:
        raise BadValue(f"must be 'guard:nan' or 'guard:spike', got {shown(cause)}", at=".cause")
    metric = value["metric"]
    if metric != policy.spec.metric:
        raise BadValue(
            f"must be {policy.spec.metric!r}, the metric the guard watches, got {shown(metric)}",
            at=".metric",
        )
    raw = value["value"]
    number = None if raw is None else as_number(raw)
    if cause == "guard:nan":
        if raw is not None:
            raise BadValue(f"must be null for cause 'guard:nan', got {shown(raw)}", at=".value")
    elif number is None or not math.isfinite(number):
        raise BadValue(
            f"must be a finite number for cause {cause!r}, got {shown(raw)}", at=".value"
        )
    return Trip(step, cause, metric, number)


class GuardPolicy(Policy):
    # Its own, and whatever the inner policy exports.
    GAUGES = (
        Gauge("guard_trips", "counter", "times the guard has tripped"),
        Gauge("guard_holding", "gauge", "steps of the guard's LR cut left (0: not holding)"),
        Gauge("guard_window_mean", "gauge", "the mean of the guard's window of recent values"),
    )

    spec: GuardSpec
    STATE = fields(
        last_epoch=count(),
        window=window_values,
        hold_left=count(high=lambda policy: policy.spec.hold),
        trip_count=count(),
        last_trip=trip_value,
        inner=an_object,  # the inner policy checks it, in load_state_dict
    )

    def __init__(self, spec: GuardSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.base_lrs = check_base_lrs(base_lrs)
        self.inner = spec.inner.build(self.base_lrs)
        self.last_epoch = 0
        self.window: list[float] = []
        self.hold_left = 0
        self.trip_count = 0
        self._last_trip: Trip | None = None
        self.decided = None
        self._refresh()

    # --- what the run sees ------------------------------------------------

    @property
    def momenta(self) -> list[float] | None:  # type: ignore[override]
        return self.inner.momenta

    @property
    def sweeping(self) -> bool:
        return self.inner.sweeping

    @property
    def trips(self) -> int:
        return self.trip_count

    @property
    def last_trip(self) -> Trip | None:
        return self._last_trip

    def gauges(self) -> dict[str, float]:
        values: dict[str, float] = {
            "guard_trips": self.trip_count,
            "guard_holding": self.hold_left,
        }
        mean = window_mean(self.window) if self.window else None
        if mean is not None:
            values["guard_window_mean"] = mean
        return {**values, **self.inner.gauges()}

    def _refresh(self) -> None:
        inner = self.inner.lrs
        if self.hold_left > 0:
            cut = self.spec.cut
            self.lrs = [lr * cut for lr in inner]  # a new list, as lrs always is
        else:
            self.lrs = inner  # the inner's own, which it replaces, never mutates

    # --- stepping ---------------------------------------------------------

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self.decided = None
        # The inner first: when its schedule has run out it raises, and the
        # guard has changed nothing.
        self.inner.step(metrics)
        self.last_epoch += 1
        tripped = self._check(metrics)
        if tripped is None and self.hold_left > 0:
            self.hold_left -= 1
        self.decided = tripped or self.inner.decided
        self._refresh()

    def observe(self, metrics: Mapping[str, float]) -> list[float]:
        self.decided = None
        self.inner.observe(metrics)
        tripped = self._check(metrics)
        self.decided = tripped or self.inner.decided
        self._refresh()
        return list(self.lrs)

    def _check(self, metrics: Mapping[str, float]) -> Decision | None:
        """Trip on the metric's value, or take it into the window."""
        spec = self.spec
        raw = metrics.get(spec.metric)
        if raw is None:
            return None
        value = float(raw)
        if not math.isfinite(value):
            if not spec.nan:
                return None
            return self._trip(
                "guard:nan", None, f"{spec.metric} is {value} at step {self.last_epoch}"
            )
        # While the cut holds, values are not checked for spikes: they enter
        # the window, so that a loss that settles at a new level after a
        # trip is the level the guard compares with when the hold ends,
        # rather than a spike at every record that would hold the cut forever.
        spike = self._spike(value) if self.hold_left == 0 else None
        if spike is not None:
            return self._trip("guard:spike", value, spike)
        window = [*self.window, value]  # a new list: step() may put the old one back
        if len(window) > spec.window:
            del window[0]
        self.window = window
        return None

    def _spike(self, value: float) -> str | None:
        """Why ``value`` is a spike, or None."""
        spec, window = self.spec, self.window
        if spec.spike == "off" or len(window) < spec.min_points:
            return None
        mean = window_mean(window)
        if mean is None:
            return None
        where = f"at step {self.last_epoch}"
        over = f"over the last {len(window)} values"
        if spec.spike == "ratio":
            if mean > 0 and value > spec.factor * mean:
                return (
                    f"{spec.metric} {value:.6g} {where} is {value / mean:.3g}x its mean "
                    f"{mean:.6g} {over} (factor {spec.factor:g})"
                )
            return None
        std = window_std(window, mean)
        # 0, not finite, or no more than the rounding of the mean itself: a
        # constant metric (its mean off by an ulp) has no spread to judge by.
        if not std or std <= ROUNDING * abs(mean):
            return None
        z = (value - mean) / std
        if z > spec.zscore:
            return (
                f"{spec.metric} {value:.6g} {where} is {z:.3g} std above its mean "
                f"{mean:.6g} {over} (zscore {spec.zscore:g})"
            )
        return None

    def _trip(self, cause: str, value: float | None, why: str) -> Decision:
        spec = self.spec
        self.hold_left = spec.hold
        self.trip_count += 1
        self._last_trip = Trip(self.last_epoch, cause, spec.metric, value)
        return Decision(cause, f"{cause}: {why}; LRs x{spec.cut:g} for {spec.hold} steps")

    # --- state ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        trip = self._last_trip
        return {
            "last_epoch": self.last_epoch,
            "window": list(self.window),
            "hold_left": self.hold_left,
            "trip_count": self.trip_count,
            "last_trip": None
            if trip is None
            else {
                "step": trip.step,
                "cause": trip.cause,
                "metric": trip.metric,
                "value": trip.value,
            },
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        checked = self.checked_state(state)
        inner = self.spec.inner.build(self.base_lrs)
        try:
            inner.load_state_dict(checked["inner"])
        except SpecError as exc:
            raise SpecError(f"guard state: inner: {exc}") from None
        self.inner = inner
        self.last_epoch = checked["last_epoch"]
        self.window = checked["window"]
        self.hold_left = checked["hold_left"]
        self.trip_count = checked["trip_count"]
        self._last_trip = checked["last_trip"]
        self.decided = None
        self._refresh()

    def check_state(self, state: Mapping[str, Any]) -> None:
        trips, trip = state["trip_count"], state["last_trip"]
        if trips == 0 and trip is not None:
            raise BadValue("last_trip must be null when trip_count is 0")
        if trips > 0 and trip is None:
            raise BadValue(f"last_trip must be an object when trip_count is {trips}")
        if trips == 0 and state["hold_left"] > 0:
            raise BadValue("hold_left must be 0 when trip_count is 0 (the guard never tripped)")
        if trip is not None and trip.step > state["last_epoch"]:
            raise BadValue(
                f"last_trip.step ({trip.step}) must not be past last_epoch ({state['last_epoch']})"
            )
