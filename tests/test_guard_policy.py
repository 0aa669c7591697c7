"""The ``guard`` policy: a trip on a non-finite or spiking metric cuts the
inner policy's LRs for ``hold`` steps, then the inner has them again where it
stands; a trip is a decision whose state a client without metrics replays to
the same LRs; its state is checked like every kind's."""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrpilot.policies import (
    KINDS,
    NO_METRICS,
    GuardPolicy,
    GuardSpec,
    Policy,
    ScheduleExhausted,
    SpecError,
    Trip,
    parse_policy,
)

COSINE = {"kind": "cosine", "T_max": 60, "eta_min": 0.001}


def guard(inner: dict[str, Any] | None = None, base_lrs=(0.1,), **fields: Any) -> GuardPolicy:
    spec = {"kind": "guard", "inner": inner or COSINE, **fields}
    policy = parse_policy(spec).build(list(base_lrs))
    assert isinstance(policy, GuardPolicy)
    return policy


def bare(inner: dict[str, Any], base_lrs=(0.1,)) -> Policy:
    return parse_policy(inner).build(list(base_lrs))


def saved(policy: Policy) -> dict[str, Any]:
    return json.loads(json.dumps(policy.state_dict()))


def own_state_json(policy: Policy) -> str:
    """The guard's own fields as strict JSON (the inner's state may hold
    plateau's starting infinity, which the protocol carries)."""
    state = {k: v for k, v in policy.state_dict().items() if k != "inner"}
    return json.dumps(state, allow_nan=False)


def steady(n: int, level: float = 1.0, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, 0.02 * level) for _ in range(n)]


def test_guard_is_a_kind():
    assert "guard" in KINDS
    assert isinstance(parse_policy({"kind": "guard", "inner": COSINE}), GuardSpec)


def test_defaults():
    spec = parse_policy({"kind": "guard", "inner": COSINE})
    assert isinstance(spec, GuardSpec)
    assert (spec.metric, spec.spike, spec.factor, spec.zscore) == ("loss", "ratio", 10.0, 4.0)
    assert (spec.window, spec.min_points, spec.nan, spec.cut, spec.hold) == (50, 10, True, 0.1, 100)


# --- trips --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_value_that_is_not_finite_trips_and_cuts(value):
    policy, reference = guard(hold=5), bare(COSINE)
    for loss in steady(3):
        policy.step({"loss": loss})
        reference.step()
    assert policy.decided is None and policy.trips == 0 and policy.last_trip is None
    lrs = policy.step({"loss": value})
    reference.step()
    assert lrs == [reference.lrs[0] * 0.1] == policy.lrs
    assert policy.decided is not None and policy.decided.cause == "guard:nan"
    assert policy.decided.reason == f"guard:nan: loss is {value} at step 4; LRs x0.1 for 5 steps"
    assert "\n" not in policy.decided.reason
    assert policy.trips == 1 and policy.last_trip == Trip(4, "guard:nan", "loss", None)
    assert policy.window == steady(3)  # the value did not enter the window
    policy.step({"loss": 1.0})
    assert policy.decided is None  # reset at every step


def test_nan_false_ignores_values_that_are_not_finite():
    policy, reference = guard(nan=False), bare(COSINE)
    for value in (1.0, math.nan, math.inf, 1.0):
        assert policy.step({"loss": value}) == reference.step()
        assert policy.decided is None
    assert policy.trips == 0 and policy.window == [1.0, 1.0]


def test_a_spike_by_ratio_trips_only_once_the_window_is_full_enough():
    policy = guard(window=20, min_points=5, factor=3.0)
    for _ in range(4):
        policy.step({"loss": 1.0})
    policy.step({"loss": 100.0})  # 4 values: no check yet
    assert policy.trips == 0 and len(policy.window) == 5
    policy = guard(window=20, min_points=5, factor=3.0)
    for _ in range(5):
        policy.step({"loss": 1.0})
    policy.step({"loss": 2.99})
    assert policy.trips == 0
    policy.step({"loss": 4.5})  # the mean is 1.33 now: 2.99 went in
    assert policy.trips == 1 and policy.decided is not None
    assert policy.decided.cause == "guard:spike"
    assert policy.decided.reason.startswith("guard:spike: loss 4.5 at step 7 is 3.38x")
    assert "x its mean 1.33" in policy.decided.reason
    assert policy.decided.reason.endswith("(factor 3); LRs x0.1 for 100 steps")
    assert policy.last_trip == Trip(7, "guard:spike", "loss", 4.5)
    assert 4.5 not in policy.window


