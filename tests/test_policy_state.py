"""Policy state from outside (a hello, a command, a checkpoint): every kind
checks what it loads and refuses a bad state whole, with one line naming the
field and the rule; a state it takes never steps to a non-finite LR. Specs
whose LRs leave the float range are refused when built, and a schedule that
compounds out of it ends (ScheduleExhausted) with the last finite LRs."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from state_mutation import json_leaves, json_values, paths, replaced

from lrpilot.policies import KINDS, Policy, ScheduleExhausted, SpecError, parse_policy


def records(n: int) -> list[dict[str, float]]:
    """Metrics for every kind: a loss that improves, then stalls (plateau cuts)."""
    return [{"loss": 1.0 / (1 + min(i, 8)), "val_loss": 2.0 - 0.1 * min(i, 5)} for i in range(n)]


BASE_LRS = [0.1, 0.02]
# Every kind, and the variants whose state differs (momentum or not, a plateau
# stage, a schedule stepped to its end).
SPECS: dict[str, dict[str, Any]] = {
    "plateau": {"kind": "plateau", "metric": "val_loss", "patience": 2, "cooldown": 3},
    "plateau_max": {"kind": "plateau", "mode": "max", "patience": 1},
    "cyclic": {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 3},
    "cyclic_plain": {
        "kind": "cyclic",
        "base_lr": 0.01,
        "max_lr": 0.1,
        "step_size_up": 2,
        "mode": "exp_range",
        "gamma": 0.9,
        "cycle_momentum": False,
    },
    "cosine_restarts": {"kind": "cosine_restarts", "T_0": 3, "T_mult": 2, "eta_min": 0.001},
    "cosine": {"kind": "cosine", "T_max": 7, "eta_min": 0.001},
    "step": {"kind": "step", "step_size": 3, "gamma": 0.5},
    "multistep": {"kind": "multistep", "milestones": [0, 4, 4, 9], "gamma": 0.5},
    "exponential": {"kind": "exponential", "gamma": 0.9},
    "linear": {"kind": "linear", "start_factor": 0.1, "end_factor": 0.0, "total_iters": 6},
    "onecycle": {"kind": "onecycle", "max_lr": 0.1, "total_steps": 12, "anneal_strategy": "linear"},
    "sequential": {
        "kind": "sequential",
        "policies": [
            {"kind": "linear", "start_factor": 0.1, "total_iters": 3},
            {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 2},
            {"kind": "plateau", "metric": "val_loss", "patience": 1},
        ],
        "milestones": [3, 8],
    },
    "guard": {
        "kind": "guard",
        "inner": {
            "kind": "sequential",
            "policies": [
                {"kind": "linear", "start_factor": 0.1, "total_iters": 3},
                {"kind": "plateau", "metric": "val_loss", "patience": 1},
            ],
            "milestones": [3],
        },
        "window": 4,
        "min_points": 2,
        "hold": 5,
    },
}
# A range test that has ended by step 12 (its then, a plateau, running), and
# one still sweeping.
SPECS["range_test"] = {
    "kind": "range_test",
    "min_lr": 1e-4,
    "steps": 6,
    "skip_begin": 1,
    "then": {"kind": "plateau", "metric": "val_loss", "patience": 1},
}
SPECS["range_test_sweep"] = {
    "kind": "range_test",
    "steps": 40,
    "mode": "linear",
    "then": {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 3},
}
STOPS = (0, 1, 5, 12)  # 12: onecycle's last step, sequential's plateau stage


def stepped(name: str, k: int) -> Policy:
    policy = parse_policy(SPECS[name]).build(BASE_LRS)
    for record in records(k):
        policy.step(record)
    return policy


def saved(policy: Policy) -> dict[str, Any]:
    """The state as it travels: through JSON."""
    return json.loads(json.dumps(policy.state_dict()))


def run(policy: Policy, n: int) -> list[Any]:
    out: list[Any] = []
    for record in records(n):
        try:
            policy.step(record)
        except ScheduleExhausted:
            out.append("exhausted")
            continue
        out.append((list(policy.lrs), policy.momenta and list(policy.momenta)))
    return out


def test_every_kind_is_covered():
    assert {spec["kind"] for spec in SPECS.values()} == set(KINDS)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("stop", STOPS)
def test_a_valid_state_round_trips(name, stop):
    first = stepped(name, stop)
    state = saved(first)
    second = parse_policy(SPECS[name]).build(BASE_LRS)
    second.load_state_dict(state)
    assert saved(second) == state
    assert (second.lrs, second.momenta) == (first.lrs, first.momenta)
    assert run(second, 20) == run(first, 20)


# --- hostile states: (spec, what to do to its state, the message) ---------------


def put(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set the field at ``path`` (``stage.best``, ``lrs.1``) of a state."""
    *parents, last = path.split(".")

    def mutate(state: dict[str, Any]) -> None:
        for part in parents:
            state = state[int(part)] if part.isdigit() else state[part]
        state[int(last) if last.isdigit() else last] = value  # type: ignore[index]

    return mutate


def drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.pop(key)


HOSTILE = [
    # the ones from the issue
    ("cosine_restarts", put("T_i", 0), "T_i must be an integer from 1 to 2**53, got 0"),
    ("plateau", put("best", "x"), "best must be a number (not NaN)"),
    ("step", put("lrs", "abc"), "lrs must be a list of 2 (a finite number >= 0"),
    ("exponential", put("lrs", [math.nan, 0.1]), "lrs[0] must be a finite number >= 0, got nan"),
    # lrs
    ("cosine", put("lrs", [0.1]), "lrs must be a list of 2"),
    ("cosine", put("lrs", [0.1, 0.1, 0.1]), "lrs must be a list of 2"),
    ("cosine", put("lrs.1", math.inf), "lrs[1] must be a finite number >= 0, got inf"),
    ("cosine", put("lrs.1", -0.5), "lrs[1] must be a finite number >= 0, got -0.5"),
    ("cosine", put("lrs.0", True), "lrs[0] must be a finite number >= 0, got True"),
    ("cosine", put("lrs.0", "0.1"), "lrs[0] must be a finite number >= 0, got '0.1'"),
    ("cosine", put("lrs.0", 10**400), "lrs[0] must be a finite number >= 0, got 1000"),
    ("cosine", put("lrs", {"0": 0.1}), "lrs must be a list of 2"),
    ("onecycle", put("lrs.0", -math.inf), "lrs[0] must be a finite number, got -inf"),
    # counters
    ("step", put("last_epoch", -1), "last_epoch must be an integer from 0 to 2**53, got -1"),
    ("step", put("last_epoch", True), "last_epoch must be an integer from 0 to 2**53, got True"),
    ("step", put("last_epoch", 3.0), "last_epoch must be an integer from 0 to 2**53, got 3.0"),
    ("step", put("last_epoch", 2**70), "last_epoch must be an integer from 0 to 2**53, got 1180"),
    ("step", put("last_epoch", 2**53 + 1), "last_epoch must be an integer from 0 to 2**53"),
    ("linear", put("last_epoch", None), "last_epoch must be an integer from 0 to 2**53, got None"),
    ("multistep", put("last_epoch", "4"), "last_epoch must be an integer from 0 to 2**53, got '4'"),
    # cosine_restarts: the cycle
    ("cosine_restarts", put("T_cur", 12), "T_cur must be below T_i (12), got 12"),
    ("cosine_restarts", put("T_i", 6), "T_i must be T_0 * T_mult ** restarts (12), got 6"),
    ("cosine_restarts", put("restarts", 60), "T_i must be T_0 * T_mult ** restarts (past 2**53)"),
    ("cosine_restarts", put("T_i", 2**53 + 1), "T_i must be an integer from 1 to 2**53"),
    # plateau: best and its counters
    ("plateau", put("best", math.nan), "best must be a number (not NaN)"),
    ("plateau", put("best", [1.0]), "best must be a number (not NaN)"),
    ("plateau", put("num_bad_steps", 3), "num_bad_steps must be an integer from 0 to 2, got 3"),
    ("plateau", put("cooldown_counter", 4), "cooldown_counter must be an integer from 0 to 3"),
    ("plateau", put("num_bad_steps", False), "num_bad_steps must be an integer from 0 to 2"),
    # momentum
    ("cyclic", put("momenta", None), "momenta must be a list of 2"),
    ("cyclic", put("momenta.0", math.nan), "momenta[0] must be a finite number >= 0, got nan"),
    ("cyclic", put("momenta", [0.9]), "momenta must be a list of 2"),
    ("cyclic_plain", put("momenta", [0.9, 0.9]), "momenta must be null: this spec does not"),
    # onecycle: within the schedule
    ("onecycle", put("step_num", 13), "step_num must be an integer from 0 to 12, got 13"),
    # sequential: the stage index, the stage's own state, held momentum
    ("sequential", put("index", 3), "index must be an integer from 0 to 2, got 3"),
    ("sequential", put("index", 0), "index must be 2, the stage at last_epoch 12, got 0"),
    ("sequential", put("last_epoch", 2), "index must be 0, the stage at last_epoch 2, got 2"),
    ("sequential", put("stage", [1]), "stage must be an object, got [1]"),
    ("sequential", put("stage.best", "x"), "sequential state: stage 2: plateau state: best must"),
    ("sequential", put("stage.lrs", [1.0]), "stage 2: plateau state: lrs must be a list of 2"),
    ("sequential", drop("held_momenta"), "sequential state: missing held_momenta"),
    ("sequential", put("held_momenta", None), "held_momenta must be a list, one per param group"),
    ("sequential", put("held_momenta", [0.9, math.inf]), "held_momenta[1] must be a finite"),
    # guard: its window, hold and trip, and the inner policy's own state
    ("guard", put("window", [1.0] * 5), "window must be a list of at most 4 finite numbers"),
    ("guard", put("window.0", math.nan), "window[0] must be a finite number, got nan"),
    ("guard", put("hold_left", 6), "hold_left must be an integer from 0 to 5, got 6"),
    ("guard", put("hold_left", 1), "hold_left must be 0 when trip_count is 0"),
    ("guard", put("trip_count", 1), "last_trip must be an object when trip_count is 1"),
    ("guard", put("last_trip", {"step": 1}), "last_trip must be null or an object with step"),
    ("guard", put("inner", [1]), "inner must be an object, got [1]"),
    ("guard", put("inner.index", 0), "guard state: inner: sequential state: index must be 1"),
    (
        "guard",
        put("inner.stage.best", "x"),
        "inner: sequential state: stage 1: plateau state: best",
    ),
    # range_test: the sweep's fields, and then's own state once it has ended
    ("range_test", put("phase", "x"), "phase must be 'sweep' or 'done', got 'x'"),
    ("range_test", put("curve_lrs", [0.1]), "curve_lrs and curve_losses must be as long"),
    ("range_test", put("then", None), "then must be an object (then's state) once the sweep"),
    ("range_test", put("then.best", "x"), "range_test state: then: plateau state: best must"),
    ("range_test_sweep", put("curve_losses.0", math.inf), "curve_losses[0] must be a finite"),
    ("range_test_sweep", put("then", {}), "then must be null while the sweep runs"),
    ("range_test_sweep", put("sweep_step", 3), "the curve must have at most 3 point(s)"),
    # the object itself
    ("cosine", drop("last_epoch"), "cosine state: missing last_epoch"),
    ("cosine", put("extra", 1), "cosine state: unknown field(s) 'extra'"),
    ("cosine", put("lrs ", 1), "cosine state: unknown field(s) 'lrs '"),
]


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    HOSTILE,
    ids=[f"{name}-{message[:40]}" for name, _, message in HOSTILE],
)
def test_a_hostile_state_is_refused_in_one_line_and_changes_nothing(name, mutate, message):
    policy = stepped(name, 12)
    before = saved(policy)
    lrs, momenta = policy.lrs, policy.momenta
    state = copy.deepcopy(before)
    mutate(state)
    with pytest.raises(SpecError) as refused:
        policy.load_state_dict(state)
    text = str(refused.value)
    assert message in text
    assert "\n" not in text and text.startswith(f"{SPECS[name]['kind']} state: ")
    assert saved(policy) == before
    assert (policy.lrs, policy.momenta) == (lrs, momenta)


