"""``range_test``: the LR range test, against Lightning's own code.

- the sweep's LRs, both modes, against Lightning's ``_ExponentialLR`` /
  ``_LinearLR`` stepping a real torch optimizer (``num_iter = steps``);
- the curve and where the sweep stops, against Lightning's ``_LRCallback``
  fed the same losses, as in an ``lr_find`` from step 0;
- the suggestion, against ``_LRFinder.suggestion`` on the same curve;
- the end: divergence, a loss that is not finite, ``steps`` reached; the
  groups' ratios; ``then`` from the suggestion, or resumed as it was
  (``suggest_only``, ``then_state``); the training process's copy, which
  runs without metrics; state round trips; bad specs and states.
"""

from __future__ import annotations

import copy
import json
import math
import random
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from state_mutation import json_leaves, json_values, paths, replaced

from lrpilot.policies import (
    NO_METRICS,
    Policy,
    RangeTestPolicy,
    RangeTestSpec,
    ScheduleExhausted,
    SpecError,
    parse_policy,
)
from lrpilot.policies.range_test import gradient

torch = pytest.importorskip("torch")
lr_finder = pytest.importorskip("lightning.pytorch.tuner.lr_finder")

PROFILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=n)


def build(base_lrs: list[float] | None = None, **fields: Any) -> RangeTestPolicy:
    policy = parse_policy({"kind": "range_test", **fields}).build(base_lrs or [0.1])
    assert isinstance(policy, RangeTestPolicy)
    return policy


def saved(policy: Policy) -> dict[str, Any]:
    return json.loads(json.dumps(policy.state_dict(), allow_nan=False))


def losses_of(policy: RangeTestPolicy, losses: list[float], metric: str = "loss") -> list[float]:
    """Step the policy once per loss until its sweep ends; the LRs it gave."""
    out = [policy.lrs[0]]
    for loss in losses:
        out.append(policy.step({metric: loss})[0])
        if policy.phase == "done":
            break
    return out


# --- the sweep's LRs: Lightning's schedulers on a real optimizer -----------------