def test_ratio_never_trips_while_the_mean_is_not_positive():
    policy = guard(min_points=2)
    for value in (-1.0, -1.2, -0.9, 0.0, 0.5, 0.0):
        policy.step({"loss": value})
    assert policy.trips == 0


def test_a_spike_by_zscore_trips():
    policy = guard(spike="zscore", zscore=4.0, window=30, min_points=10)
    rng = random.Random(1)
    for _ in range(30):
        policy.step({"loss": 2.0 + rng.gauss(0.0, 0.1)})
    assert policy.trips == 0
    policy.step({"loss": 2.0 + 10 * 0.1})
    assert policy.decided is not None and policy.decided.cause == "guard:spike"
    assert " std above its mean " in policy.decided.reason
    assert "(zscore 4)" in policy.decided.reason


def test_zscore_does_not_trip_while_the_window_does_not_vary():
    policy = guard(spike="zscore", min_points=3)
    for _ in range(5):
        policy.step({"loss": 1.0})
    policy.step({"loss": 50.0})
    assert policy.trips == 0


def test_spike_off_trips_only_on_values_that_are_not_finite():
    policy = guard(spike="off", min_points=2)
    for value in (1.0, 1.0, 1000.0):
        policy.step({"loss": value})
    assert policy.trips == 0
    policy.step({"loss": math.nan})
    assert policy.trips == 1


@pytest.mark.parametrize("spike", ["ratio", "zscore"])
def test_a_normal_noisy_loss_does_not_trip(spike):
    """A decaying training loss with realistic minibatch noise, 3000 steps."""
    policy = guard(spike=spike)
    rng = random.Random(7)
    for t in range(3000):
        loss = 0.5 + 2.0 * math.exp(-t / 400) + rng.gauss(0.0, 0.05)
        policy.step({"loss": loss})
        assert policy.decided is None, (t, policy.decided)
    assert policy.trips == 0


def test_a_metric_the_record_does_not_carry_changes_nothing():
    policy, reference = guard(metric="grad_norm"), bare(COSINE)
    for _ in range(20):
        assert policy.step({"loss": math.nan}) == reference.step()
    assert policy.trips == 0 and policy.window == []


# --- the hold and the hand-back -------------------------------------------------------


def test_the_hold_lasts_exactly_hold_steps_and_hands_back_where_the_inner_stands():
    hold = 7
    policy, reference = guard(COSINE, base_lrs=(0.1, 0.02), hold=hold), bare(COSINE, (0.1, 0.02))
    for _ in range(10):
        assert policy.step({"loss": 1.0}) == reference.step()
    policy.step({"loss": math.nan})
    reference.step()
    cut = [policy.lrs]
    for _ in range(hold - 1):
        assert policy.hold_left > 0
        policy.step({"loss": 1.0})
        reference.step()
        cut.append(policy.lrs)
        assert policy.lrs == [lr * 0.1 for lr in reference.lrs]
    assert len(cut) == hold
    policy.step({"loss": 1.0})
    reference.step()
    assert policy.hold_left == 0 and policy.lrs == reference.lrs  # the bare cosine's, exactly
    for _ in range(30):
        assert policy.step({"loss": 1.0}) == reference.step()


def test_a_trip_during_the_hold_restarts_it():
    policy = guard(hold=5)
    policy.step({"loss": math.nan})
    for _ in range(3):
        policy.step(NO_METRICS)
    assert policy.hold_left == 2
    policy.step({"loss": math.inf})
    assert policy.hold_left == 5 and policy.trips == 2
    assert policy.decided is not None
    for _ in range(4):
        policy.step(NO_METRICS)
        assert policy.hold_left > 0
    policy.step(NO_METRICS)
    assert policy.hold_left == 0