@pytest.mark.parametrize("state", [None, [], "lrs", 3, {}])
def test_a_state_that_is_not_an_object_or_is_empty(state):
    policy = stepped("plateau", 3)
    with pytest.raises(SpecError, match=r"^plateau state: (expected an object|missing lrs)"):
        policy.load_state_dict(state)  # type: ignore[arg-type]


def test_ints_load_as_floats_and_a_loaded_state_shares_no_list():
    policy = stepped("step", 2)
    state = {"lrs": [1, 0], "last_epoch": 2}
    policy.load_state_dict(state)
    assert policy.lrs == [1.0, 0.0] and all(type(lr) is float for lr in policy.lrs)
    state["lrs"].append(5)
    assert policy.lrs == [1.0, 0.0]


def test_plateau_best_may_be_its_starting_infinity():
    for name, start in (("plateau", math.inf), ("plateau_max", -math.inf)):
        policy = stepped(name, 0)
        assert saved(policy)["best"] == start
        policy.load_state_dict(saved(policy))
        assert policy.best == start


# --- any mutation of a real state: refused, or it steps to finite LRs -------------

JSON_LEAVES = json_leaves()
JSON_VALUES = json_values(JSON_LEAVES)


def near(value: Any) -> st.SearchStrategy[Any]:
    """Values like ``value`` (same type, similar size, the edges of its range):
    the states that load, and so get stepped."""
    if isinstance(value, bool) or value is None:
        return JSON_LEAVES
    if isinstance(value, int):
        return st.one_of(
            st.integers(0, 2 * abs(value) + 8), st.sampled_from([value - 1, value + 1, 2**53])
        )
    if isinstance(value, float):
        top = 2 * abs(value) + 1 if math.isfinite(value) else 10.0
        return st.one_of(
            st.floats(0.0, top), st.sampled_from([1e308, 1e-308, 0.0, -value, value * 1e10])
        )
    if isinstance(value, list) and value:
        return st.lists(near(value[0]), min_size=len(value), max_size=len(value))
    return JSON_VALUES