def lightning_lrs(mode: str, min_lr: float, max_lr: float, steps: int) -> list[float]:
    """The LR of each of the sweep's ``steps`` optimizer steps, as Lightning's
    ``_exchange_scheduler`` sets it up: every group at min_lr, then the scheduler."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=min_lr)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = min_lr
    cls = lr_finder._LinearLR if mode == "linear" else lr_finder._ExponentialLR
    scheduler = cls(optimizer, max_lr, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        assert scheduler.lr[0] == lrs[-1]  # what _LRCallback records
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("mode", ["exponential", "linear"])
@pytest.mark.parametrize(
    ("min_lr", "max_lr", "steps"),
    [(1e-8, 1.0, 100), (1e-6, 10.0, 37), (0.001, 0.5, 1), (0.001, 0.5, 2), (1e-7, 3e-3, 1000)],
)
def test_the_sweep_is_lightnings_schedule(mode, min_lr, max_lr, steps):
    spec = {"min_lr": min_lr, "max_lr": max_lr, "steps": steps, "mode": mode}
    expected = lightning_lrs(mode, min_lr, max_lr, steps)
    policy = build(**spec)
    got = [policy.lrs[0]]
    for _ in range(steps - 1):
        got.append(policy.step()[0])
    assert got == expected
    assert got[0] == min_lr and (steps == 1 or got[-1] == pytest.approx(max_lr, rel=1e-12))
    # with the loss on every step: the same LRs, and they are the curve's
    policy = build(**spec, skip_begin=0)
    assert losses_of(policy, [1.0] * steps)[:steps] == expected
    assert policy.suggested_lr is not None and policy.phase == "done"
    assert policy.decided is not None and f"after {steps} step(s)" in policy.decided.reason


@examples(60)
@given(
    mode=st.sampled_from(["exponential", "linear"]),
    min_lr=st.floats(1e-10, 1e-2),
    span=st.floats(1.5, 1e9),
    steps=st.integers(1, 300),
)
def test_the_sweep_is_lightnings_schedule_generated(mode, min_lr, span, steps):
    policy = build(min_lr=min_lr, max_lr=min_lr * span, steps=steps, mode=mode)
    got = [policy.lrs[0]] + [policy.step()[0] for _ in range(steps - 1)]
    assert got == lightning_lrs(mode, min_lr, min_lr * span, steps)


def test_param_groups_keep_their_ratios():
    base = [0.1, 0.02, 0.5]
    policy = build(base, min_lr=1e-5, max_lr=1.0, steps=10, skip_begin=0)
    single = build([0.1], min_lr=1e-5, max_lr=1.0, steps=10, skip_begin=0)
    for loss in [1.0, 0.9, 0.7, 0.4, 0.3, 0.35, 0.5, 0.9, 1.5, 2.0]:
        assert policy.lrs[0] == single.lrs[0]
        assert policy.lrs == [single.lrs[0] * r for r in (1.0, 0.02 / 0.1, 0.5 / 0.1)]
        policy.step({"loss": loss})
        single.step({"loss": loss})
    assert policy.phase == "done" and policy.suggested_lr == single.suggested_lr
    s = policy.suggested_lr
    assert policy.lrs == [s, s * (0.02 / 0.1), s * (0.5 / 0.1)]  # then None: held there


# --- the curve and the stop: Lightning's _LRCallback ----------------------------


def lightning_curve(
    losses: list[float], beta: float, diverge: float | None, steps: int, lrs: list[float]
) -> tuple[list[float], list[float], bool]:
    """Lightning's _LRCallback fed ``losses`` as in a fit from step 0:
    global_step is one past the batch when the batch ends. (lr, smoothed
    loss) per point, and whether it stopped early."""
    callback = lr_finder._LRCallback(steps, early_stop_threshold=diverge, beta=beta)
    scheduler = SimpleNamespace(lr=[0.0])
    trainer = SimpleNamespace(
        fit_loop=SimpleNamespace(batch_idx=0),
        accumulate_grad_batches=1,
        global_step=0,
        should_stop=False,
        strategy=SimpleNamespace(broadcast=lambda value: value),
        lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)],
    )
    for i, loss in enumerate(losses[:steps]):
        trainer.fit_loop.batch_idx = i
        scheduler.lr = [lrs[i]]
        callback.on_train_batch_start(trainer, None, None, i)
        trainer.global_step = i + 1  # the optimizer step is done when the batch ends
        callback.on_train_batch_end(trainer, None, torch.tensor(loss, dtype=torch.float64), None, i)
        if trainer.should_stop:
            return callback.lrs, callback.losses, True
    return callback.lrs, callback.losses, False


LOSSES = st.lists(st.one_of(st.floats(0.01, 10.0), st.floats(10.0, 1e6)), min_size=1, max_size=120)


@examples(200)
@given(
    losses=LOSSES,
    beta=st.one_of(st.sampled_from([0.0, 0.98]), st.floats(0.0, 0.999)),
    diverge=st.one_of(st.none(), st.floats(1.01, 8.0)),
    steps=st.integers(1, 120),
    mode=st.sampled_from(["exponential", "linear"]),
)
def test_the_curve_and_the_stop_are_lightnings(losses, beta, diverge, steps, mode):
    """Lightning's callback fed the same losses gives the same points (LR and
    smoothed loss, bit for bit) and stops at the same one."""
    spec = {"smoothing": beta, "diverge": diverge}
    policy = build(min_lr=1e-6, max_lr=1.0, steps=steps, mode=mode, **spec)
    lrs = losses_of(policy, losses)
    want_lrs, want_losses, early = lightning_curve(losses, beta, diverge, steps, lrs)
    if policy.phase == "sweep":  # fewer losses than steps: Lightning ran out too
        assert len(losses) < steps and not early
    else:
        assert policy.stopped_early == early
    points = saved(policy)
    assert points["curve_lrs"] == want_lrs
    assert points["curve_losses"] == want_losses


def test_a_noisy_flat_start_is_not_the_steepest_fall():
    """Why lrpilot keeps Lightning's bias correction: the loss is flat (with
    noise) at the low end of a 1e-5..1 sweep and falls around 6e-3. Divided
    by 1 - beta ** (n + 1) the early smoothed losses rise, and the steepest
    fall is the real one; the textbook 1 - beta ** n leaves the noise of the
    first averages, over LRs 5e-6 apart, to win it."""
    rng = random.Random(0)
    policy = build(min_lr=1e-5, max_lr=1.0, steps=100, diverge=None)
    raw, lrs = [], []
    while policy.phase == "sweep":
        lrs.append(policy.lrs[0])
        x = math.log10(lrs[-1])
        raw.append(2.3 - 1.6 / (1 + math.exp(-3 * (x + 2.2))) + rng.gauss(0.0, 0.02))
        policy.step({"loss": raw[-1]})
    assert 1e-3 < policy.suggested_lr < 1e-2
    avg, textbook = 0.0, []
    for n, loss in enumerate(raw, start=1):
        avg = 0.98 * avg + (1 - 0.98) * loss
        textbook.append(avg / (1 - 0.98**n))
    assert lightning_suggestion(lrs, textbook, 10, 1) < 1e-4


def test_smoothing_by_hand():
    policy = build(min_lr=1e-4, max_lr=1.0, steps=5, smoothing=0.9, diverge=None)
    avg, expected = 0.0, []
    for n, loss in enumerate([2.0, 1.0, 0.5, 0.8], start=1):
        policy.step({"loss": loss})
        avg = 0.9 * avg + (1 - 0.9) * loss
        expected.append(avg / (1 - 0.9 ** (n + 1)))  # Lightning's exponent
    assert policy.curve_losses == expected
    assert policy.gauges()["range_test_smoothed_loss"] == expected[-1]


# --- the suggestion: Lightning's _LRFinder.suggestion ----------------------------


def lightning_suggestion(lrs, losses, skip_begin, skip_end):
    finder = lr_finder._LRFinder("exponential", lrs[0], lrs[-1], len(lrs))
    finder.results = {"lr": list(lrs), "loss": list(losses)}
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # lrpilot's gradient is float64
    try:
        return finder.suggestion(skip_begin=skip_begin, skip_end=skip_end)
    finally:
        torch.set_default_dtype(dtype)


@examples(200)
@given(
    losses=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=80),
    skip_begin=st.integers(0, 12),
    skip_end=st.integers(1, 5),
    mode=st.sampled_from(["exponential", "linear"]),
)
def test_the_steepest_suggestion_is_lightnings(losses, skip_begin, skip_end, mode):
    spec = {"smoothing": 0.0, "diverge": None, "skip_begin": skip_begin, "skip_end": skip_end}
    policy = build(min_lr=1e-6, max_lr=1.0, steps=len(losses), mode=mode, **spec)
    losses_of(policy, losses)
    curve = policy.curve()
    assert [loss for _, loss in curve] == losses
    lrs = [lr for lr, _ in curve]
    theirs = lightning_suggestion(lrs, losses, skip_begin, skip_end)
    if theirs is None:  # too few points: lrpilot falls back to the minimum / 10
        assert policy.suggested_lr == lrs[losses.index(min(losses))] / 10
        assert "too few for steepest" in policy.decided.reason
        return
    if policy.suggested_lr != theirs:  # a tie, within rounding
        xs, ys = lrs[skip_begin : len(lrs) - skip_end], losses[skip_begin : len(lrs) - skip_end]
        grads = gradient(ys, xs)
        assert grads[xs.index(policy.suggested_lr)] == pytest.approx(min(grads), rel=1e-9)
    assert "steepest" in policy.decided.reason


def test_the_gradient_is_torchs():
    xs = [1e-6 * 1.5**k for k in range(30)]
    ys = [math.sin(k) + 0.01 * k * k for k in range(30)]
    f64 = torch.float64
    want = torch.gradient(torch.tensor(ys, dtype=f64), spacing=[torch.tensor(xs, dtype=f64)])[0]
    assert gradient(ys, xs) == pytest.approx(want.tolist(), rel=1e-9)
    assert gradient([1.0, 3.0], [0.5, 1.5]) == [2.0, 2.0]
    assert math.isnan(gradient([1.0, 3.0], [0.5, 0.5])[0])  # a zero spacing is never picked


def test_the_minimum_rule_and_skip_end_zero():
    losses = [3.0, 2.0, 1.0, 0.5, 0.7, 2.0, 9.0]
    policy = build(steps=7, smoothing=0.0, diverge=None, suggest="minimum")
    losses_of(policy, losses)
    assert policy.suggested_lr == policy.curve_lrs[3] / 10
    assert "the lowest smoothed loss / 10" in policy.decided.reason
    # skip_end 0 keeps the last point (Lightning's [b:-0] would keep none)
    spec = {"steps": 7, "mode": "linear", "smoothing": 0.0, "diverge": None, "skip_begin": 0}
    policy = build(**spec, skip_end=0)
    losses_of(policy, [5.0, 4.9, 4.8, 4.7, 4.6, 4.5, 0.1])
    assert policy.suggested_lr == policy.curve_lrs[-1]
    policy = build(**spec, skip_end=1)
    losses_of(policy, [5.0, 4.9, 4.8, 4.7, 4.6, 4.5, 0.1])
    assert policy.suggested_lr != policy.curve_lrs[-1]  # the last point is skipped


# --- the end --------------------------------------------------------------------


def falling_then_exploding(n: int = 60) -> list[float]:
    return [2.0 - 1.5 * min(k, 30) / 30 + (0 if k < 40 else (k - 39) ** 2) for k in range(n)]


def test_points_that_share_one_lr_give_no_gradient_and_fall_back_to_the_minimum():
    # a span of one float: the LRs round to min_lr or to max_lr
    spec = {"min_lr": 1.0, "max_lr": 1.0000000000000002, "mode": "linear", "steps": 3}
    policy = build(**spec, skip_begin=1, skip_end=0, smoothing=0.0)
    losses_of(policy, [1.0, 0.5, 2.0])
    assert policy.curve_lrs == [1.0, 1.0000000000000002, 1.0000000000000002]
    assert policy.suggested_lr == policy.curve_lrs[1] / 10  # the lowest loss, 0.5
    assert "(no gradient: the points left share one LR)" in policy.decided.reason


def test_divergence_ends_the_sweep_early_and_then_starts_from_the_suggestion():
    then = {"kind": "cosine", "T_max": 50, "eta_min": 0.0}
    policy = build([0.1, 0.05], min_lr=1e-5, max_lr=1.0, steps=100, then=then)
    assert policy.sweeping and policy.momenta is None and policy.decided is None
    lrs = losses_of(policy, falling_then_exploding())
    assert policy.phase == "done" and policy.stopped_early and not policy.sweeping
    n = len(policy.curve_lrs)
    assert policy.sweep_step == n < 60
    assert policy.curve_lrs == lrs[:n]
    smoothed = policy.curve_losses
    assert smoothed[-1] > 4.0 * min(smoothed[:-1])
    assert all(s <= 4.0 * min(smoothed[: i + 1]) for i, s in enumerate(smoothed[:-1]))
    reason = policy.decided.reason
    assert reason.startswith(f"range_test: suggested lr {policy.suggested_lr:.6g} by the steepest")
    assert f"after {n} step(s), {n} point(s)" in reason and "ended early: smoothed loss" in reason
    assert policy.decided.cause == "range_test"
    s = policy.suggested_lr
    cosine = parse_policy(then).build([s, s * 0.5])
    assert policy.lrs == cosine.lrs == [s, s * 0.5]
    state = saved(policy)  # as of the decision: the command carries the whole curve
    assert len(state["curve_lrs"]) == n and state["then"] == cosine.state_dict()
    # the next step: then's step 1, no decision, the curve dropped, the suggestion kept
    assert policy.step({"loss": 1.0}) == cosine.step()
    assert policy.decided is None and policy.curve() == [] and policy.suggested_lr == s
    assert saved(policy)["curve_lrs"] == [] and saved(policy)["suggested_lr"] == s
    gauges = policy.gauges()
    assert gauges == {"range_test_sweeping": 0.0, "range_test_suggested_lr": s}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_loss_that_is_not_finite_ends_the_sweep(bad):
    policy = build(min_lr=1e-5, steps=100, skip_begin=0, smoothing=0.0)
    losses_of(policy, [1.0, 0.9, 0.8, bad, 0.7])
    assert policy.phase == "done" and policy.stopped_early and policy.sweep_step == 4
    assert policy.curve_losses == [1.0, 0.9, 0.8]
    assert len(policy.curve_lrs) == 3 and "ended early: loss was" in policy.decided.reason
    json.dumps(policy.state_dict(), allow_nan=False)  # no NaN in a state


@pytest.mark.parametrize("smoothing", [0.0, 0.5, 0.98, 0.999999])
def test_losses_at_the_edge_of_the_float_range_keep_the_state_finite(smoothing):
    policy = build(steps=50, smoothing=smoothing, diverge=None, skip_begin=0)
    top = 1.7976931348623157e308
    losses_of(policy, [top, -top, top, top, 5e-324, -top] * 10)
    assert policy.phase == "done" and len(policy.curve_losses) == 50
    assert policy.suggested_lr is not None
    json.dumps(policy.state_dict(), allow_nan=False)


def test_no_finite_loss_no_suggestion_then_from_the_base_lrs():
    then = {"kind": "step", "step_size": 2, "gamma": 0.5}
    policy = build([0.3, 0.1], steps=5, then=then)
    policy.step({})
    policy.step({"loss": math.nan})
    assert policy.phase == "done" and policy.suggested_lr is None
    assert policy.lrs == [0.3, 0.1]
    assert policy.decided.reason.startswith("range_test: no suggestion (no finite loss in 2 step")
    assert "then from the base LRs" in policy.decided.reason
    assert "range_test_suggested_lr" not in policy.gauges()


def test_the_sweep_ends_at_steps_and_waits_for_a_record_with_the_metric():
    policy = build(min_lr=1e-4, max_lr=1.0, steps=4, skip_begin=0)
    policy.step({"loss": 1.0})
    policy.step({})  # no metric: the clock runs, no point
    policy.step({"loss": 0.5})
    policy.step({"other": 0.1})  # the 4th step, without the metric: no decision yet
    assert policy.phase == "sweep" and policy.sweep_step == 4 and policy.decided is None
    assert policy.lrs == [1e-4]  # past the sweep: min_lr holds
    policy.step({"loss": 0.4})  # past steps: no point, but the end
    assert policy.phase == "done" and not policy.stopped_early
    assert len(policy.curve_lrs) == 2 and "after 5 step(s), 2 point(s)" in policy.decided.reason


def test_observe_does_nothing_during_the_sweep_and_goes_to_then_after():
    then = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}
    policy = build([0.2], min_lr=1e-4, steps=3, skip_begin=0, then=then)
    assert policy.observe({"loss": 5.0, "val_loss": 1.0}) == policy.lrs
    assert policy.curve() == [] and policy.decided is None
    losses_of(policy, [1.0, 0.5, 0.25])
    assert policy.decided is not None
    s = policy.suggested_lr
    policy.observe({"val_loss": 1.0})  # plateau's first value
    assert policy.decided is None and policy.lrs == [s]
    policy.observe({"val_loss": 2.0})  # worse, patience 0: plateau cuts
    assert policy.lrs == [s * 0.5]
    assert policy.decided is not None and policy.decided.cause == "plateau"
    policy.step({"loss": 1.0})
    assert policy.decided is None
    assert parse_policy({"kind": "range_test", "then": then}).reduced_metrics() == {
        "loss": "mean",
        "val_loss": "mean",
    }
    same = {"kind": "range_test", "then": {**then, "metric": "loss", "reduce": "max"}}
    assert parse_policy(same).reduced_metrics() == {"loss": "mean"}


def test_then_momenta_and_gauges_after_the_sweep():
    then = {"kind": "onecycle", "max_lr": 0.1, "total_steps": 20}
    policy = build([0.1], steps=2, skip_begin=0, then=then)
    assert policy.momenta is None
    assert policy.gauges() == {"range_test_sweeping": 1.0, "range_test_lr": 1e-8}
    losses_of(policy, [1.0, 0.5])
    onecycle = parse_policy(then).build([policy.suggested_lr])
    assert policy.momenta == onecycle.momenta and policy.lrs == onecycle.lrs
    assert policy.gauges() == {
        "range_test_sweeping": 0.0,
        "range_test_suggested_lr": policy.suggested_lr,
        **onecycle.gauges(),  # and then's own
    }
    assert policy.trips == 0 and policy.last_trip is None


def test_restore_false_is_a_sweep_the_hook_does_not_undo():
    policy = build(steps=2, restore=False)
    assert policy.phase == "sweep" and not policy.sweeping
    assert policy.gauges()["range_test_sweeping"] == 1.0


# --- suggest_only: then resumes where it stood ------------------------------------


def test_suggest_only_resumes_a_cosine_exactly_where_it_stood():
    cosine = {"kind": "cosine", "T_max": 1000, "eta_min": 1e-4}
    base = [0.1, 0.01]
    uninterrupted = parse_policy(cosine).build(base)
    for _ in range(500):
        uninterrupted.step()
    at_500 = saved(uninterrupted)
    lrs_at_500 = list(uninterrupted.lrs)
    # an operator's range test from the LRs in effect, then the cosine as it was
    policy = build(
        lrs_at_500,
        steps=30,
        then=cosine,
        suggest_only=True,
        then_base_lrs=base,
        then_state=at_500,
    )
    assert policy.lrs[0] == 1e-8
    losses_of(policy, falling_then_exploding(60))
    assert policy.phase == "done" and policy.suggested_lr is not None
    assert "suggest_only: then from then_base_lrs" in policy.decided.reason
    assert policy.lrs == lrs_at_500
    assert saved(policy)["then"] == at_500
    for _ in range(700):
        assert policy.step({"loss": 1.0}) == uninterrupted.step()
    # suggest_only without a state: then from the base LRs the sweep started from
    fresh = build(base, steps=3, then=cosine, suggest_only=True)
    losses_of(fresh, [1.0, 1.0, 1.0])
    assert fresh.lrs == base and "suggest_only: then from the base LRs" in fresh.decided.reason
    held = build(base, steps=3, suggest_only=True)
    losses_of(held, [1.0, 1.0, 1.0])
    assert held.lrs == base


# --- the training process's copy: no metrics ----------------------------------------


def test_the_copy_without_metrics_holds_min_lr_and_keeps_sweeping_until_the_command():
    spec = {
        "min_lr": 1e-5,
        "max_lr": 1.0,
        "steps": 40,
        "then": {"kind": "exponential", "gamma": 0.9},
    }
    daemon = build([0.1, 0.2], **spec)
    client = build([0.1, 0.2], **spec)
    command = None
    for k, loss in enumerate(falling_then_exploding(200)):
        assert client.lrs == daemon.lrs or command is not None
        daemon.step({"loss": loss})
        client.step(NO_METRICS)
        if daemon.decided is not None and command is None:
            command, at = saved(daemon), k
    assert command is not None
    # the client ran on: past steps it holds min_lr, sweeping, no decision
    assert client.sweeping and client.phase == "sweep" and client.decided is None
    assert client.lrs == [1e-5, 2e-5] and client.sweep_step == 200
    # the command: the client loads the decision's state and fast-forwards
    client.load_state_dict(command)
    assert not client.sweeping and client.decided is None
    replay = build([0.1, 0.2], **spec)
    replay.load_state_dict(command)
    for _ in range(200 - at - 1):
        replay.step(NO_METRICS)
    assert replay.lrs == daemon.lrs
    for _ in range(200 - at - 1):
        client.step(NO_METRICS)
    assert client.lrs == daemon.lrs
    for _ in range(10):
        assert client.step(NO_METRICS) == daemon.step({"loss": 1.0})


# --- state ----------------------------------------------------------------------------


def futures(policy: Policy, n: int = 80) -> list[Any]:
    out = []
    for k, loss in enumerate(falling_then_exploding(n)):
        try:
            lrs = policy.step({"loss": loss, "val_loss": loss})
        except ScheduleExhausted:
            out.append("exhausted")
            continue
        out.append((lrs, policy.momenta, policy.decided))
        if k % 7 == 0:
            out.append(("observe", policy.observe({"val_loss": 1.0 + k}), policy.decided))
    return out


STATE_SPECS = {
    "plain": {"steps": 60, "min_lr": 1e-6},
    "then": {
        "steps": 60,
        "min_lr": 1e-6,
        "then": {
            "kind": "sequential",
            "policies": [
                {"kind": "linear", "start_factor": 0.5, "total_iters": 3},
                {"kind": "plateau", "metric": "val_loss", "patience": 1},
            ],
            "milestones": [5],
        },
    },
    "cyclic": {
        "steps": 20,
        "mode": "linear",
        "then": {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 3},
    },
    "suggest_only": {
        "steps": 10,
        "suggest_only": True,
        "then": {"kind": "cosine", "T_max": 30},
        "then_base_lrs": [0.5, 0.25],
        "then_state": {"lrs": [0.3, 0.15], "last_epoch": 11},
    },
}


@pytest.mark.parametrize("name", sorted(STATE_SPECS))
@pytest.mark.parametrize("stop", [0, 1, 5, 19, 20, 21, 45, 46, 60])
def test_a_state_round_trip_gives_the_same_future(name, stop):
    first = build([0.1, 0.05], **STATE_SPECS[name])
    for loss in falling_then_exploding(stop):
        first.step({"loss": loss, "val_loss": loss})
    state = saved(first)
    second = build([0.1, 0.05], **STATE_SPECS[name])
    second.load_state_dict(state)
    assert saved(second) == state
    assert second.sweeping == first.sweeping
    assert (second.lrs, second.momenta) == (first.lrs, first.momenta)
    assert futures(second) == futures(first)


def test_a_state_as_of_the_decision_round_trips_with_its_curve():
    first = build([0.1], steps=60, skip_begin=0)
    losses_of(first, falling_then_exploding())
    state = saved(first)
    assert state["phase"] == "done" and len(state["curve_lrs"]) == state["sweep_step"]
    second = build([0.1], steps=60, skip_begin=0)
    second.load_state_dict(state)
    assert second.curve() == first.curve() and second.suggested_lr == first.suggested_lr
    assert futures(second) == futures(first)


def put(path: str, value: Any):
    *parents, last = path.split(".")

    def mutate(state: dict[str, Any]) -> None:
        for part in parents:
            state = state[int(part)] if part.isdigit() else state[part]
        state[int(last) if last.isdigit() else last] = value  # type: ignore[index]

    return mutate


def drop(key: str):
    return lambda state: state.pop(key)


SWEEP, DONE = "sweep", "done"
HOSTILE = [
    (SWEEP, put("phase", "over"), "phase must be 'sweep' or 'done', got 'over'"),
    (SWEEP, put("sweep_step", -1), "sweep_step must be an integer from 0 to 2**53, got -1"),
    (SWEEP, put("sweep_step", 2.0), "sweep_step must be an integer from 0 to 2**53, got 2.0"),
    (SWEEP, put("avg_loss", math.nan), "avg_loss must be a finite number, got nan"),
    (SWEEP, put("avg_loss", "1"), "avg_loss must be a finite number, got '1'"),
    (SWEEP, put("best_loss", math.inf), "best_loss must be a finite number, got inf"),
    (SWEEP, put("best_loss", None), "best_loss must be null before the first point"),
    (SWEEP, put("curve_lrs", 1.0), "curve_lrs must be a list of at most 20 numbers (steps)"),
    (SWEEP, put("curve_lrs", [0.1] * 21), "curve_lrs must be a list of at most 20 numbers"),
    (SWEEP, put("curve_lrs.1", 0.0), "curve_lrs[1] must be a finite number > 0, got 0.0"),
    (SWEEP, put("curve_lrs.0", True), "curve_lrs[0] must be a finite number > 0, got True"),
    (SWEEP, put("curve_losses.2", math.nan), "curve_losses[2] must be a finite number, got nan"),
    (SWEEP, put("curve_losses", [1.0]), "curve_lrs and curve_losses must be as long, got 5 and 1"),
    (SWEEP, put("sweep_step", 4), "the curve must have at most 4 point(s) at sweep_step 4"),
    (SWEEP, put("suggested_lr", 0.1), "suggested_lr must be null while the sweep runs"),
    (SWEEP, put("suggested_lr", -0.1), "suggested_lr must be a finite number > 0, got -0.1"),
    (SWEEP, put("stopped_early", 1), "stopped_early must be true or false, got 1"),
    (SWEEP, put("stopped_early", True), "stopped_early must be false while the sweep runs"),
    (SWEEP, put("then", {"lrs": [0.1, 0.1]}), "then must be null while the sweep runs"),
    (SWEEP, put("then", [1]), "then must be an object, got [1]"),
    (SWEEP, drop("curve_lrs"), "range_test state: missing curve_lrs"),
    (SWEEP, put("lrs", [0.1, 0.1]), "range_test state: unknown field(s) 'lrs'"),
    (DONE, put("then", None), "then must be an object (then's state) once the sweep is done"),
    (DONE, put("then.last_epoch", -3), "range_test state: then: step state: last_epoch must be"),
    (DONE, put("then.lrs", [0.1]), "range_test state: then: step state: lrs must be a list of 2"),
    (DONE, put("sweep_step", 0), "sweep_step must be at least 1 once the sweep is done"),
    (DONE, put("curve_lrs", [0.1] * 3), "curve_lrs and curve_losses must be as long"),
    (DONE, put("sweep_step", 19), "the curve must have at most 19 point(s) at sweep_step 19"),
]


@pytest.mark.parametrize(
    ("phase", "mutate", "message"), HOSTILE, ids=[m[:40] for _, _, m in HOSTILE]
)
def test_a_hostile_state_is_refused_in_one_line_and_changes_nothing(phase, mutate, message):
    spec = {"steps": 20, "skip_begin": 0, "then": {"kind": "step", "step_size": 3}}
    policy = build([0.1, 0.05], **spec)
    losses_of(policy, [1.0, 0.8, 0.6, 0.5, 0.45] + ([0.4] * 15 if phase == DONE else []))
    assert policy.phase == phase
    before = saved(policy)
    lrs = policy.lrs
    state = copy.deepcopy(before)
    mutate(state)
    with pytest.raises(SpecError) as refused:
        policy.load_state_dict(state)
    text = str(refused.value)
    assert message in text
    assert "\n" not in text and text.startswith("range_test state: ")
    assert saved(policy) == before and policy.lrs == lrs


JSON_VALUES = json_values(json_leaves("sweep", "done"), max_size=4)


@examples(300)
@given(data=st.data())
def test_a_random_state_loads_or_is_refused_and_never_steps_to_a_bad_lr(data):
    name = data.draw(st.sampled_from(sorted(STATE_SPECS)), label="spec")
    stop = data.draw(st.sampled_from([0, 3, 30, 45, 50]), label="stop")
    policy = build([0.1, 0.05], **STATE_SPECS[name])
    for loss in falling_then_exploding(stop):
        policy.step({"loss": loss, "val_loss": loss})
    state: Any = saved(policy)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(paths(state)), label="path")
        state = replaced(state, path, data.draw(JSON_VALUES, label="value"))
    fresh = build([0.1, 0.05], **STATE_SPECS[name])
    try:
        fresh.load_state_dict(state)
    except SpecError as refused:
        assert "\n" not in str(refused)
        return
    own_fields_finite(fresh)
    for record in ({"loss": 0.5, "val_loss": 0.5}, {}, {"loss": 1e300}, {"loss": math.nan}) * 10:
        try:
            lrs = fresh.step(record)
            fresh.observe(record)
        except ScheduleExhausted:
            break
        assert len(lrs) == 2 and all(math.isfinite(lr) for lr in lrs)
        own_fields_finite(fresh)


def own_fields_finite(policy: Policy) -> None:
    """No NaN or infinity in the range test's own fields (then's state is its
    own: a plateau's best starts at infinity)."""
    state = policy.state_dict()
    state.pop("then")
    json.dumps(state, allow_nan=False)


