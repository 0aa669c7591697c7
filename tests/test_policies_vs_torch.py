"""Parity of every ``lrpilot.policies`` kind with torch 2.13's own scheduler.

torch is the judge (docs/policies.md): each case builds an
optimizer with one param group per base LR, the torch scheduler with the same
field values (tests/torch_reference.py) and the policy from the same config,
then steps both record by record and compares the LRs (and the momentum or
Adam's beta1, where a policy cycles it) after construction and after every
record, to a relative 1e-9.

Cases come from hypothesis strategies, one per kind, with a fixed seed
(``derandomize``) and a bounded number of examples so that CI runs the same
cases every time. Below them: a bit-exact ``state_dict`` round trip for every
kind, and one named test per torch quirk that docs/policies.md lists.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from typing import Any

import pytest
import torch_reference
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch_reference import TorchReference, initial_momentum

from lrpilot.policies import KINDS, ScheduleExhausted, SpecError, parse_policy

# --------------------------------------------------------------------------
# Hypothesis: deterministic and bounded.

settings.register_profile(
    "lrpilot-torch-parity",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("lrpilot-torch-parity")


# Examples per generated parity test, by kind: the whole file runs about 2500
# parity cases in about 30 s on 2 cores (torch 2.13 CPU).
MAX_EXAMPLES = {
    "plateau": 400,
    "cyclic": 300,
    "cosine_restarts": 200,
    "cosine": 200,
    "step": 150,
    "multistep": 150,
    "exponential": 100,
    "linear": 150,
    "onecycle": 400,
    "sequential": 400,
    "guard": 150,
    "range_test": 150,
}


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=n)


# Parity cases (policy vs torch, every step compared) run in this session, by
# kind, and generated examples run per kind; test_zz_parity_case_count reports.
PARITY_CASES: Counter[str] = Counter()
GENERATED: Counter[str] = Counter()

REL_TOL = 1e-9
ABS_TOL = 1e-15
MAX_RECORDS = 300

# --------------------------------------------------------------------------
# The comparison.


def _close(got: list[float], expected: list[float]) -> bool:
    return len(got) == len(expected) and all(
        math.isclose(g, e, rel_tol=REL_TOL, abs_tol=ABS_TOL) for g, e in zip(got, expected)
    )


def _valid(config: dict[str, Any]) -> bool:
    try:
        parse_policy(config)
    except SpecError:
        return False
    return True


def assert_parity(
    config: dict[str, Any],
    base_lrs: list[float],
    records: list[dict[str, float]],
    optimizer: str = "sgd",
) -> tuple[Any, TorchReference]:
    """Step the policy and torch through ``records``; every step must agree.

    Returns both, stepped to the end, for callers that go on checking.
    """
    policy = parse_policy(config).build(base_lrs)
    ref = TorchReference(config, base_lrs, optimizer)
    untouched = [initial_momentum(optimizer)] * len(base_lrs)

    def check(k: int, got: list[float]) -> None:
        where = f"{config} base_lrs={base_lrs} optimizer={optimizer} step={k}"
        expected = ref.lrs()
        assert _close(got, expected), f"lrs differ at {where}: torch {expected}, policy {got}"
        assert got == policy.lrs, f"step() returned {got} but policy.lrs is {policy.lrs}"
        momenta = ref.momenta()
        if policy.momenta is None:
            # No momentum policy: torch must not have touched it either.
            assert momenta == untouched, f"torch moved momentum to {momenta} at {where}"
        else:
            assert _close(list(policy.momenta), momenta), (
                f"momenta differ at {where}: torch {momenta}, policy {policy.momenta}"
            )

    check(0, list(policy.lrs))
    for k, record in enumerate(records, start=1):
        got = policy.step(record)
        ref.step(record)
        check(k, got)
    PARITY_CASES[config["kind"]] += 1
    return policy, ref


# --------------------------------------------------------------------------
# Strategies. Each ``*_config(n)`` draws a valid config for n param groups;
# each ``*_case`` draws (config, base_lrs, records, optimizer).

LR = st.floats(1e-4, 1.0)
GROUPS = st.integers(1, 4)
# Record counts: any, but long runs (where restarts, cycles and cuts pile up) often.
STEPS = st.one_of(st.integers(0, MAX_RECORDS), st.integers(MAX_RECORDS - 60, MAX_RECORDS))
NO_RECORD: dict[str, float] = {}


def _put(draw: st.DrawFn, config: dict[str, Any], name: str, strategy: st.SearchStrategy) -> None:
    """Set an optional field two times in three; else torch's default applies."""
    if draw(st.sampled_from([True, True, False])):
        config[name] = draw(strategy)


def _per_group(draw: st.DrawFn, values: list[float]) -> float | list[float]:
    """A per-group field as torch takes it: a list, or one number when all agree."""
    if len(set(values)) == 1 and draw(st.booleans()):
        return values[0]
    return list(values)


def _momenta(draw: st.DrawFn, config: dict[str, Any], n: int) -> None:
    """base_momentum <= max_momentum per group, each a number or a list."""
    if not draw(st.booleans()):
        return  # torch's defaults
    bases = draw(st.lists(st.floats(0.0, 0.99), min_size=n, max_size=n))
    if draw(st.booleans()):
        bases = [bases[0]] * n
    tops = [b + draw(st.floats(0.0, 1.0)) * (0.999 - b) for b in bases]
    if draw(st.booleans()):
        tops = [max(tops)] * n
    config["base_momentum"] = _per_group(draw, bases)
    config["max_momentum"] = _per_group(draw, tops)