def at(state: Any, path: tuple) -> Any:
    for part in path:
        state = state[part]
    return state


def assert_finite(policy: Policy, groups: int = len(BASE_LRS)) -> None:
    assert len(policy.lrs) == groups
    assert all(type(lr) is float and math.isfinite(lr) for lr in policy.lrs), policy.lrs
    assert policy.momenta is None or all(math.isfinite(m) for m in policy.momenta)


@settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_mutated_state_is_refused_or_steps_to_finite_lrs(data):
    name = data.draw(st.sampled_from(sorted(SPECS)), label="spec")
    state = saved(stepped(name, data.draw(st.sampled_from(STOPS), label="stop")))
    for _ in range(data.draw(st.integers(1, 2), label="mutations")):
        path = data.draw(st.sampled_from(paths(state)), label="path")
        value = data.draw(st.one_of(JSON_VALUES, near(at(state, path))), label="value")
        state = replaced(
            state,
            path,
            value,
            data.draw(st.sampled_from([False, False, False, True]), label="delete"),
        )
    if data.draw(st.booleans(), label="json"):
        state = json.loads(json.dumps(state))  # NaN and inf as JSON's Python reader gives them
    policy = parse_policy(SPECS[name]).build(BASE_LRS)
    try:
        policy.load_state_dict(state)
    except SpecError as refused:
        assert "\n" not in str(refused)
        return
    assert_finite(policy)
    for record in records(50):
        try:
            policy.step(record)
            policy.observe(record)
        except ScheduleExhausted:
            break
        assert_finite(policy)


# --- LRs that leave the float range ----------------------------------------------


def test_a_gamma_that_compounds_past_the_float_range_ends_the_schedule():
    policy = parse_policy({"kind": "exponential", "gamma": 1e200}).build([0.1])
    assert policy.step() == [pytest.approx(1e199)]
    before = saved(policy)
    with pytest.raises(ScheduleExhausted, match=r"^exponential: the LR left the finite range"):
        policy.step()
    assert saved(policy) == before  # the last finite LRs hold


def test_cyclic_exp_range_growing_amplitude_ends_rather_than_overflowing():
    spec = {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 1}
    policy = parse_policy({**spec, "mode": "exp_range", "gamma": 10.0}).build([0.1])
    with pytest.raises(ScheduleExhausted):  # gamma ** t: OverflowError in plain Python
        for _ in range(400):
            policy.step()
    assert_finite(policy, groups=1)


def test_cyclic_triangular2_runs_past_1024_cycles():
    """torch's 1 / 2.0 ** (cycle - 1) raises OverflowError from cycle 1025 on;
    the amplitude is 0 there, as it tends to."""
    spec = {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 1}
    policy = parse_policy({**spec, "mode": "triangular2"}).build([0.1])
    for _ in range(2 * 1100):
        policy.step()
    assert policy.lrs == [0.01]