def test_lrs_are_never_mutated_in_place():
    policy = guard(hold=2)
    before = policy.lrs
    copy_before = list(before)
    policy.step({"loss": math.nan})
    assert before == copy_before and policy.lrs is not before
    held, held_copy = policy.lrs, list(policy.lrs)
    policy.step(NO_METRICS)
    policy.step(NO_METRICS)
    assert held == held_copy and policy.hold_left == 0


def test_momenta_and_gauges_come_from_the_inner_too():
    cyclic = {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 3}
    policy, reference = guard(cyclic, hold=3), bare(cyclic)
    for value in (1.0, math.nan, 1.0, 1.0):
        policy.step({"loss": value})
        reference.step()
        assert policy.momenta == reference.momenta
    gauges = policy.gauges()
    assert gauges["guard_trips"] == 1 and gauges["guard_holding"] == 1
    assert gauges["guard_window_mean"] == 1.0
    assert {k: v for k, v in gauges.items() if not k.startswith("guard_")} == reference.gauges()
    declared = {g.name for g in GuardPolicy.GAUGES} | {g.name for g in type(reference).GAUGES}
    assert set(gauges) <= declared
    assert "guard_window_mean" not in guard().gauges()  # an empty window has no mean


# --- the inner policy's decisions, and reports -----------------------------------------------

PLATEAU = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}


def test_the_inner_policys_decisions_pass_through():
    policy = guard(PLATEAU, hold=10)
    policy.step({"loss": 1.0, "val_loss": 1.0})
    assert policy.decided is None
    policy.step({"loss": 1.0, "val_loss": 2.0})  # no improvement, patience 0: a cut
    assert policy.decided is not None and policy.decided.cause == "plateau"
    assert policy.lrs == [0.05]
    # the guard trips on the same step as a plateau cut: the guard's decision
    policy.step({"loss": math.nan, "val_loss": 3.0})
    assert policy.decided is not None and policy.decided.cause == "guard:nan"
    assert policy.lrs == [0.025 * 0.1]
    # a plateau cut while holding: the plateau's decision, still cut
    policy.step({"loss": 1.0, "val_loss": 4.0})
    assert policy.decided is not None and policy.decided.cause == "plateau"
    assert policy.lrs == [0.0125 * 0.1]


def test_a_report_trips_too_but_does_not_count_a_step():
    policy = guard(PLATEAU, metric="val_loss", hold=3)
    policy.step({"loss": 1.0})
    policy.observe({"val_loss": 1.0})
    assert (policy.last_epoch, policy.window, policy.inner.best) == (1, [1.0], 1.0)
    lrs = policy.observe({"val_loss": math.nan})
    assert policy.decided is not None and policy.decided.cause == "guard:nan"
    # the plateau saw the NaN too (a bad record: patience 0 halves), then the cut
    assert lrs == [pytest.approx(0.1 * 0.5 * 0.1)] and policy.hold_left == 3
    assert policy.last_trip == Trip(1, "guard:nan", "val_loss", None)
    policy.observe({"other": 1.0})  # no clock, no countdown
    assert policy.hold_left == 3 and policy.last_epoch == 1 and policy.decided is None
    for left in (2, 1, 0):
        policy.step(NO_METRICS)
        assert policy.hold_left == left


def test_reduced_metrics_max_for_the_guard_the_inners_rule_where_both_watch():
    assert parse_policy({"kind": "guard", "inner": COSINE}).reduced_metrics() == {"loss": "max"}
    spec = parse_policy({"kind": "guard", "inner": PLATEAU})
    assert spec.reduced_metrics() == {"loss": "max", "val_loss": "mean"}
    same = {**PLATEAU, "metric": "loss", "reduce": "min"}
    assert parse_policy({"kind": "guard", "inner": same}).reduced_metrics() == {"loss": "min"}