def _eta_min(base_lrs: list[float]) -> st.SearchStrategy[float]:
    low = min(base_lrs)
    return st.one_of(
        st.just(0.0),
        st.floats(0.0, low),
        st.floats(0.9 * low, low),  # eta_min close to the base LR
        st.floats(0.0, 2.0 * max(base_lrs)),  # above it: torch climbs towards it
    )


def _blank_records(k: int) -> list[dict[str, float]]:
    return [NO_RECORD] * k


@st.composite
def plateau_case(draw: st.DrawFn):
    n = draw(GROUPS)
    base_lrs = draw(st.lists(LR, min_size=n, max_size=n))
    config: dict[str, Any] = {"kind": "plateau"}
    metric = draw(st.sampled_from(["loss", "val_loss", "acc"]))
    if metric != "loss" or draw(st.booleans()):
        config["metric"] = metric
    config["mode"] = mode = draw(st.sampled_from(["min", "max"]))
    config["threshold_mode"] = draw(st.sampled_from(["rel", "abs"]))
    _put(draw, config, "factor", st.floats(0.01, 0.99))
    config["patience"] = draw(st.integers(0, 6))
    _put(draw, config, "threshold", st.sampled_from([0.0, 1e-4, 0.01, 0.1, 0.5]))
    _put(draw, config, "cooldown", st.integers(0, 6))
    min_lr = draw(
        st.one_of(
            st.none(),
            st.just(0.0),
            st.floats(0.0, min(base_lrs)),
            # close below each group's base LR: one cut, then clamped
            st.lists(st.floats(0.5, 1.0), min_size=n, max_size=n).map(
                lambda fs: [f * lr for f, lr in zip(fs, base_lrs)]
            ),
            st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n),
        )
    )
    if min_lr is not None:
        config["min_lr"] = min_lr
    # eps that bites at these LRs (cuts of 1e-4..1 are refused when eps is large),
    # or exactly the size of group 0's first cut, which is refused (strict >).
    eps = draw(st.sampled_from([None, 0.0, 1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, "tie"]))
    if eps == "tie":
        min_lr0 = min_lr[0] if isinstance(min_lr, list) else (min_lr or 0.0)
        old = base_lrs[0]
        config["eps"] = max(0.0, old - max(old * config.get("factor", 0.1), min_lr0))
    elif eps is not None:
        config["eps"] = eps

    # Metric values: a noisy trend, quantised (so that ties happen) and offset
    # (often negative), some records without the watched metric.
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    k = draw(STEPS)
    offset = draw(st.sampled_from([-100.0, -5.0, -1.0, 0.0, 0.5, 3.0]))
    slope = draw(st.sampled_from([-0.05, -0.01, 0.0, 0.002, 0.01, 0.05]))
    noise = draw(st.sampled_from([0.0, 0.01, 0.1, 1.0]))
    quantum = draw(st.sampled_from([0.0, 0.01, 0.1, 1.0]))
    missing = draw(st.sampled_from([0.0, 0.1, 0.5]))
    records: list[dict[str, float]] = []
    for i in range(k):
        value = offset + slope * i * (1 if mode == "min" else -1) + rng.gauss(0.0, noise)
        if quantum:
            value = round(value / quantum) * quantum
        if quantum == 1.0:
            value = int(value)
        if rng.random() < missing:
            records.append(NO_RECORD if rng.random() < 0.5 else {"other": value})
        else:
            records.append({metric: value, "other": rng.random()})
    return config, base_lrs, records, "sgd"


@st.composite
def cyclic_config(draw: st.DrawFn, n: int) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": "cyclic"}
    bases = draw(st.lists(st.floats(1e-4, 0.1), min_size=n, max_size=n))
    if draw(st.booleans()):
        bases = [bases[0]] * n
    tops = [b * (1.0 + draw(st.floats(0.0, 20.0))) for b in bases]
    if draw(st.booleans()):
        tops = [max(tops)] * n
    config["base_lr"] = _per_group(draw, bases)
    config["max_lr"] = _per_group(draw, tops)
    config["step_size_up"] = draw(st.integers(1, 40))
    _put(draw, config, "step_size_down", st.one_of(st.none(), st.integers(1, 40)))
    mode = draw(st.sampled_from(["triangular", "triangular2", "exp_range"]))
    if mode != "triangular" or draw(st.booleans()):
        config["mode"] = mode
    if mode == "exp_range":
        config["gamma"] = draw(st.floats(0.95, 1.0))
    else:
        _put(draw, config, "gamma", st.floats(0.1, 2.0))  # ignored by torch here
    _put(draw, config, "cycle_momentum", st.booleans())
    if config.get("cycle_momentum", True):
        _momenta(draw, config, n)
    return config


@st.composite
def cyclic_case(draw: st.DrawFn):
    n = draw(GROUPS)
    base_lrs = draw(st.lists(LR, min_size=n, max_size=n))
    config = draw(cyclic_config(n))
    optimizer = draw(st.sampled_from(["sgd", "adam"]))
    return config, base_lrs, _blank_records(draw(STEPS)), optimizer