# --- specs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"max_lr": 1e-9}, "range_test: max_lr (1e-09) must be above min_lr (1e-08)"),
        ({"min_lr": 0.0}, "range_test.min_lr: Input should be greater than 0"),
        ({"min_lr": 1e-300, "max_lr": 1e300}, "max_lr / min_lr (1e+300 / 1e-300) must be a finite"),
        ({"steps": 0}, "range_test.steps: Input should be greater than or equal to 1"),
        ({"steps": 10_001}, "range_test.steps: Input should be less than or equal to 10000"),
        ({"steps": 10.0}, "range_test.steps: Input should be a valid integer"),
        ({"mode": "log"}, "range_test.mode: Input should be 'exponential' or 'linear'"),
        ({"metric": ""}, "range_test.metric: String should have at least 1 character"),
        ({"smoothing": 1.0}, "range_test.smoothing: Input should be less than 1"),
        ({"smoothing": -0.1}, "range_test.smoothing"),
        ({"diverge": 1.0}, "range_test.diverge"),
        ({"diverge": math.nan}, "range_test.diverge"),
        ({"suggest": "valley"}, "range_test.suggest: Input should be 'steepest' or 'minimum'"),
        ({"skip_begin": -1}, "range_test.skip_begin"),
        ({"restore": 1}, "range_test.restore: Input should be a valid boolean"),
        ({"then": {"kind": "range_test"}}, "range_test.then: a range_test cannot be inside"),
        ({"then": {"kind": "cosine"}}, "range_test.then.cosine.T_max: required field is missing"),
        ({"then": {"kind": "nope"}}, "range_test.then.kind: unknown policy kind 'nope'"),
        (
            {"then": {"kind": "step", "step_size": 2}, "then_state": {}},
            "then_state is only for suggest_only",
        ),
        ({"then_base_lrs": [0.1]}, "then_base_lrs is only for suggest_only"),
        ({"suggest_only": True, "then_state": {}}, "then_state needs then"),
        ({"suggest_only": True, "then_base_lrs": [0.0]}, "range_test.then_base_lrs.0"),
        ({"suggest_only": True, "then_base_lrs": []}, "range_test.then_base_lrs"),
        ({"spam": 1}, "range_test.spam: unknown field"),
    ],
)
def test_a_bad_spec_is_one_line_naming_field_and_rule(spec, expected):
    with pytest.raises(SpecError) as caught:
        parse_policy({"kind": "range_test", **spec})
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_range_test_is_no_stage_of_a_sequential():
    with pytest.raises(SpecError, match=r"policies\.0: a range_test cannot be inside"):
        parse_policy({"kind": "sequential", "policies": [{"kind": "range_test"}], "milestones": []})


