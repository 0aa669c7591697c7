"""``range_test``: an LR range test run live (Lightning's ``Tuner.lr_find``,
fastai's ``lr_find``), then a policy from the LR it suggests.

The sweep. The LR climbs from ``min_lr`` to ``max_lr`` over ``steps``
optimizer steps, by Lightning's ``_ExponentialLR`` / ``_LinearLR`` with
``num_iter = steps``: the LR for optimizer step ``t`` (0-based) is ``min_lr``
for ``t = 0`` and, for ``t >= 1``, with ``r = (t + 1) / steps``,

    exponential: min_lr * (max_lr / min_lr) ** r
    linear:      min_lr + r * (max_lr - min_lr)

so the last step of the sweep (``t = steps - 1``, for ``steps > 1``) runs
at ``max_lr``, and ``r = 1 / steps`` is never used (Lightning's schedulers
count from their first ``step()``). The sweep needs no metric: the training process computes
it from its step count alone. Every param group keeps its ratio to group 0's
base LR: group ``i`` runs at ``sweep_lr * base_lrs[i] / base_lrs[0]``.

The curve. Each step whose record carries ``metric`` (a finite number) adds a
point: the group-0 LR that step ran at, and the smoothed loss (Lightning's
``_LRCallback``, ``beta = smoothing``)::

    avg = beta * avg + (1 - beta) * loss      # avg starts at 0
    smoothed = avg / (1 - beta ** (n + 1))    # n: the points so far, this one included

That is Lightning's bias correction in an ``lr_find`` from step 0, where it
divides by ``1 - beta ** (global_step + 1)`` and ``global_step`` is already
one past the batch: one more than the textbook ``1 - beta ** n``. So the
first smoothed loss is about half the loss (``beta = 0.98``: 0.505 x) and
the smoothed curve rises towards the losses over the first tens of points.
lrpilot keeps it, on purpose: that rise keeps the ``steepest`` rule (a
gradient against the LR, not its log) off the low end of an exponential
sweep, where the LRs are closest together and the textbook correction's
noisy first averages, divided by those tiny spacings, often give the
steepest "fall"; and it keeps the curve, the stop and the suggestion
Lightning's own on the same losses.

The end. The sweep ends at the step whose smoothed loss exceeds ``diverge``
times the best (lowest) smoothed loss before it (from the second point on;
the first point is the first best), or whose loss is not a finite number, or
at the first step that carries the metric once ``steps`` steps have run. That
end is a metric-driven decision (``decided``): the daemon sends the whole
state, curve included, and the training process loads it.

The suggestion, from the curve (all of it, the point that diverged included):

- ``steepest`` (Lightning's ``suggestion(skip_begin, skip_end)``): drop the
  first ``skip_begin`` and the last ``skip_end`` points, take the gradient of
  the smoothed loss against the LR (``numpy.gradient`` / ``torch.gradient``
  with the LRs as coordinates: central differences inside, one-sided at the
  ends) and suggest the LR where it is lowest (the first such point);
- ``minimum`` (fastai's classic rule): the LR of the lowest smoothed loss,
  divided by 10.

``steepest`` with fewer than 2 points left falls back to ``minimum``; with
no point at all there is no suggestion.

After. ``then`` starts from the suggestion (group ``i`` at ``suggestion *
base_lrs[i] / base_lrs[0]``) at its own step 0, at the step the sweep ended;
without ``then`` the LRs hold at the suggestion. With ``suggest_only`` the
suggestion is only journalled: ``then`` starts from the base LRs the sweep
started from, or from ``then_base_lrs`` and loads ``then_state`` (a policy
resumed exactly where an operator's range test interrupted it). With no
suggestion, ``then`` starts from the base LRs. A suggestion from which
``then`` cannot be built (its LRs would leave the float range) is journalled
and ``then`` starts from the base LRs.

While the sweep runs, ``sweeping`` is True (unless ``restore`` is false): the
hook keeps a copy of the parameters and the optimizer's state and puts it
back when the sweep ends, so the sweep's updates are not kept. A training
process that runs the policy without metrics cannot end the sweep: past
``steps`` steps it holds ``min_lr`` (at the groups' ratios) and stays
``sweeping`` until the daemon's command arrives.

Where lrpilot differs from Lightning 2.6:

- the smoothing's step count: lrpilot counts the sweep's points, Lightning
  the fit's ``global_step`` (which also sets its first best, at step 1),
  so an ``lr_find`` that Lightning runs mid-fit (``LearningRateFinder`` at
  a later epoch) smooths and stops differently. lrpilot's is always that of
  an ``lr_find`` from step 0;
- a loss that is not a finite number ends the sweep (it is no point of the
  curve); Lightning's smoothed loss turns NaN and no comparison stops it;
- a step whose record lacks the metric is no point, but its step counts for
  the LR (Lightning records a NaN point for a batch without a loss);
- ``skip_end = 0`` drops no point (Lightning's ``[skip_begin:-0]`` is empty:
  no suggestion); too few points fall back to ``minimum`` rather than giving
  no suggestion;
- the gradient is in float64 (Lightning's is float32), so in a near tie the
  two may pick neighbouring points;
- param groups keep their ratios (Lightning sets every group to ``min_lr``
  and sweeps them alike);
- the sweep runs inside the real fit, with the data the fit reads next;
  Lightning runs a separate fit and restores a checkpoint.

    spec = RangeTestSpec(steps=200, then={"kind": "cosine", "T_max": 10_000})
    policy = spec.build([0.1])
    policy.step({"loss": 2.3})   # -> [1.0e-08 * (1e8) ** (2 / 200)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from .base import (
    NO_METRICS,
    BadValue,
    Decision,
    Gauge,
    NonNegativeInt,
    Policy,
    PolicySpec,
    PositiveFloat,
    ScheduleExhausted,
    SpecError,
    StateCheck,
    Trip,
    all_finite,
    an_object,
    as_number,
    check_base_lrs,
    count,
    fields,
    optional,
    shown,
)
from .guard import GuardSpec
from .sequential import STAGE_SPECS, SequentialSpec

# The curve is kept in the state (and so in the command that ends the sweep,
# and in the journal): two floats a step, bounded. While the sweep runs, the
# run's row (with its state) is written at every store tick: ~0.4 MB of JSON
# at 10,000 points, ten times a second. Lightning's default is 100.
MAX_SWEEP_STEPS = 10_000

# What may follow the sweep: the kinds a sequential stage may be, a
# sequential, and a guard around either (sweep, then a guarded schedule);
# never range_test itself.
THEN_SPECS: tuple[type[PolicySpec], ...] = (*STAGE_SPECS, SequentialSpec, GuardSpec)
if TYPE_CHECKING:  # mypy cannot read a Union built from a tuple at runtime
    ThenSpec = PolicySpec
else:
    ThenSpec = Annotated[Union[THEN_SPECS], Field(discriminator="kind")]  # noqa: UP007


class RangeTestSpec(PolicySpec):
    kind: Literal["range_test"] = "range_test"
    min_lr: PositiveFloat = 1e-8
    max_lr: PositiveFloat = 1.0
    steps: Annotated[int, Field(ge=1, le=MAX_SWEEP_STEPS)] = 100
    mode: Literal["exponential", "linear"] = "exponential"
    metric: str = Field("loss", min_length=1)
    smoothing: float = Field(0.98, ge=0, lt=1)
    diverge: Annotated[float, Field(gt=1)] | None = 4.0
    suggest: Literal["steepest", "minimum"] = "steepest"
    skip_begin: NonNegativeInt = 10
    skip_end: NonNegativeInt = 1
    restore: bool = True
    suggest_only: bool = False
    then: ThenSpec | None = None
    then_base_lrs: Annotated[list[PositiveFloat], Field(min_length=1)] | None = None
    then_state: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _fits(self) -> RangeTestSpec:
        if self.max_lr <= self.min_lr:
            raise ValueError(f"max_lr ({self.max_lr}) must be above min_lr ({self.min_lr})")
        if not math.isfinite(self.max_lr / self.min_lr):
            raise ValueError(
                f"max_lr / min_lr ({self.max_lr} / {self.min_lr}) must be a finite number"
            )
        if not self.suggest_only:
            for name in ("then_base_lrs", "then_state"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} is only for suggest_only (then resumes where it stood); "
                        "without it then starts from the suggestion"
                    )
        if self.then_state is not None and self.then is None:
            raise ValueError("then_state needs then: the policy whose state it is")
        return self

    def build(self, base_lrs: Sequence[float]) -> RangeTestPolicy:
        return RangeTestPolicy(self, base_lrs)

    def reduced_metrics(self) -> dict[str, str]:
        reduced = {self.metric: "mean"}
        if self.then is not None:
            for name, how in self.then.reduced_metrics().items():
                reduced.setdefault(name, how)
        return reduced


# --- the suggestion --------------------------------------------------------


def gradient(ys: Sequence[float], xs: Sequence[float]) -> list[float]:
    """``numpy.gradient(ys, xs)`` (edge_order 1), as ``torch.gradient`` with
    ``spacing=[xs]``: second-order central differences for uneven spacing
    inside, one-sided at both ends. A zero spacing gives NaN there (numpy
    divides by zero); at least 2 points."""

    def div(a: float, b: float) -> float:
        return a / b if b else math.nan

    n = len(ys)
    out = [div(ys[1] - ys[0], xs[1] - xs[0])]
    for i in range(1, n - 1):
        dx1, dx2 = xs[i] - xs[i - 1], xs[i + 1] - xs[i]
        a = div(-dx2, dx1 * (dx1 + dx2))
        b = div(dx2 - dx1, dx1 * dx2)
        c = div(dx1, dx2 * (dx1 + dx2))
        out.append(a * ys[i - 1] + b * ys[i] + c * ys[i + 1])
    out.append(div(ys[-1] - ys[-2], xs[-1] - xs[-2]))
    return out


def argmin(values: Sequence[float]) -> int | None:
    """The first index of the lowest value, NaN never lowest; None if all NaN."""
    best: int | None = None
    for i, value in enumerate(values):
        if not math.isnan(value) and (best is None or value < values[best]):
            best = i
    return best


def suggestion(
    spec: RangeTestSpec, lrs: Sequence[float], losses: Sequence[float]
) -> tuple[float | None, str]:
    """The suggested LR from a curve (finite points), and the rule that gave it."""
    if not lrs:
        return None, "no point"
    fallback = ""
    if spec.suggest == "steepest":
        end = max(len(losses) - spec.skip_end, 0)
        xs, ys = lrs[spec.skip_begin : end], losses[spec.skip_begin : end]
        if len(ys) < 2:
            fallback = (
                f" ({len(ys)} point(s) left after skip_begin and skip_end, too few for steepest)"
            )
        else:
            at = argmin(gradient(ys, xs))
            if at is not None:
                return xs[at], "the steepest fall of the smoothed loss"
            fallback = " (no gradient: the points left share one LR)"
    at = argmin(losses)
    assert at is not None  # the curve's losses are finite
    return lrs[at] / 10, f"the lowest smoothed loss / 10{fallback}"


# --- state checks -----------------------------------------------------------


def phase_name(policy: Policy, value: Any) -> str:
    if value not in ("sweep", "done"):
        raise BadValue(f"must be 'sweep' or 'done', got {shown(value)}")
    return str(value)


def finite_number(low: float | None = None) -> StateCheck:
    """A finite number (``> low`` unless None)."""
    rule = "a finite number" if low is None else f"a finite number > {low:g}"

    def check(policy: Policy, value: Any) -> float:
        number = as_number(value)
        if number is None or not math.isfinite(number) or (low is not None and number <= low):
            raise BadValue(f"must be {rule}, got {shown(value)}")
        return number

    return check


def curve_of(low: float | None) -> StateCheck:
    """A list of at most ``steps`` finite numbers (``> low`` unless None)."""
    rule = "a finite number" if low is None else f"a finite number > {low:g}"

    def check(policy: Policy, value: Any) -> list[float]:
        top = policy.spec.steps  # type: ignore[attr-defined]
        if not isinstance(value, list) or len(value) > top:
            raise BadValue(f"must be a list of at most {top} numbers (steps), got {shown(value)}")
        numbers = []
        for i, item in enumerate(value):
            number = as_number(item)
            if number is None or not math.isfinite(number) or (low is not None and number <= low):
                raise BadValue(f"must be {rule}, got {shown(item)}", at=f"[{i}]")
            numbers.append(number)
        return numbers

    return check


def a_bool(policy: Policy, value: Any) -> bool:
    if type(value) is not bool:
        raise BadValue(f"must be true or false, got {shown(value)}")
    return value


class RangeTestPolicy(Policy):
    GAUGES = (
        Gauge("range_test_sweeping", "gauge", "1 while the range test sweeps the LR, else 0"),
        Gauge("range_test_lr", "gauge", "the sweep's LR (param group 0), while it sweeps"),
        Gauge("range_test_smoothed_loss", "gauge", "the sweep's last smoothed loss"),
        Gauge("range_test_suggested_lr", "gauge", "the LR the range test suggested"),
    )

    spec: RangeTestSpec
    STATE = fields(
        phase=phase_name,
        # Steps the sweep has run (it stops counting when the sweep ends).
        sweep_step=count(),
        avg_loss=finite_number(),
        best_loss=optional(finite_number()),
        curve_lrs=curve_of(low=0.0),
        curve_losses=curve_of(low=None),
        suggested_lr=optional(finite_number(low=0.0)),
        stopped_early=a_bool,
        then=optional(an_object),  # then's own policy checks it, in load_state_dict
    )

    def __init__(self, spec: RangeTestSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.base_lrs = check_base_lrs(base_lrs)
        first = self.base_lrs[0]
        self.ratios = [1.0] + [lr / first for lr in self.base_lrs[1:]]
        # Every LR the sweep or the suggestion can give (min_lr / 10 to
        # max_lr, with room for rounding) must be a positive finite number in
        # every group.
        lows = [spec.min_lr / 10 * ratio for ratio in self.ratios]
        highs = [spec.max_lr * 2 * ratio for ratio in self.ratios]
        if not (all_finite(highs) and min(lows) > 0):
            raise SpecError(
                f"range_test: min_lr / 10 to max_lr, at the param groups' ratios to "
                f"base_lrs[0] ({shown(self.ratios)}), gives LRs that are not positive "
                "finite numbers"
            )
        if spec.then_base_lrs is not None and len(spec.then_base_lrs) != len(self.base_lrs):
            raise SpecError(
                f"range_test.then_base_lrs: expected {len(self.base_lrs)} value(s), one per "
                f"param group, got {len(spec.then_base_lrs)}"
            )
        # Build then now, from the LRs it starts from without a suggestion:
        # a then that does not fit the group count (or a then_state it does
        # not take) is refused up front, as sequential builds every stage.
        self.then_at(None)
        self.phase = "sweep"
        self.sweep_step = 0
        self.avg_loss = 0.0
        self.best_loss: float | None = None
        self.curve_lrs: list[float] = []
        self.curve_losses: list[float] = []
        self.suggested_lr: float | None = None
        self.stopped_early = False
        self.then: Policy | None = None
        self.held = self.sweep_lrs(0)  # the LRs while sweeping; without then, after it
        self._decision: Decision | None = None

    # --- what the policy is now ----------------------------------------------

    @property
    def lrs(self) -> list[float]:  # type: ignore[override]
        return self.then.lrs if self.then is not None else self.held

    @property
    def momenta(self) -> list[float] | None:  # type: ignore[override]
        return self.then.momenta if self.then is not None else None

    @property
    def decided(self) -> Decision | None:  # type: ignore[override]
        if self._decision is not None:
            return self._decision
        return self.then.decided if self.then is not None else None

    @property
    def sweeping(self) -> bool:
        return self.phase == "sweep" and self.spec.restore

    @property
    def trips(self) -> int:
        return self.then.trips if self.then is not None else 0

    @property
    def last_trip(self) -> Trip | None:
        return self.then.last_trip if self.then is not None else None

    def curve(self) -> list[tuple[float, float]]:
        """The sweep's points, (group-0 LR, smoothed loss), while the state
        keeps them: until the first step after the sweep ended."""
        return list(zip(self.curve_lrs, self.curve_losses))

    def gauges(self) -> dict[str, float]:
        if self.phase == "sweep":
            values = {"range_test_sweeping": 1.0, "range_test_lr": self.held[0]}
            if self.curve_losses:
                values["range_test_smoothed_loss"] = self.curve_losses[-1]
            return values
        values = {"range_test_sweeping": 0.0}
        if self.suggested_lr is not None:
            values["range_test_suggested_lr"] = self.suggested_lr
        if self.then is not None:
            values.update(self.then.gauges())
        return values

    # --- the sweep -------------------------------------------------------------

    def sweep_lr(self, t: int) -> float:
        """Group 0's LR for the sweep's optimizer step ``t`` (0-based);
        ``min_lr`` from ``steps`` on, until the sweep's end is decided."""
        spec = self.spec
        if t == 0 or t >= spec.steps:
            return spec.min_lr
        r = (t + 1) / spec.steps
        if spec.mode == "linear":
            return spec.min_lr + r * (spec.max_lr - spec.min_lr)
        return spec.min_lr * (spec.max_lr / spec.min_lr) ** r

    def sweep_lrs(self, t: int) -> list[float]:
        lr = self.sweep_lr(t)
        return [lr * ratio for ratio in self.ratios]

    def step(self, metrics: Mapping[str, float] = NO_METRICS) -> list[float]:
        # The curve grows in place (a copy a step would make the sweep
        # quadratic): a step that Policy.step refuses must not keep its point.
        points = len(self.curve_lrs)
        try:
            return super().step(metrics)
        except ScheduleExhausted:
            del self.curve_lrs[points:], self.curve_losses[points:]
            raise

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self._decision = None
        if self.phase == "done":
            if self.curve_lrs:  # the command that ended the sweep carried it
                self.curve_lrs, self.curve_losses = [], []
            if self.then is not None:
                self.then.step(metrics)
            return
        t = self.sweep_step
        self.sweep_step = t + 1
        if self.spec.metric not in metrics:
            self.held = self.sweep_lrs(self.sweep_step)
            return
        if t >= self.spec.steps:  # past the sweep: the first record with the metric ends it
            self.finish(early="")
            return
        value = as_number(metrics[self.spec.metric])
        if value is None or not math.isfinite(value):
            self.finish(
                early=f"ended early: {self.spec.metric} was {shown(metrics[self.spec.metric])}"
            )
            return
        beta, n = self.spec.smoothing, len(self.curve_losses) + 1
        avg = beta * self.avg_loss + (1 - beta) * value
        smoothed = avg / (1 - beta ** (n + 1))  # Lightning's exponent: see the docstring
        if not math.isfinite(smoothed):
            self.finish(early=f"ended early: the smoothed {self.spec.metric} left the float range")
            return
        self.avg_loss = avg
        self.curve_lrs.append(self.held[0])  # the LR this step ran at
        self.curve_losses.append(smoothed)
        best, diverge = self.best_loss, self.spec.diverge
        diverged = best is not None and diverge is not None and smoothed > diverge * best
        if best is None or smoothed < best:
            self.best_loss = smoothed
        if diverged:
            self.finish(
                early=f"ended early: smoothed {self.spec.metric} {smoothed:.6g} above "
                f"{diverge:g} x the best {best:.6g}"
            )
        elif self.sweep_step >= self.spec.steps:
            self.finish(early="")
        else:
            self.held = self.sweep_lrs(self.sweep_step)

    def finish(self, early: str) -> None:
        """End the sweep: the suggestion, then ``then``, and the decision."""
        spec = self.spec
        suggested, rule = suggestion(spec, self.curve_lrs, self.curve_losses)
        self.then, self.held, fell_back = self.then_at(suggested)
        self.phase, self.suggested_lr, self.stopped_early = "done", suggested, bool(early)
        steps = f"{self.sweep_step} step(s), {len(self.curve_lrs)} point(s)"
        if suggested is None:
            reason = f"range_test: no suggestion (no finite {spec.metric} in {steps})"
        else:
            reason = f"range_test: suggested lr {suggested:.6g} by {rule} after {steps}"
        if early:
            reason += f" ({early})"
        after = "then" if spec.then is not None else "the LRs"
        if spec.suggest_only:
            resumed = "then_base_lrs" if spec.then_base_lrs is not None else "the base LRs"
            reason += f"; suggest_only: {after} from {resumed}"
        elif suggested is None or fell_back:
            reason += f"; {after} from the base LRs"
            if fell_back:
                reason += " (then cannot start from the suggestion)"
        self._decision = Decision("range_test", reason)

    def then_at(self, suggested: float | None) -> tuple[Policy | None, list[float], bool]:
        """``then`` (None without one), built for a sweep that suggested
        ``suggested``; the LRs it starts from; whether it could not start from
        the suggestion and starts from the base LRs instead."""
        spec = self.spec
        if spec.suggest_only:
            base = list(spec.then_base_lrs or self.base_lrs)
        elif suggested is None:
            base = list(self.base_lrs)
        else:
            base = [suggested * ratio for ratio in self.ratios]
        fell_back = False
        if not (all_finite(base) and min(base) > 0):
            base, fell_back = list(self.base_lrs), True
        if spec.then is None:
            return None, base, fell_back
        try:
            then = spec.then.build(base)
        except SpecError as exc:
            if base == self.base_lrs or spec.suggest_only:
                raise SpecError(f"range_test: then: {exc}") from None
            base, fell_back = list(self.base_lrs), True
            then = spec.then.build(base)  # built from these when the policy was
        if spec.suggest_only and spec.then_state is not None:
            try:
                then.load_state_dict(spec.then_state)
            except SpecError as exc:
                raise SpecError(f"range_test.then_state: {exc}") from None
        return then, base, fell_back

    def observe(self, metrics: Mapping[str, float]) -> list[float]:
        # The sweep works on the steps' values; a report acts only on then.
        self._decision = None
        if self.then is not None:
            return self.then.observe(metrics)
        return list(self.lrs)

    # --- state -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "sweep_step": self.sweep_step,
            "avg_loss": self.avg_loss,
            "best_loss": self.best_loss,
            "curve_lrs": list(self.curve_lrs),
            "curve_losses": list(self.curve_losses),
            "suggested_lr": self.suggested_lr,
            "stopped_early": self.stopped_early,
            "then": None if self.then is None else self.then.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        checked = self.checked_state(state)
        then, held = None, self.sweep_lrs(checked["sweep_step"])
        if checked["phase"] == "done":
            then, held, _ = self.then_at(checked["suggested_lr"])
            if then is not None:
                try:
                    then.load_state_dict(checked["then"])
                except SpecError as exc:
                    raise SpecError(f"range_test state: then: {exc}") from None
        for name, value in checked.items():
            setattr(self, name, value)
        self.then, self.held, self._decision = then, held, None

    def check_state(self, state: Mapping[str, Any]) -> None:
        points, steps = len(state["curve_lrs"]), self.spec.steps
        if len(state["curve_losses"]) != points:
            raise BadValue(
                f"curve_lrs and curve_losses must be as long, got {points} and "
                f"{len(state['curve_losses'])}"
            )
        if state["phase"] == "sweep":
            # A point is added by a step of the sweep, and the step that adds
            # the last one (the steps-th) ends it.
            most = min(state["sweep_step"], steps - 1)
            for name in ("then", "suggested_lr"):
                if state[name] is not None:
                    raise BadValue(f"{name} must be null while the sweep runs")
            if state["stopped_early"]:
                raise BadValue("stopped_early must be false while the sweep runs")
            if (state["best_loss"] is None) != (points == 0):
                raise BadValue("best_loss must be null before the first point, and only then")
        else:
            most = min(state["sweep_step"], steps)
            if state["sweep_step"] == 0:
                raise BadValue("sweep_step must be at least 1 once the sweep is done")
            if (state["then"] is None) != (self.spec.then is None):
                has = "an object (then's state)" if self.spec.then is not None else "null (no then)"
                raise BadValue(f"then must be {has} once the sweep is done")
        if points > most:
            raise BadValue(
                f"the curve must have at most {most} point(s) at sweep_step "
                f"{state['sweep_step']} in phase {state['phase']}, got {points}"
            )