@st.composite
def cosine_restarts_config(draw: st.DrawFn, base_lrs: list[float]) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": "cosine_restarts", "T_0": draw(st.integers(1, 60))}
    _put(draw, config, "T_mult", st.sampled_from([1, 2, 2, 3]))
    _put(draw, config, "eta_min", _eta_min(base_lrs))
    return config


@st.composite
def cosine_config(draw: st.DrawFn, base_lrs: list[float]) -> dict[str, Any]:
    # T_max well below MAX_RECORDS too: the curve climbs back past T_max.
    config: dict[str, Any] = {"kind": "cosine", "T_max": draw(st.integers(1, 150))}
    _put(draw, config, "eta_min", _eta_min(base_lrs))
    return config


@st.composite
def step_config(draw: st.DrawFn, base_lrs: list[float]) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": "step", "step_size": draw(st.integers(1, 60))}
    _put(draw, config, "gamma", st.floats(0.05, 1.5))
    return config


@st.composite
def multistep_config(draw: st.DrawFn, base_lrs: list[float]) -> dict[str, Any]:
    # 0 included: torch applies it in the creation step (step 0).
    milestones = draw(
        st.lists(st.one_of(st.integers(0, MAX_RECORDS), st.integers(0, 3)), max_size=6)
    )
    if milestones and draw(st.booleans()):
        milestones += draw(st.lists(st.sampled_from(milestones), min_size=1, max_size=3))
    if draw(st.booleans()):
        milestones = draw(st.permutations(milestones))
    config: dict[str, Any] = {"kind": "multistep", "milestones": list(milestones)}
    _put(draw, config, "gamma", st.floats(0.05, 1.5))
    return config


@st.composite
def exponential_config(draw: st.DrawFn, base_lrs: list[float]) -> dict[str, Any]:
    return {"kind": "exponential", "gamma": draw(st.floats(0.9, 1.02))}


@st.composite
def linear_config(draw: st.DrawFn, base_lrs: list[float]) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": "linear"}
    _put(draw, config, "start_factor", st.floats(0.001, 1.0))
    _put(draw, config, "end_factor", st.floats(0.0, 1.0))
    _put(draw, config, "total_iters", st.integers(1, 150))
    return config


SCHEDULE_CONFIGS = {
    "cosine_restarts": cosine_restarts_config,
    "cosine": cosine_config,
    "step": step_config,
    "multistep": multistep_config,
    "exponential": exponential_config,
    "linear": linear_config,
}


@st.composite
def schedule_case(draw: st.DrawFn, kind: str):
    """A case for one of the plain step-driven kinds (no momentum, own LRs)."""
    n = draw(GROUPS)
    base_lrs = draw(st.lists(LR, min_size=n, max_size=n))
    config = draw(SCHEDULE_CONFIGS[kind](base_lrs))
    return config, base_lrs, _blank_records(draw(STEPS)), "sgd"


@st.composite
def onecycle_config(draw: st.DrawFn, n: int) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": "onecycle"}
    peaks = draw(st.lists(st.floats(1e-4, 1.0), min_size=n, max_size=n))
    config["max_lr"] = _per_group(draw, peaks)
    if draw(st.integers(0, 3)) == 0:
        config["epochs"] = epochs = draw(st.integers(1, 15))
        config["steps_per_epoch"] = per_epoch = draw(st.integers(1, 20))
        total = epochs * per_epoch
    else:
        config["total_steps"] = total = draw(STEPS.filter(bool))
    # pct_start on a grid of whole steps too, and where a phase is 0 steps long
    # (pct * total == 1; three_phase's last phase when 2 * pct * total == total + 1).
    pct = draw(
        st.one_of(
            st.floats(0.0, 1.0),
            st.integers(0, total).map(lambda k: k / total),
            st.sampled_from([1 / total, (total + 1) / (2 * total)]),
        )
    )
    if pct != 0.3 or draw(st.booleans()):
        config["pct_start"] = float(pct)
    _put(draw, config, "anneal_strategy", st.sampled_from(["cos", "linear"]))
    _put(draw, config, "three_phase", st.sampled_from([False, True]))
    _put(draw, config, "div_factor", st.floats(1.0, 100.0))
    _put(draw, config, "final_div_factor", st.floats(1.0, 1e5))
    _put(draw, config, "cycle_momentum", st.booleans())
    if config.get("cycle_momentum", True):
        _momenta(draw, config, n)
    return config


def onecycle_total(config: dict[str, Any]) -> int:
    if "total_steps" in config:
        return config["total_steps"]
    return config["epochs"] * config["steps_per_epoch"]


@st.composite
def onecycle_case(draw: st.DrawFn):
    n = draw(GROUPS)
    base_lrs = draw(st.lists(LR, min_size=n, max_size=n))
    config = draw(onecycle_config(n))
    optimizer = draw(st.sampled_from(["sgd", "adam"]))
    # Exactly total_steps records: the last allowed step.
    return config, base_lrs, _blank_records(onecycle_total(config)), optimizer


FIRST_STAGES = ["linear", "exponential", "step", "multistep", "cosine", "cosine_restarts"]


