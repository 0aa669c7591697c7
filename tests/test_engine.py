"""The policy engine on its own (daemon/service/engine.py): each change it makes is
one value (the command, the LRs before, the cause, the actor) that every
reader takes, and a policy's decision arrives structured (cause + reason)."""

from __future__ import annotations

import pytest

from lrpilot.daemon.service.engine import Change, PolicyEngine, StepGapTooLarge
from lrpilot.policies import Decision, parse_policy

PLATEAU = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}


def engine(spec=PLATEAU, lead: int = 0) -> PolicyEngine:
    return PolicyEngine("r", parse_policy(spec), [0.1], lead_steps=lead)


def test_a_decision_is_a_change_with_its_cause_and_the_lrs_before():
    e = engine()
    assert e.on_step(1, {}) is None
    assert e.on_report(1, {"val_loss": 1.0}) is None
    e.on_step(2, {})
    change = e.on_report(2, {"val_loss": 2.0})
    assert isinstance(change, Change)
    assert (change.cause, change.actor, change.old_lrs) == ("plateau", "policy", [0.1])
    assert change.command.lrs == [0.05] and change.command.version == 1
    assert change.command.reason.startswith("plateau: val_loss has not improved")
    assert e.changes == {"plateau": 1}
    assert isinstance(e.policy.decided, Decision)


def test_operator_changes_carry_their_cause_and_the_lrs_they_replace():
    e = engine()
    e.on_step(1, {})
    held = e.hold([0.3], "set-lr 0.3", "alice", lead=2)
    assert (held.cause, held.actor, held.old_lrs, held.command.lrs) == (
        "set_lr",
        "alice",
        [0.1],
        [0.3],
    )
    assert held.command.effective_step == 1 + 1 + 2
    released = e.release("alice", lead=0)
    assert (released.cause, released.old_lrs, released.command.lrs) == ("resume", [0.3], [0.1])
    switched = e.switch(parse_policy({"kind": "exponential", "gamma": 0.5}), "x", "bob", lead=3)
    assert (switched.cause, switched.old_lrs) == ("policy_switch", [0.1])
    # The new policy starts at its step 0 where the command takes effect.
    assert switched.command.state_step == switched.command.effective_step - 1 == e.starts_at - 1
    assert e.changes == {"set_lr": 1, "resume": 1, "policy_switch": 1}
    assert [held.command.version, released.command.version, switched.command.version] == [1, 2, 3]


def test_no_decision_is_sent_while_an_operator_holds_the_lrs():
    e = engine()
    e.hold([0.3], "set-lr", "alice", lead=0)
    e.on_report(0, {"val_loss": 1.0})
    assert e.on_report(0, {"val_loss": 2.0}) is None
    assert e.lrs == [0.3]


def test_a_gap_past_the_limit_is_refused_not_stepped_through():
    e = engine({"kind": "cosine", "T_max": 10})
    e.max_gap = 100
    e.on_step(1, {})
    with pytest.raises(StepGapTooLarge, match="the limit is 100"):
        e.on_step(1 + 102, {})
    assert e.step == 1