@pytest.mark.parametrize(
    ("spec", "base_lrs", "expected"),
    [
        (
            {"suggest_only": True, "then_base_lrs": [0.1, 0.2]},
            [0.1],
            "range_test.then_base_lrs: expected 1 value(s), one per param group, got 2",
        ),
        (
            {"then": {"kind": "cyclic", "base_lr": [0.01, 0.01], "max_lr": 0.1}},
            [0.1],
            "range_test: then: cyclic.base_lr: expected 1 value(s)",
        ),
        (
            {"suggest_only": True, "then": {"kind": "cosine", "T_max": 5}, "then_state": {"x": 1}},
            [0.1],
            "range_test.then_state: cosine state: missing lrs, last_epoch",
        ),
        ({"max_lr": 1e300, "min_lr": 1.0}, [1e-10, 1.0], "range_test: min_lr / 10 to max_lr"),
        ({"min_lr": 1e-300, "max_lr": 1.0}, [1.0, 1e-30], "range_test: min_lr / 10 to max_lr"),
    ],
)
def test_a_spec_that_does_not_fit_the_groups_is_refused_when_built(spec, base_lrs, expected):
    with pytest.raises(SpecError) as caught:
        parse_policy({"kind": "range_test", **spec}).build(base_lrs)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_a_suggestion_then_cannot_start_from_falls_back_to_the_base_lrs():
    # exponential's first step must stay finite: from the base LRs it does,
    # from a suggestion near max_lr it would not
    then = {"kind": "exponential", "gamma": 1e300}
    spec = {"min_lr": 1e-9, "max_lr": 1e10, "steps": 3, "suggest": "minimum", "then": then}
    policy = build([1e-9], **spec)
    losses_of(policy, [3.0, 2.0, 0.1])
    assert policy.suggested_lr is not None and policy.suggested_lr > 1e8
    assert policy.lrs == [1e-9]  # then's step 0, from the base LRs
    assert "(then cannot start from the suggestion)" in policy.decided.reason
    second = build([1e-9], **spec)
    second.load_state_dict(saved(policy))
    assert second.lrs == policy.lrs
    assert second.step() == policy.step() == [1e-9 * 1e300]


def test_defaults_are_lightnings():
    import inspect

    from lightning.pytorch.tuner import Tuner

    spec = RangeTestSpec()
    signature = inspect.signature(Tuner.lr_find).parameters
    assert spec.min_lr == signature["min_lr"].default
    assert spec.max_lr == signature["max_lr"].default
    assert spec.steps == signature["num_training"].default
    assert spec.mode == signature["mode"].default
    assert spec.diverge == signature["early_stop_threshold"].default
    assert spec.smoothing == inspect.signature(lr_finder._LRCallback).parameters["beta"].default
    suggestion = inspect.signature(lr_finder._LRFinder.suggestion).parameters
    assert (spec.skip_begin, spec.skip_end) == (
        suggestion["skip_begin"].default,
        suggestion["skip_end"].default,
    )


def test_a_long_sweep_is_linear_in_its_steps():
    """10_000 steps with the loss on each: the curve grows in place."""
    policy = build(steps=10_000, diverge=None)
    for k in range(10_000):
        policy.step({"loss": 1.0 + (k % 7) * 1e-3})
    assert policy.phase == "done" and len(policy.curve_lrs) == 10_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        json.dumps(policy.state_dict(), allow_nan=False)