@st.composite
def sequential_case(draw: st.DrawFn):
    n = draw(GROUPS)
    base_lrs = draw(st.lists(LR, min_size=n, max_size=n))
    k = draw(STEPS.filter(bool))
    n_stages = draw(st.sampled_from([2, 3, 4, 2, 3, 1]))
    if n_stages == 2 and draw(st.booleans()):
        # the common one: linear warmup, then cosine
        stages = [draw(linear_config(base_lrs)), draw(cosine_config(base_lrs))]
    else:
        # cyclic only as a later stage: torch's first-stage CyclicLR (and any
        # OneCycleLR) overwrites initial_lr, a documented divergence.
        first = draw(st.sampled_from(FIRST_STAGES))
        later = draw(
            st.lists(
                st.sampled_from([*FIRST_STAGES, "cyclic", "cyclic"]),
                min_size=n_stages - 1,
                max_size=n_stages - 1,
            )
        )
        stages = []
        for kind in [first, *later]:
            if kind == "cyclic":
                stages.append(draw(cyclic_config(n)))
            else:
                stages.append(draw(SCHEDULE_CONFIGS[kind](base_lrs)))
    milestones = sorted(
        draw(
            st.lists(
                # past the last record too: a stage never reached is still built
                st.integers(1, k + 50),
                min_size=len(stages) - 1,
                max_size=len(stages) - 1,
                unique=True,
            )
        )
    )
    config = {"kind": "sequential", "policies": stages, "milestones": milestones}
    optimizer = draw(st.sampled_from(["sgd", "adam"]))
    return config, base_lrs, _blank_records(k), optimizer


INNER_CASES = {
    "plateau": plateau_case(),
    "cyclic": cyclic_case(),
    **{kind: schedule_case(kind) for kind in SCHEDULE_CONFIGS},
    "onecycle": onecycle_case(),
    "sequential": sequential_case(),
}


@st.composite
def guard_case(draw: st.DrawFn):
    """A guard (lrpilot's own) that never trips, around any other kind: torch
    judges its inner policy. The guard watches its own metric, whose values
    cannot trip it: within [1, 1.5] for ratio (factor above 1.5), constant for
    zscore (no spread: no z), anything (NaN and infinities too) with spike
    off and nan false; some records lack it."""
    inner, base_lrs, records, optimizer = draw(
        INNER_CASES[draw(st.sampled_from(sorted(INNER_CASES)))]
    )
    config: dict[str, Any] = {"kind": "guard", "inner": inner, "metric": "grad_norm"}
    spike = draw(st.sampled_from(["ratio", "zscore", "off"]))
    config["spike"] = spike
    window = draw(st.integers(1, 60))
    config["window"] = window
    config["min_points"] = draw(st.integers(1, window))
    _put(draw, config, "cut", st.floats(0.01, 1.0))
    _put(draw, config, "hold", st.integers(1, 200))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    if spike == "ratio":
        config["factor"] = draw(st.floats(1.51, 10.0))
        values = [rng.uniform(1.0, 1.5) for _ in records]
    elif spike == "zscore":
        _put(draw, config, "zscore", st.floats(0.01, 10.0))
        values = [draw(st.floats(-1e6, 1e6))] * len(records)
    else:
        config["nan"] = False
        values = [rng.choice([math.nan, math.inf, -math.inf, rng.gauss(0.0, 1e3)]) for _ in records]
    records = [
        {**record, "grad_norm": value} if rng.random() < 0.8 else record
        for record, value in zip(records, values)
    ]
    assume(_valid(config))  # onecycle's phase of zero steps
    return config, base_lrs, records, optimizer


@st.composite
def range_test_case(draw: st.DrawFn):
    """A range test (lrpilot's own; its judge is Lightning's LR finder, whose
    schedulers are torch LRSchedulers) on a loss that falls, then blows up,
    some records without it; then a step-driven kind, or nothing."""
    n = draw(GROUPS)
    base_lrs = draw(st.lists(LR, min_size=n, max_size=n))
    min_lr = draw(st.floats(1e-8, 1e-3))
    config: dict[str, Any] = {
        "kind": "range_test",
        "min_lr": min_lr,
        "max_lr": min_lr * draw(st.floats(2.0, 1e7)),
        "steps": draw(st.integers(1, 150)),
        "mode": draw(st.sampled_from(["exponential", "linear"])),
    }
    _put(draw, config, "smoothing", st.sampled_from([0.0, 0.5, 0.98]))
    _put(draw, config, "diverge", st.one_of(st.none(), st.floats(1.5, 6.0)))
    _put(draw, config, "suggest", st.sampled_from(["steepest", "minimum"]))
    _put(draw, config, "skip_begin", st.integers(0, 12))
    if draw(st.booleans()):
        config["then"] = draw(
            SCHEDULE_CONFIGS[draw(st.sampled_from(sorted(SCHEDULE_CONFIGS)))](base_lrs)
        )
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    turn = draw(st.integers(1, 200))
    records = [
        {"loss": 2.0 / (1 + k) if k < turn else 2.0 * (k - turn + 1) ** 2}
        if rng.random() < 0.9
        else {}
        for k in range(draw(STEPS))
    ]
    return config, base_lrs, records, "sgd"


