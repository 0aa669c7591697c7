"""Policy specs: a wrong config gets one line that names the field and the rule."""

from __future__ import annotations

import pytest

from lrpilot.policies import KINDS, SpecError, parse_policy


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"kind": "nope"}, "kind: unknown policy kind 'nope'"),
        ({}, "kind: missing"),
        ({"kind": "plateau", "factor": 1.5}, "plateau.factor: Input should be less than 1"),
        ({"kind": "plateau", "factor": 0}, "plateau.factor: Input should be greater than 0"),
        ({"kind": "plateau", "patiense": 3}, "plateau.patiense: unknown field"),
        ({"kind": "plateau", "patience": 2.5}, "plateau.patience: Input should be a valid integer"),
        ({"kind": "plateau", "patience": "3"}, "plateau.patience: Input should be a valid integer"),
        ({"kind": "plateau", "mode": "lowest"}, "plateau.mode: Input should be 'min' or 'max'"),
        ({"kind": "plateau", "min_lr": -1.0}, "plateau.min_lr"),
        ({"kind": "cyclic", "max_lr": 0.1}, "cyclic.base_lr: required field is missing"),
        ({"kind": "cyclic", "base_lr": -0.1, "max_lr": 0.1}, "cyclic.base_lr"),
        (
            {"kind": "cyclic", "base_lr": 0.1, "max_lr": 0.01},
            "max_lr (0.01) must not be below base_lr (0.1)",
        ),
        (
            {"kind": "cyclic", "base_lr": [0.01, 0.2], "max_lr": [0.1, 0.1]},
            "max_lr (0.1) must not be below base_lr (0.2)",
        ),
        ({"kind": "cosine_restarts", "T_0": 0}, "cosine_restarts.T_0: Input should be greater"),
        ({"kind": "cosine_restarts", "T_0": 10, "T_mult": 0}, "cosine_restarts.T_mult"),
        ({"kind": "cosine"}, "cosine.T_max: required field is missing"),
        ({"kind": "step", "step_size": 0}, "step.step_size"),
        ({"kind": "exponential"}, "exponential.gamma: required field is missing"),
        ({"kind": "exponential", "gamma": float("nan")}, "exponential.gamma"),
        ({"kind": "linear", "start_factor": 0}, "linear.start_factor"),
        ({"kind": "linear", "end_factor": 1.5}, "linear.end_factor"),
        ({"kind": "multistep", "milestones": [-1]}, "multistep.milestones.0"),
        ({"kind": "onecycle", "max_lr": 0.1}, "give total_steps, or epochs and steps_per_epoch"),
        ({"kind": "onecycle", "max_lr": 0.1, "total_steps": 100, "pct_start": 1.5}, "pct_start"),
        (
            {"kind": "onecycle", "max_lr": 0.1, "total_steps": 10, "pct_start": 0.1},
            "gives a phase of zero steps",
        ),
        (
            {
                "kind": "sequential",
                "policies": [{"kind": "linear"}, {"kind": "linear"}],
                "milestones": [5, 10],
            },
            "milestones: expected 1 (one fewer than policies), got 2",
        ),
        (
            {"kind": "sequential", "policies": [{"kind": "linear"}] * 3, "milestones": [10, 5]},
            "milestones must be strictly increasing",
        ),
        (
            {
                "kind": "sequential",
                "policies": [{"kind": "linear"}, {"kind": "cosine"}],
                "milestones": [5],
            },
            "sequential.policies.1.cosine.T_max: required field is missing",
        ),
        (
            {
                "kind": "sequential",
                "policies": [{"kind": "sequential", "policies": [], "milestones": []}],
                "milestones": [],
            },
            "a sequential stage cannot itself be sequential",
        ),
        ({"kind": "sequential", "policies": [], "milestones": []}, "sequential.policies"),
        (
            {"kind": "range_test", "min_lr": 0.1, "max_lr": 0.1},
            "range_test: max_lr (0.1) must be above min_lr (0.1)",
        ),
        (
            {"kind": "range_test", "then": {"kind": "range_test"}},
            "range_test.then: a range_test cannot be inside another policy",
        ),
        (
            {"kind": "range_test", "then_base_lrs": [0.1]},
            "then_base_lrs is only for suggest_only",
        ),
        ({"kind": "guard"}, "guard.inner: required field is missing"),
        (
            {"kind": "guard", "inner": {"kind": "guard", "inner": {"kind": "linear"}}},
            "guard.inner: a guard cannot be inside another policy",
        ),
        (
            {"kind": "sequential", "policies": [{"kind": "guard"}], "milestones": []},
            "sequential.policies.0: a guard cannot be inside another policy",
        ),
        (
            {"kind": "guard", "inner": {"kind": "linear"}, "window": 5, "min_points": 6},
            "min_points (6) must not be above window (5)",
        ),
        (
            {"kind": "guard", "inner": {"kind": "cosine"}},
            "guard.inner.cosine.T_max: required field",
        ),
    ],
)
def test_bad_spec_is_one_line_naming_field_and_rule(spec, expected):
    with pytest.raises(SpecError) as caught:
        parse_policy(spec)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_not_an_object_is_refused():
    with pytest.raises(SpecError, match="expected a JSON object"):
        parse_policy(["plateau"])


