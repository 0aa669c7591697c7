"""What the hook does for a range test and a guard (client/hook.py,
client/sweep_copy.py): the copy of the training state a sweep puts back, and
the guard's trip shown to the loop. Commands are handed to the pilot as the
daemon would send them (``_receive``), made by the same policy stepped with
the metrics, as the daemon's engine does; no daemon runs here."""

from __future__ import annotations

import math
from typing import Any

import torch
from procs import free_address, train_step, two_groups

import lrpilot
from lrpilot.policies import Trip, parse_policy
from lrpilot.protocol import LRCommand

GUARD = {
    "kind": "guard",
    "inner": {"kind": "cosine", "T_max": 100},
    "hold": 3,
    "cut": 0.5,
}


def command(run: str, version: int, step: int, policy: Any) -> LRCommand:
    """The daemon's command for a decision on record ``step``: due at the next."""
    return LRCommand(
        run=run,
        version=version,
        effective_step=step + 1,
        state_step=step,
        lrs=policy.lrs,
        policy_state=policy.state_dict(),
    )


def test_a_trip_shows_after_the_step_that_applied_it_and_only_then():
    optimizer = two_groups()
    daemon_side = parse_policy(GUARD).build([0.1, 0.02])
    pilot = lrpilot.attach(optimizer, run="trip", policy=GUARD, daemon=free_address())
    try:
        for _ in range(5):
            train_step(optimizer)
            pilot.step(loss=1.0)
            daemon_side.step({"loss": 1.0})
            assert pilot.tripped is None
        train_step(optimizer)
        daemon_side.step({"loss": math.nan})  # step 6's loss: the guard trips
        assert daemon_side.decided is not None and daemon_side.decided.cause == "guard:nan"
        pilot._receive(command("trip", 1, 6, daemon_side))
        pilot.step(loss=math.nan)  # applies it: due before step 7
        assert pilot.tripped == Trip(step=6, cause="guard:nan", metric="loss", value=None)
        assert pilot.trips == 1
        # Cut for the hold, on the cosine where it stands.
        cosine = parse_policy(GUARD["inner"]).build([0.1, 0.02])
        for _ in range(6):
            cosine.step()
        assert pilot.lrs == [lr * 0.5 for lr in cosine.lrs]
        train_step(optimizer)
        pilot.step(loss=1.0)
        assert pilot.tripped is None  # shown once: by the call that applied it
        assert pilot.trips == 1
        for _ in range(3):
            train_step(optimizer)
            pilot.step(loss=1.0)
        for _ in range(3 + 1):
            cosine.step()
        assert pilot.lrs == cosine.lrs  # handed back after the hold
    finally:
        pilot.close()


def test_a_trip_applied_by_the_optimizers_pre_hook_shows_after_the_next_step_call():
    # With steps="optimizer" a due command can be applied inside
    # optimizer.step() (the pre-hook), before pilot.step() is called.
    optimizer = two_groups()
    daemon_side = parse_policy(GUARD).build([0.1, 0.02])
    pilot = lrpilot.attach(optimizer, run="trip-hook", policy=GUARD, daemon=free_address())
    try:
        for _ in range(3):
            train_step(optimizer)
            pilot.step(loss=1.0)
            daemon_side.step({"loss": 1.0})
        daemon_side.step({"loss": math.inf})  # step 4's loss
        pilot._receive(command("trip-hook", 1, 4, daemon_side))
        train_step(optimizer)  # step 4: its record goes out in the next pre-hook
        train_step(optimizer)  # step 5's pre-hook records 4 and applies the command
        assert pilot.trips == 1
        pilot.step(loss=1.0)
        assert pilot.tripped is not None and pilot.tripped.cause == "guard:nan"
        train_step(optimizer)
        pilot.step(loss=1.0)
        assert pilot.tripped is None
    finally:
        pilot.close()


def test_a_command_without_a_new_trip_shows_none():
    optimizer = two_groups()
    daemon_side = parse_policy(GUARD).build([0.1, 0.02])
    pilot = lrpilot.attach(optimizer, run="no-trip", policy=GUARD, daemon=free_address())
    try:
        train_step(optimizer)
        daemon_side.step({"loss": 1.0})
        pilot._receive(command("no-trip", 1, 1, daemon_side))  # a state, no trip in it
        pilot.step(loss=1.0)
        assert pilot.tripped is None and pilot.trips == 0
        assert pilot.stats.commands_applied == 1
    finally:
        pilot.close()