CASES = {**INNER_CASES, "guard": guard_case(), "range_test": range_test_case()}

# --------------------------------------------------------------------------
# Parity, generated.


@examples(MAX_EXAMPLES["plateau"])
@given(plateau_case())
def test_plateau_matches_torch(case):
    assert_parity(*case)
    GENERATED["plateau"] += 1


@examples(MAX_EXAMPLES["cyclic"])
@given(cyclic_case())
def test_cyclic_matches_torch(case):
    assert_parity(*case)
    GENERATED["cyclic"] += 1


@examples(MAX_EXAMPLES["cosine_restarts"])
@given(schedule_case("cosine_restarts"))
def test_cosine_restarts_matches_torch(case):
    assert_parity(*case)
    GENERATED["cosine_restarts"] += 1


@examples(MAX_EXAMPLES["cosine"])
@given(schedule_case("cosine"))
def test_cosine_matches_torch(case):
    assert_parity(*case)
    GENERATED["cosine"] += 1


@examples(MAX_EXAMPLES["step"])
@given(schedule_case("step"))
def test_step_matches_torch(case):
    assert_parity(*case)
    GENERATED["step"] += 1


@examples(MAX_EXAMPLES["multistep"])
@given(schedule_case("multistep"))
def test_multistep_matches_torch(case):
    assert_parity(*case)
    GENERATED["multistep"] += 1


@examples(MAX_EXAMPLES["exponential"])
@given(schedule_case("exponential"))
def test_exponential_matches_torch(case):
    assert_parity(*case)
    GENERATED["exponential"] += 1


@examples(MAX_EXAMPLES["linear"])
@given(schedule_case("linear"))
def test_linear_matches_torch(case):
    assert_parity(*case)
    GENERATED["linear"] += 1


@examples(MAX_EXAMPLES["onecycle"])
@given(onecycle_case())
def test_onecycle_matches_torch(case):
    """Up to exactly total_steps steps; one more is ScheduleExhausted where torch
    raises ValueError. A config the spec rejects (a phase of zero steps) is one
    torch cannot run either: it divides by zero within total_steps."""
    config, base_lrs, records, optimizer = case
    if not _valid(config):
        with pytest.raises(ZeroDivisionError):
            ref = TorchReference(config, base_lrs, optimizer)
            for record in records:
                ref.step(record)
        PARITY_CASES["onecycle (rejected, torch divides by zero)"] += 1
        GENERATED["onecycle"] += 1
        return
    policy, ref = assert_parity(config, base_lrs, records, optimizer)
    lrs, momenta = list(policy.lrs), policy.momenta and list(policy.momenta)
    with pytest.raises(ScheduleExhausted):
        policy.step()
    assert policy.lrs == lrs and policy.momenta == momenta, "a refused step changed the policy"
    with pytest.raises(ValueError, match="Tried to step"):
        ref.step()
    GENERATED["onecycle"] += 1


@examples(MAX_EXAMPLES["sequential"])
@given(sequential_case())
def test_sequential_matches_torch(case):
    assert_parity(*case)
    GENERATED["sequential"] += 1


@examples(MAX_EXAMPLES["guard"])
@given(guard_case())
def test_guard_that_never_trips_is_its_inner_policy(case):
    policy, _ = assert_parity(*case)
    assert policy.trips == 0
    GENERATED["guard"] += 1


@examples(MAX_EXAMPLES["range_test"])
@given(range_test_case())
def test_range_test_sweep_is_lightnings_scheduler(case):
    """While it sweeps, group 0's LR is Lightning's _ExponentialLR / _LinearLR
    (num_iter = steps) on a real optimizer, and every group keeps its ratio
    to group 0; past steps, without the end decided, min_lr holds."""
    import warnings

    from lightning.pytorch.tuner.lr_finder import _ExponentialLR, _LinearLR

    config, base_lrs, records, _ = case
    policy = parse_policy(config).build(base_lrs)
    min_lr, steps = config["min_lr"], config["steps"]
    optimizer = torch_reference.make_optimizer([min_lr])
    optimizer.param_groups[0]["initial_lr"] = min_lr
    cls = _LinearLR if config["mode"] == "linear" else _ExponentialLR
    scheduler = cls(optimizer, config["max_lr"], steps)
    ratios = [lr / base_lrs[0] for lr in base_lrs]
    for k, record in enumerate([*records, NO_RECORD]):
        if policy.phase != "sweep":
            break
        lightning = optimizer.param_groups[0]["lr"] if k < steps else min_lr
        assert policy.lrs == [lightning * ratio for ratio in ratios], f"{config} at step {k}"
        assert policy.sweeping and policy.momenta is None
        policy.step(record)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step()
    PARITY_CASES["range_test (Lightning)"] += 1
    GENERATED["range_test"] += 1


def test_every_kind_has_a_parity_strategy():
    assert set(KINDS) == set(CASES), "a policy kind without a torch parity test"
    # range_test's judge is Lightning's LR finder (test_range_test_sweep_is_lightnings_scheduler).
    assert set(KINDS) - {"sequential", "guard", "range_test"} <= set(torch_reference.SCHEDULERS)