@pytest.mark.parametrize(
    ("spec", "n_groups", "expected"),
    [
        ({"kind": "plateau", "min_lr": [0.0, 0.0]}, 3, "plateau.min_lr: expected 3 value"),
        ({"kind": "cyclic", "base_lr": [0.01], "max_lr": 0.1}, 2, "cyclic.base_lr: expected 2"),
        ({"kind": "onecycle", "max_lr": [0.1, 0.2], "total_steps": 10}, 1, "onecycle.max_lr"),
    ],
)
def test_per_group_list_must_match_the_group_count(spec, n_groups, expected):
    with pytest.raises(SpecError, match=expected):
        parse_policy(spec).build([0.1] * n_groups)


@pytest.mark.parametrize("lrs", [[], [0.0], [0.1, -0.1], [float("nan")], [float("inf")]])
def test_base_lrs_must_be_positive_numbers(lrs):
    with pytest.raises(SpecError, match="base_lrs"):
        parse_policy({"kind": "step", "step_size": 2}).build(lrs)


def test_defaults_are_torchs():
    """Spot-check the defaults a torch user relies on when a field is left out."""
    plateau = parse_policy({"kind": "plateau"})
    assert (plateau.mode, plateau.factor, plateau.patience, plateau.threshold) == (
        "min",
        0.1,
        10,
        1e-4,
    )
    assert (plateau.threshold_mode, plateau.cooldown, plateau.min_lr, plateau.eps) == (
        "rel",
        0,
        0.0,
        1e-8,
    )
    cyclic = parse_policy({"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.1})
    assert (cyclic.step_size_up, cyclic.step_size_down, cyclic.mode, cyclic.gamma) == (
        2000,
        None,
        "triangular",
        1.0,
    )
    assert (cyclic.cycle_momentum, cyclic.base_momentum, cyclic.max_momentum) == (True, 0.8, 0.9)
    onecycle = parse_policy({"kind": "onecycle", "max_lr": 0.1, "total_steps": 100})
    assert (onecycle.pct_start, onecycle.anneal_strategy, onecycle.div_factor) == (0.3, "cos", 25.0)
    assert (onecycle.final_div_factor, onecycle.three_phase) == (1e4, False)
    assert (onecycle.base_momentum, onecycle.max_momentum) == (0.85, 0.95)
    linear = parse_policy({"kind": "linear"})
    assert (linear.start_factor, linear.end_factor, linear.total_iters) == (1.0 / 3, 1.0, 5)
    assert parse_policy({"kind": "step", "step_size": 3}).gamma == 0.1
    assert parse_policy({"kind": "multistep", "milestones": [3]}).gamma == 0.1
    restarts = parse_policy({"kind": "cosine_restarts", "T_0": 3})
    assert (restarts.T_mult, restarts.eta_min) == (1, 0.0)


def test_tuples_from_python_callers_are_lists():
    spec = parse_policy({"kind": "multistep", "milestones": (3, 6)})
    assert spec.milestones == [3, 6]


def test_every_kind_is_listed_once():
    assert sorted(KINDS) == sorted(
        [
            "plateau",
            "cyclic",
            "cosine_restarts",
            "cosine",
            "step",
            "multistep",
            "exponential",
            "linear",
            "onecycle",
            "sequential",
            "range_test",
            "guard",
        ]
    )


def test_onecycle_epochs_times_steps_per_epoch():
    spec = parse_policy({"kind": "onecycle", "max_lr": 0.1, "epochs": 4, "steps_per_epoch": 25})
    policy = spec.build([0.1])
    for _ in range(100):
        policy.step()
    with pytest.raises(Exception, match="past total_steps=100"):
        policy.step()


def test_sequential_plateau_stage_starts_fresh_from_base_lrs():
    """Documented in sequential.py: the plateau stage begins at its milestone from the
    original base LRs with no best value, and ignores the milestone record's metric."""
    policy = parse_policy(
        {
            "kind": "sequential",
            "policies": [
                {"kind": "linear", "start_factor": 0.5, "total_iters": 2},
                {"kind": "plateau", "patience": 0, "factor": 0.5},
            ],
            "milestones": [3],
        }
    ).build([0.2])
    assert policy.lrs == [0.1]
    # Before the milestone, loss is ignored by the (not yet running) plateau stage.
    assert policy.step({"loss": 1.0}) == [0.15000000000000002]
    assert policy.step({"loss": 1.0}) == [0.2]
    assert policy.step({"loss": 0.1}) == [0.2]  # milestone: plateau's step 0
    assert policy.step({"loss": 1.0}) == [0.2]  # first value: becomes best
    assert policy.step({"loss": 1.0}) == [0.1]  # one bad step > patience 0: cut