def state_of(optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict[str, Any]]:
    params = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    state = {
        key: {name: value.clone() for name, value in entry.items()}
        for key, entry in optimizer.state_dict()["state"].items()
    }
    return params, state


SWEEP = {
    "kind": "range_test",
    "min_lr": 1e-4,
    "max_lr": 1.0,
    "steps": 20,
    "skip_begin": 2,
    "then": {"kind": "cosine", "T_max": 100},
}


def sweep(optimizer: torch.optim.Optimizer, spec: dict, run: str, model: Any = None):
    """Attach a range test, train its steps (the loss falls, then rises),
    decide as the daemon does and hand the pilot the decision."""
    daemon_side = parse_policy(spec).build([0.1, 0.02])
    pilot = lrpilot.attach(optimizer, run=run, policy=spec, daemon=free_address(), model=model)
    losses = [2.0 - 0.08 * i if i < 15 else 0.8 + 0.3 * (i - 15) for i in range(spec["steps"])]
    for loss in losses:
        if model is not None:
            model(torch.randn(4, 3))  # training mode: BatchNorm's statistics move
        train_step(optimizer)
        pilot.step(loss=loss)
        daemon_side.step({"loss": loss})
    assert daemon_side.decided is not None and not daemon_side.sweeping
    pilot._receive(command(run, 1, spec["steps"], daemon_side))
    return pilot, daemon_side


def test_the_sweep_puts_parameters_and_optimizer_state_back_bit_for_bit():
    optimizer = two_groups(torch.optim.Adam)
    for _ in range(3):  # a run with state already: Adam's moments and step counts
        train_step(optimizer)
    params, state = state_of(optimizer)
    pilot, daemon_side = sweep(optimizer, SWEEP, "sweep")
    try:
        assert not all(
            torch.equal(a, b)
            for a, b in zip(params, (p for g in optimizer.param_groups for p in g["params"]))
        ), "the sweep trained"
        assert pilot._sweep is not None
        train_step_loss = 1.0
        # The decision is due before step 21: the step() that applies it
        # puts the copy back before that update.
        pilot.step(loss=train_step_loss)
        after_params, after_state = state_of(optimizer)
        assert all(torch.equal(a, b) for a, b in zip(params, after_params))
        assert after_state.keys() == state.keys()
        for key in state:
            for name in state[key]:
                assert torch.equal(state[key][name], after_state[key][name]), (key, name)
        assert pilot._sweep is None
        # Then the cosine from the suggestion (the groups keep their ratio).
        suggested = daemon_side.suggested_lr
        assert suggested is not None
        assert pilot.lrs == daemon_side.lrs
        assert pilot.lrs[0] == suggested and math.isclose(pilot.lrs[1], suggested * 0.2)
        assert [g["lr"] for g in optimizer.param_groups] == pilot.lrs
    finally:
        pilot.close()


def test_the_model_s_buffers_come_back_too_when_attach_has_the_model():
    model = torch.nn.BatchNorm1d(3)
    optimizer = torch.optim.SGD(
        [{"params": list(model.parameters()), "lr": 0.1}, {"params": [], "lr": 0.02}],
        momentum=0.9,
    )
    before = {name: b.clone() for name, b in model.named_buffers()}
    pilot, _ = sweep(optimizer, SWEEP, "sweep-buffers", model=model)
    try:
        assert not torch.equal(model.running_mean, before["running_mean"])
        pilot.step(loss=1.0)
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, before[name]), name
    finally:
        pilot.close()


def test_restore_false_makes_no_copy_and_keeps_the_sweeps_updates():
    optimizer = two_groups(torch.optim.SGD)
    params, _ = state_of(optimizer)
    pilot, _ = sweep(optimizer, {**SWEEP, "restore": False}, "no-restore")
    try:
        assert pilot._sweep is None
        pilot.step(loss=1.0)
        after, _ = state_of(optimizer)
        assert not any(torch.equal(a, b) for a, b in zip(params, after))
    finally:
        pilot.close()