def test_an_inner_schedule_that_runs_out_raises_and_leaves_the_guard_as_it_was():
    onecycle = {"kind": "onecycle", "max_lr": 0.1, "total_steps": 5}
    policy = guard(onecycle, hold=10)
    policy.step({"loss": 1.0})
    policy.step({"loss": math.nan})
    for _ in range(3):
        policy.step({"loss": 1.0})
    before, lrs = saved(policy), policy.lrs
    with pytest.raises(ScheduleExhausted):
        policy.step({"loss": math.nan})
    assert saved(policy) == before and policy.lrs == lrs and policy.decided is None


# --- the client replays a trip without metrics ----------------------------------------------

SEQUENTIAL = {
    "kind": "sequential",
    "policies": [
        {"kind": "linear", "start_factor": 0.1, "total_iters": 10},
        {"kind": "plateau", "metric": "val_loss", "patience": 3, "factor": 0.5},
    ],
    "milestones": [10],
}


@pytest.mark.parametrize("lead", [0, 1, 3])
def test_a_client_without_metrics_replays_the_daemons_lrs(lead):
    """As the hook does: the daemon copy sees every record; at a decision its
    state (as of record s) goes to the client, which loads it at step s + lead
    and fast-forwards with step(NO_METRICS); from there they agree."""
    spec = {
        "kind": "guard",
        "inner": SEQUENTIAL,
        "hold": 6,
        "window": 20,
        "min_points": 5,
        "factor": 3.0,
    }
    daemon = parse_policy(spec).build([0.1, 0.05])
    client = parse_policy(spec).build([0.1, 0.05])
    rng = random.Random(3)
    pending: list[tuple[int, dict[str, Any]]] = []
    decisions = 0
    for s in range(1, 200):
        loss = 1.0 + rng.gauss(0.0, 0.02)
        if s in (40, 43, 120):
            loss = math.nan
        elif s in (80, 150):
            loss = 10.0
        metrics = {"loss": loss}
        if s % 5 == 0:
            metrics["val_loss"] = 2.0 + 0.01 * (s % 7)
        daemon.step(metrics)
        client.step(NO_METRICS)
        for state_step, state in [p for p in pending if p[0] + lead == s]:
            client.load_state_dict(state)
            for _ in range(s - state_step):
                client.step(NO_METRICS)
        pending = [p for p in pending if p[0] + lead > s]
        if daemon.decided is not None:
            decisions += 1
            pending.append((s, saved(daemon)))
            if lead == 0:  # applied at once: the state's own step
                client.load_state_dict(saved(daemon))
                pending.pop()
        if not pending:
            assert client.lrs == daemon.lrs, s
            assert client.hold_left == daemon.hold_left, s
    assert daemon.trips == 5 and client.trips == 5
    assert decisions > 5  # the plateau's cuts too


# --- state ------------------------------------------------------------------------


def run(policy: Policy, records: list[dict[str, float]]) -> list[Any]:
    out = []
    for record in records:
        out.append((policy.step(record), policy.decided))
    return out


def stream(n: int) -> list[dict[str, float]]:
    rng = random.Random(5)
    values = [1.0 + rng.gauss(0.0, 0.02) for _ in range(n)]
    for at, value in ((7, math.nan), (9, 8.0), (20, math.inf), (22, 50.0)):
        values[at] = value
    return [{"loss": v, "val_loss": 1.0 + (i % 4) * 0.01} for i, v in enumerate(values)]


@pytest.mark.parametrize("stop", [0, 3, 8, 10, 12, 21, 23, 40])
def test_state_round_trips_mid_hold(stop):
    spec = {"kind": "guard", "inner": SEQUENTIAL, "hold": 5, "window": 6, "min_points": 3}
    records = stream(60)
    whole = parse_policy(spec).build([0.1])
    expected = run(whole, records)
    first = parse_policy(spec).build([0.1])
    head = run(first, records[:stop])
    state = saved(first)
    second = parse_policy(spec).build([0.1])
    second.load_state_dict(state)
    assert saved(second) == state and second.lrs == first.lrs
    assert head + run(second, records[stop:]) == expected
    assert saved(second) == saved(whole)