# --------------------------------------------------------------------------
# state_dict round trip, every kind: stop, JSON, load into a fresh policy,
# go on; the sequence must be bit-identical to the uninterrupted one.


def _run(policy, records) -> list[tuple[Any, Any]]:
    """(lrs, momenta) after each record; ("exhausted", None) for a refused step."""
    out = []
    for record in records:
        try:
            policy.step(record)
        except ScheduleExhausted:
            out.append(("exhausted", None))
            continue
        out.append((list(policy.lrs), None if policy.momenta is None else list(policy.momenta)))
    return out


@pytest.mark.parametrize("kind", sorted(CASES))
@examples(40)
@given(data=st.data())
def test_state_dict_round_trip(kind, data):
    config, base_lrs, records, _ = data.draw(CASES[kind], label="case")
    if kind == "onecycle":
        assume(_valid(config))
        records = [*records, NO_RECORD]  # and the refused step after the end
    stop = data.draw(st.integers(0, len(records)), label="stop")
    spec = parse_policy(config)

    whole = spec.build(base_lrs)
    expected = _run(whole, records)

    first = spec.build(base_lrs)
    head = _run(first, records[:stop])
    state = json.loads(json.dumps(first.state_dict()))
    second = spec.build(base_lrs)
    second.load_state_dict(state)
    assert second.lrs == first.lrs
    assert second.momenta == first.momenta
    tail = _run(second, records[stop:])
    assert head + tail == expected
    # the saved state is the state: saving again after loading gives it back
    assert json.loads(json.dumps(second.state_dict())) == json.loads(json.dumps(whole.state_dict()))


# --------------------------------------------------------------------------
# The quirks of torch 2.13 listed in docs/policies.md, one small case each.


def test_quirk1_every_kind_but_plateau_steps_once_when_created():
    """Quirk 1: every kind but plateau takes one step when created; record k is
    scheduler step k. The initial step is visible for linear (start_factor) and
    multistep counts from it; the record's other contents never drive it."""
    lrs = [0.1, 0.02]
    linear = {"kind": "linear", "start_factor": 0.25, "total_iters": 4}
    policy, _ = assert_parity(linear, lrs, _blank_records(6))
    assert policy.lrs == pytest.approx(lrs, rel=1e-12)
    assert parse_policy(linear).build(lrs).lrs == pytest.approx([0.025, 0.005], rel=1e-12)

    multistep = {"kind": "multistep", "milestones": [3], "gamma": 0.5}
    trace = []
    policy = parse_policy(multistep).build(lrs)
    for _ in range(4):
        trace.append(policy.step({"loss": 1.0, "step": 1000.0})[0])
    assert trace == [0.1, 0.1, 0.05, 0.05]  # record 3 is step 3, whatever it carries
    assert_parity(multistep, lrs, [{"loss": 1.0, "step": 1000.0}] * 4)

    plateau = {"kind": "plateau", "patience": 0, "factor": 0.5}
    policy, _ = assert_parity(plateau, lrs, [])
    assert policy.lrs == lrs  # no step at creation


def test_quirk2_cyclic_and_onecycle_replace_the_group_lrs():
    """Quirk 2: cyclic and onecycle set the groups' LRs themselves (base_lr;
    max_lr / div_factor): the base LRs only give the group count."""
    cyclic = {"kind": "cyclic", "base_lr": [0.01, 0.02], "max_lr": 0.1, "step_size_up": 3}
    onecycle = {"kind": "onecycle", "max_lr": [0.5, 0.25], "total_steps": 20, "div_factor": 10.0}
    for config in (cyclic, onecycle):
        a, _ = assert_parity(config, [0.7, 0.3], _blank_records(12))
        b, _ = assert_parity(config, [1e-3, 5e-3], _blank_records(12))
        assert a.lrs == b.lrs
    assert parse_policy(cyclic).build([0.7, 0.3]).lrs == [0.01, 0.02]
    assert parse_policy(onecycle).build([0.7, 0.3]).lrs == pytest.approx([0.05, 0.025])


def test_quirk2_cyclic_gamma_only_in_exp_range_and_per_iteration():
    """Quirk 2: cyclic's gamma is ignored outside exp_range; in exp_range the
    scale is gamma ** t with t the step count, not the cycle number."""
    base = {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.11, "step_size_up": 4}
    for mode in ("triangular", "triangular2"):
        plain, _ = assert_parity({**base, "mode": mode}, [0.1], _blank_records(30))
        scaled, _ = assert_parity({**base, "mode": mode, "gamma": 0.5}, [0.1], _blank_records(30))
        assert plain.lrs == scaled.lrs
    config = {**base, "mode": "exp_range", "gamma": 0.9}
    policy, _ = assert_parity(config, [0.1], _blank_records(12))
    # step 12 is the top of the second cycle: 0.01 + 0.1 * 0.9 ** 12
    assert policy.lrs == pytest.approx([0.01 + 0.1 * 0.9**12], rel=1e-12)