def test_cosine_whose_ratio_divides_by_zero_ends_rather_than_raising():
    """With a huge T_max, 1 + cos(pi * (t - 1) / T_max) rounds to 0 just past
    T_max (torch raises ZeroDivisionError there)."""
    t_max = 2**40
    policy = parse_policy({"kind": "cosine", "T_max": t_max}).build([0.1])
    policy.load_state_dict({"lrs": [1e-20], "last_epoch": t_max + 1})
    with pytest.raises(ScheduleExhausted):
        policy.step()
    assert policy.last_epoch == t_max + 1 and policy.lrs == [1e-20]


@pytest.mark.parametrize(
    ("spec", "base_lrs", "message"),
    [
        (
            {"kind": "exponential", "gamma": 1e300},
            [1e10],
            "exponential: the first step (base_lr * gamma) gives LRs [inf]",
        ),
        ({"kind": "step", "step_size": 5, "gamma": 1e300}, [1e10], "step: the first cut"),
        (
            {"kind": "multistep", "milestones": [0] * 400, "gamma": 10.0},
            [0.1],
            "multistep: gamma ** 400 (milestones) is past the float range",
        ),
        (
            {"kind": "multistep", "milestones": [5, 6], "gamma": 1e150},
            [1e10],
            "multistep: gamma at every milestone gives LRs [inf]",
        ),
        (
            {"kind": "onecycle", "max_lr": 1e300, "total_steps": 10, "div_factor": 1e-10},
            [0.1],
            "onecycle: max_lr / div_factor gives LRs [inf]",
        ),
        (
            {"kind": "onecycle", "max_lr": 1.0, "total_steps": 10, "final_div_factor": 1e-320},
            [0.1],
            "onecycle: max_lr / div_factor / final_div_factor gives LRs [inf]",
        ),
    ],
)
def test_a_spec_whose_known_lrs_are_not_finite_is_refused_when_built(spec, base_lrs, message):
    with pytest.raises(SpecError) as refused:
        parse_policy(spec).build(base_lrs)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "cosine", "T_max": 2**53 + 1},
        {"kind": "cosine_restarts", "T_0": 10, "T_mult": 2**70},
        {"kind": "multistep", "milestones": [10, 2**53 + 1]},
        {"kind": "onecycle", "max_lr": 0.1, "epochs": 2**53 + 1, "steps_per_epoch": 1},
    ],
)
def test_spec_step_counts_are_bounded_as_on_the_wire(spec):
    with pytest.raises(SpecError, match="less than or equal to 9007199254740992"):
        parse_policy(spec)


def test_plateau_best_may_be_the_other_infinity_a_reported_metric_made_it():
    """A -inf loss in mode min is an improvement in torch (best becomes
    -inf); the daemon sends that state in its commands, so it must load."""
    policy = stepped("plateau", 0)
    policy.step({policy.spec.metric: -math.inf})
    assert policy.best == -math.inf
    fresh = stepped("plateau", 0)
    fresh.load_state_dict(saved(policy))
    assert fresh.best == -math.inf


def test_every_kind_is_listed_for_its_gauges_and_exports_only_what_it_declares():
    from lrpilot.policies import _POLICIES, KINDS

    assert sorted(kind for kind, _ in _POLICIES) == sorted(KINDS)
    names = ("plateau", "cosine_restarts", "cyclic", "onecycle", "sequential", "cosine", "guard")
    for name in (*names, "range_test", "range_test_sweep"):
        policy = stepped(name, 3 if name != "range_test" else 12)
        declared = {g.name for g in type(policy).GAUGES}
        if name == "sequential":  # and its stage's
            declared |= {g.name for g in type(policy.stage).GAUGES}
        if name == "guard":  # and its inner policy's (a sequential here)
            declared |= {g.name for g in type(policy.inner).GAUGES}
            declared |= {g.name for g in type(policy.inner.stage).GAUGES}
        if name.startswith("range_test") and policy.then is not None:  # and then's
            declared |= {g.name for g in type(policy.then).GAUGES}
        values = policy.gauges()
        assert set(values) <= declared, name
        assert all(isinstance(v, (int, float)) for v in values.values()), name