GUARD_SPEC = {
    "kind": "guard",
    "inner": PLATEAU,
    "hold": 5,
    "window": 4,
    "min_points": 2,
    "factor": 3.0,
}


def tripped() -> GuardPolicy:
    policy = parse_policy(GUARD_SPEC).build([0.1, 0.02])
    assert isinstance(policy, GuardPolicy)
    for value in (1.0, 1.1, math.nan, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0, 1.0):
        policy.step({"loss": value, "val_loss": 1.0})
    assert policy.trips == 2 and policy.hold_left == 4
    return policy


def put(state: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    state = copy.deepcopy(state)
    *parents, last = path.split(".")
    target = state
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is DROP:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return state


DROP = object()
BAD_STATES = [
    ("last_epoch", -1, "last_epoch must be an integer from 0 to 2**53, got -1"),
    ("last_epoch", 5, "last_trip.step (9) must not be past last_epoch (5)"),
    ("window", [1.0] * 5, "window must be a list of at most 4 finite numbers"),
    ("window", "1.0", "window must be a list of at most 4 finite numbers, got '1.0'"),
    ("window.1", math.nan, "window[1] must be a finite number, got nan"),
    ("window.0", math.inf, "window[0] must be a finite number, got inf"),
    ("window.0", True, "window[0] must be a finite number, got True"),
    ("hold_left", 6, "hold_left must be an integer from 0 to 5, got 6"),
    ("hold_left", 1.0, "hold_left must be an integer from 0 to 5, got 1.0"),
    ("trip_count", 0, "last_trip must be null when trip_count is 0"),
    ("trip_count", -1, "trip_count must be an integer from 0 to 2**53, got -1"),
    ("last_trip", None, "last_trip must be an object when trip_count is 2"),
    ("last_trip", [1], "last_trip must be null or an object with step, cause, metric, value"),
    ("last_trip.extra", 1, "last_trip must be null or an object with step, cause, metric, value"),
    ("last_trip.step", DROP, "last_trip must be null or an object with step, cause, metric"),
    ("last_trip.step", "6", "last_trip.step must be an integer from 0 to 2**53, got '6'"),
    ("last_trip.cause", "plateau", "last_trip.cause must be 'guard:nan' or 'guard:spike'"),
    ("last_trip.metric", "val_loss", "last_trip.metric must be 'loss', the metric the guard"),
    (
        "last_trip.value",
        math.nan,
        "last_trip.value must be a finite number for cause 'guard:spike'",
    ),
    ("last_trip.value", None, "last_trip.value must be a finite number for cause 'guard:spike'"),
    ("last_trip.value", "9", "last_trip.value must be a finite number for cause 'guard:spike'"),
    ("inner", [1], "inner must be an object, got [1]"),
    ("inner.best", "x", "guard state: inner: plateau state: best must be a number (not NaN)"),
    ("inner.lrs", [0.1], "guard state: inner: plateau state: lrs must be a list of 2"),
    ("inner.extra", 1, "guard state: inner: plateau state: unknown field(s) 'extra'"),
    ("hold_left", DROP, "guard state: missing hold_left"),
    ("lrs", [0.1, 0.1], "guard state: unknown field(s) 'lrs'"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), BAD_STATES, ids=[m[:50] for _, _, m in BAD_STATES]
)
def test_a_bad_state_is_refused_in_one_line_and_changes_nothing(path, value, message):
    policy = tripped()
    before, lrs = saved(policy), policy.lrs
    with pytest.raises(SpecError) as refused:
        policy.load_state_dict(put(before, path, value))
    text = str(refused.value)
    assert message in text
    assert text.startswith("guard state: ") and "\n" not in text
    assert saved(policy) == before and policy.lrs == lrs


def test_a_nan_trip_has_a_null_value_and_nothing_else():
    policy = parse_policy(GUARD_SPEC).build([0.1, 0.02])
    policy.step({"loss": math.nan})
    state = saved(policy)
    assert state["last_trip"] == {"step": 1, "cause": "guard:nan", "metric": "loss", "value": None}
    with pytest.raises(SpecError, match=r"last_trip\.value must be null for cause 'guard:nan'"):
        policy.load_state_dict(put(state, "last_trip.value", 1.0))
    with pytest.raises(SpecError, match="hold_left must be 0 when trip_count is 0"):
        fresh = parse_policy(GUARD_SPEC).build([0.1, 0.02])
        fresh.load_state_dict(put(saved(fresh), "hold_left", 2))


def test_the_state_is_json_without_nan_or_infinity():
    policy = tripped()
    policy.step({"loss": -math.inf, "val_loss": math.inf})
    assert json.loads(own_state_json(policy))["last_trip"]["value"] is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "guard"}, "guard.inner: required field is missing"),
        ({"kind": "guard", "inner": {"kind": "guard", "inner": COSINE}}, "guard.inner: a guard"),
        (
            {
                "kind": "sequential",
                "policies": [{"kind": "guard", "inner": COSINE}],
                "milestones": [],
            },
            "sequential.policies.0: a guard cannot be inside another policy",
        ),
        ({"kind": "guard", "inner": {"kind": "cosine"}}, "guard.inner.cosine.T_max: required"),
        ({"kind": "guard", "inner": COSINE, "factor": 1}, "guard.factor: Input should be greater"),
        ({"kind": "guard", "inner": COSINE, "zscore": 0}, "guard.zscore: Input should be greater"),
        ({"kind": "guard", "inner": COSINE, "cut": 0}, "guard.cut: Input should be greater than 0"),
        ({"kind": "guard", "inner": COSINE, "cut": 1.5}, "guard.cut: Input should be less than or"),
        ({"kind": "guard", "inner": COSINE, "hold": 0}, "guard.hold: Input should be greater"),
        (
            {"kind": "guard", "inner": COSINE, "window": 10_001},
            "guard.window: Input should be less",
        ),
        (
            {"kind": "guard", "inner": COSINE, "window": 5},
            "min_points (10) must not be above window",
        ),
        (
            {"kind": "guard", "inner": COSINE, "spike": "max"},
            "guard.spike: Input should be 'ratio'",
        ),
        (
            {"kind": "guard", "inner": COSINE, "nan": 1},
            "guard.nan: Input should be a valid boolean",
        ),
        ({"kind": "guard", "inner": COSINE, "metric": ""}, "guard.metric"),
        (
            {"kind": "guard", "inner": COSINE, "hold": 2.0},
            "guard.hold: Input should be a valid int",
        ),
        ({"kind": "guard", "inner": COSINE, "holds": 2}, "guard.holds: unknown field"),
    ],
)
def test_a_bad_spec_is_one_line(spec, message):
    with pytest.raises(SpecError) as refused:
        parse_policy(spec)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_per_group_inner_list_must_fit_the_groups():
    inner = {"kind": "plateau", "min_lr": [0.0, 0.0]}
    with pytest.raises(SpecError, match=r"plateau\.min_lr: expected 3"):
        parse_policy({"kind": "guard", "inner": inner}).build([0.1] * 3)