def test_quirk3_onecycle_phase_ends_and_extended_last_step():
    """Quirk 3: onecycle's phase ends are pct*total - 1 (then 2*pct*total - 2
    with three_phase) and total - 1; at step total the last phase is extended,
    not clamped, so a linear anneal goes below the final LR."""
    for three_phase in (False, True):
        config = {
            "kind": "onecycle",
            "max_lr": 1.0,
            "total_steps": 10,
            "pct_start": 0.25,  # first phase ends at step 1.5
            "anneal_strategy": "linear",
            "three_phase": three_phase,
            "div_factor": 10.0,
            "final_div_factor": 10.0,
        }
        policy, _ = assert_parity(config, [0.3], _blank_records(10))
        final = 1.0 / 10.0 / 10.0
        assert policy.lrs[0] < final  # step 10 is past the end at step 9
        with pytest.raises(ScheduleExhausted):
            policy.step()
    peak = parse_policy({**config, "three_phase": False}).build([0.3])
    trace = [peak.lrs[0]] + [peak.step()[0] for _ in range(2)]
    assert trace[1] == pytest.approx(0.1 + 0.9 / 1.5)  # 1/1.5 of the way up
    # step 2 is past the peak (at step 1.5) on the way down: the peak is never hit
    assert trace[2] == pytest.approx(1.0 - (1.0 - 0.01) * 0.5 / 7.5)


def test_quirk4_plateau_comparisons_are_strict_and_relative_to_best():
    """Quirk 4: a metric equal to best * (1 - threshold) is not an improvement
    (strict); with a negative best the relative threshold loosens; a cut
    happens once the bad count exceeds patience."""
    config = {"kind": "plateau", "patience": 1, "factor": 0.5, "threshold": 0.5}
    # best 2.0; 1.0 == 2.0 * (1 - 0.5) is not better; two bad records > patience 1.
    policy, _ = assert_parity(config, [0.1], [{"loss": 2.0}, {"loss": 1.0}, {"loss": 1.0}])
    assert policy.lrs == [0.05]
    # best -2.0: -2.0 * 0.5 = -1.0, so -1.5 (worse than -2!) counts as better.
    policy, _ = assert_parity(config, [0.1], [{"loss": -2.0}, {"loss": -1.5}, {"loss": -1.2}])
    assert policy.lrs == [0.1]
    # mode max, best -2.0: -2.0 * 1.5 = -3.0, so -2.5 counts as better, then -3.5 (> -3.75).
    policy, _ = assert_parity(
        {**config, "mode": "max"}, [0.1], [{"loss": -2.0}, {"loss": -2.5}, {"loss": -3.5}]
    )
    assert policy.lrs == [0.1]
    # ... while -3.0 == -2.0 * 1.5 is not better (strict): two bad records, a cut.
    policy, _ = assert_parity(
        {**config, "mode": "max"}, [0.1], [{"loss": -2.0}, {"loss": -3.0}, {"loss": -3.0}]
    )
    assert policy.lrs == [0.05]
    abs_config = {**config, "threshold_mode": "abs", "threshold": 0.25}
    policy, _ = assert_parity(abs_config, [0.1], [{"loss": 1.0}, {"loss": 0.75}, {"loss": 0.75}])
    assert policy.lrs == [0.05]  # 0.75 is not below 1.0 - 0.25


def test_quirk4_plateau_cooldown_order_and_eps():
    """Quirk 4: within one step best and the bad count are updated first, then
    the cooldown decrements and zeroes the count, then the cut; a group is cut
    to max(lr * factor, min_lr) only if that changes it by more than eps."""
    config = {"kind": "plateau", "patience": 0, "cooldown": 2, "factor": 0.5}
    records = [{"loss": 1.0}] * 8
    assert_parity(config, [0.1], records)
    replay = parse_policy(config).build([0.1])
    trace = [replay.step(r)[0] for r in records]
    assert trace == pytest.approx([0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.0125])

    # min_lr per group; eps: a cut of exactly eps (0.5 - 0.25 = 0.25) is refused.
    config = {
        "kind": "plateau",
        "patience": 0,
        "factor": 0.5,
        "min_lr": [0.0, 0.45, 0.0],
        "eps": 0.25,
    }
    policy, _ = assert_parity(config, [0.5, 0.5, 2.0], [{"loss": 1.0}] * 4)
    assert policy.lrs == [0.5, 0.5, 0.5]
    # A record without the metric changes nothing, not even the bad count.
    missing = [{"loss": 1.0}, {"val_loss": 0.0}, {}, {"loss": 1.0}]
    policy, _ = assert_parity({"kind": "plateau", "patience": 1}, [0.1], missing)
    assert policy.lrs == [0.1]


def test_quirk5_cosine_restarts_wrap_and_cosine_climbs_back():
    """Quirk 5: cosine_restarts wraps T_cur when it reaches T_i (>=) and then
    multiplies T_i by T_mult; cosine past T_max climbs back (period 2*T_max)."""
    config = {"kind": "cosine_restarts", "T_0": 3, "T_mult": 2, "eta_min": 0.001}
    policy, _ = assert_parity(config, [0.1, 0.05], _blank_records(3))
    assert policy.lrs == pytest.approx([0.1, 0.05])  # step 3: T_cur 3 >= T_i 3: restart
    policy, _ = assert_parity(config, [0.1, 0.05], _blank_records(8))
    assert policy.lrs[0] < 0.1 - 0.01  # step 8: T_cur 5 of T_i 6
    policy, _ = assert_parity(config, [0.1, 0.05], _blank_records(9))
    assert policy.lrs == pytest.approx([0.1, 0.05])  # the next restart, 6 steps later
    assert_parity({**config, "T_mult": 3}, [0.1], _blank_records(60))

    cosine = {"kind": "cosine", "T_max": 5, "eta_min": 0.01}
    policy = parse_policy(cosine).build([0.1])
    trace = [policy.step()[0] for _ in range(20)]
    assert trace[4] == pytest.approx(0.01) and trace[9] == pytest.approx(0.1)
    assert trace[5] > trace[4]  # climbing back up after T_max
    assert_parity(cosine, [0.1], _blank_records(40))


def test_quirk6_sequential_restarts_each_stage_from_the_base_lrs():
    """Quirk 6: at milestone m the next policy starts again from the original
    base LRs at its own step 0; the earlier policy's last value holds until
    the milestone."""
    config = {
        "kind": "sequential",
        "policies": [
            {"kind": "exponential", "gamma": 0.5},
            {"kind": "linear", "start_factor": 0.1, "total_iters": 4},
            {"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01, "step_size_up": 2},
        ],
        "milestones": [3, 8],
    }
    policy = parse_policy(config).build([0.2])
    trace = [policy.step()[0] for _ in range(9)]
    assert trace[:3] == pytest.approx([0.1, 0.05, 0.02])  # step 3: linear's step 0
    assert trace[6] == pytest.approx(0.2)  # step 7: linear at its total_iters
    assert trace[7] == pytest.approx(0.001)  # step 8: cyclic's step 0
    assert_parity(config, [0.2], _blank_records(20))
    assert_parity(config, [0.2], _blank_records(20), optimizer="adam")


def test_quirk7_multistep_counts_repeated_milestones_in_any_order():
    """Quirk 7: a milestone listed twice applies gamma twice; order does not matter."""
    config = {"kind": "multistep", "milestones": [6, 2, 6, 4], "gamma": 0.5}
    policy, _ = assert_parity(config, [0.8, 0.4], _blank_records(8))
    assert policy.lrs == pytest.approx([0.8 / 16, 0.4 / 16])
    ordered = parse_policy({**config, "milestones": [2, 4, 6, 6]}).build([0.8, 0.4])
    again = parse_policy(config).build([0.8, 0.4])
    assert [ordered.step() for _ in range(8)] == [again.step() for _ in range(8)]


def test_quirk8_momentum_moves_against_the_lr_with_torch_defaults():
    """Quirk 8: cyclic and onecycle move momentum inversely to the LR, from
    max_momentum (lowest LR) to base_momentum (highest); defaults 0.8/0.9 for
    cyclic, 0.85/0.95 for onecycle; SGD's momentum or Adam's betas[0]."""
    cyclic = {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4}
    onecycle = {"kind": "onecycle", "max_lr": 0.1, "total_steps": 20, "pct_start": 0.5}
    for optimizer in ("sgd", "adam"):
        policy, ref = assert_parity(cyclic, [0.1, 0.2], _blank_records(4), optimizer)
        assert policy.lrs == pytest.approx([0.1, 0.1]) and policy.momenta == pytest.approx(
            [0.8] * 2
        )
        assert parse_policy(cyclic).build([0.1]).momenta == [0.9]
        policy, ref = assert_parity(onecycle, [0.1], _blank_records(9), optimizer)
        assert policy.lrs == pytest.approx([0.1]) and policy.momenta == pytest.approx([0.85])
        assert parse_policy(onecycle).build([0.1]).momenta == pytest.approx([0.95])
        off, ref = assert_parity({**cyclic, "cycle_momentum": False}, [0.1], [], optimizer)
        assert off.momenta is None and ref.momenta() == [initial_momentum(optimizer)]


@pytest.mark.parametrize(
    "config",
    [
        {"kind": "multistep", "milestones": [0, 2], "gamma": 0.5},
        {
            "kind": "sequential",
            "policies": [{"kind": "multistep", "milestones": [0], "gamma": 0.5}],
            "milestones": [],
        },
        {
            "kind": "sequential",
            "policies": [
                {"kind": "linear", "total_iters": 2},
                {"kind": "multistep", "milestones": [0, 0, 3], "gamma": 0.5},
            ],
            "milestones": [2],
        },
    ],
    ids=["alone", "first-stage", "later-stage"],
)
def test_multistep_milestone_zero_applies_at_step_zero(config):
    """MultiStepLR's creation step is its step 0, so a milestone 0 (the spec
    takes non-negative milestones) cuts the LR right there in torch, as it does
    when a later sequential stage starts at its own step 0."""
    assert_parity(config, [0.1, 0.4], _blank_records(6))


def test_zz_parity_case_count(record_property):
    """Reports the parity cases that ran before it (``pytest -s`` prints them)
    and checks that every generated test that ran got its full count of
    examples (hypothesis gives up early when its strategies filter too much)."""
    total = sum(PARITY_CASES.values())
    record_property("parity_cases", total)
    print(f"\ntorch parity cases run: {total} {dict(sorted(PARITY_CASES.items()))}")
    for kind, count in GENERATED.items():
        assert count >= MAX_EXAMPLES[kind], f"{kind}: {count} of {MAX_EXAMPLES[kind]} examples"