# --- any state: refused in one line, or it steps to finite LRs ----------------------------

VALID_TRIP = st.fixed_dictionaries(
    {
        "step": st.integers(0, 7),
        "cause": st.just("guard:spike"),
        "metric": st.just("loss"),
        "value": st.floats(-1e308, 1e308),
    }
) | st.fixed_dictionaries(
    {"step": st.integers(0, 7), "cause": st.just("guard:nan"), "metric": st.just("loss")}
).map(lambda trip: {**trip, "value": None})
# Per field: values that load (often), and values that must not.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "last_epoch": st.one_of(
        st.integers(6, 40), st.integers(-2, 5), st.sampled_from([2**53, 2**53 + 1, True, 3.0])
    ),
    "window": st.one_of(
        st.lists(st.floats(0.5, 2.0), max_size=4),
        st.lists(st.floats(-1e308, 1e308), max_size=4),
        st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6),
        st.none(),
    ),
    "hold_left": st.one_of(st.integers(0, 5), st.integers(-1, 7), st.just(None)),
    "trip_count": st.one_of(st.integers(1, 5), st.integers(-1, 0), st.just(2**60)),
    "last_trip": st.one_of(
        VALID_TRIP,
        st.none(),
        st.fixed_dictionaries(
            {
                "step": st.one_of(st.integers(-1, 50), st.just("1")),
                "cause": st.sampled_from(["guard:nan", "guard:spike", "nan", None]),
                "metric": st.sampled_from(["loss", "val_loss", ""]),
                "value": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
            }
        ),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    ),
}


@settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_random_state_loads_or_is_refused_in_one_line(data):
    policy = tripped()
    state = saved(policy)
    names = st.sets(st.sampled_from(sorted(FIELD_VALUES)), min_size=1, max_size=3)
    for name in data.draw(names, label="fields"):
        state[name] = data.draw(FIELD_VALUES[name], label=name)
    if data.draw(st.sampled_from([False, False, False, True]), label="inner"):
        state["inner"] = data.draw(
            st.fixed_dictionaries(
                {
                    "lrs": st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=3),
                    "best": st.floats(allow_nan=True),
                    "num_bad_steps": st.integers(-1, 2),
                    "cooldown_counter": st.integers(-1, 2),
                }
            ),
            label="inner state",
        )
    fresh = parse_policy(GUARD_SPEC).build([0.1, 0.02])
    try:
        fresh.load_state_dict(state)
    except SpecError as refused:
        assert "\n" not in str(refused) and str(refused).startswith("guard state: ")
        return
    own_state_json(fresh)
    for record in stream(30):
        fresh.step(record)
        fresh.observe({"val_loss": record["val_loss"]})
        assert len(fresh.lrs) == 2 and all(math.isfinite(lr) and lr >= 0 for lr in fresh.lrs)
        own_state_json(fresh)


def test_one_event_is_one_trip_and_a_new_level_is_the_new_normal():
    # A loss that settles higher after a spike (a damaged model, a new data
    # mix) trips once; the values of the hold join the window, so at the
    # hand-back the new level is what the guard compares with.
    policy = parse_policy(
        {
            "kind": "guard",
            "inner": {"kind": "step", "step_size": 10**6},
            "hold": 5,
            "window": 5,
            "min_points": 5,
            "factor": 3.0,
        }
    ).build([0.1])
    for _ in range(10):
        policy.step({"loss": 1.0})
    policy.step({"loss": 50.0})
    assert policy.trips == 1 and policy.decided is not None
    for _ in range(20):
        policy.step({"loss": 8.0})  # 8x the old mean: a spike, were it checked
        assert policy.decided is None
    assert policy.trips == 1 and policy.hold_left == 0
    assert policy.lrs == [0.1]
    policy.step({"loss": 30.0})  # ~4x the new level
    assert policy.trips == 2 and policy.last_trip.value == 30.0


def test_a_nan_during_the_hold_trips_again_and_starts_the_hold_again():
    policy = parse_policy(
        {"kind": "guard", "inner": {"kind": "step", "step_size": 10**6}, "hold": 5}
    ).build([0.1])
    policy.step({"loss": math.nan})
    policy.step({"loss": 1.0})
    policy.step({"loss": 1.0})
    assert policy.hold_left == 3
    policy.step({"loss": math.inf})
    assert policy.trips == 2 and policy.hold_left == 5
    assert policy.last_trip.cause == "guard:nan" and policy.last_trip.value is None


@pytest.mark.parametrize("value", [123456.789, -0.1, 1e-300, 7.0 / 3.0])
def test_a_constant_metric_never_trips_the_zscore_rule(value):
    # The window's mean of identical values can be an ulp off the value
    # (found by tests/test_policies_vs_torch.py): that is no spread.
    policy = parse_policy(
        {
            "kind": "guard",
            "inner": {"kind": "step", "step_size": 10**6},
            "spike": "zscore",
            "zscore": 0.01,
            "window": 3,
            "min_points": 1,
        }
    ).build([0.1])
    for _ in range(50):
        policy.step({"loss": value})
    assert policy.trips == 0
