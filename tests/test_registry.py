"""The run registry (daemon/service/registry.py) on its own: runs made from a
hello, the sessions (one per connected rank) that join and end, which rank
drives, how fast each rank steps and how far ahead a command is scheduled
for them, and a run's row for the store and back, its ledger included. No
daemon, no sockets, no clock: every time is passed in."""

from __future__ import annotations

import time

import pytest

from lrpilot.daemon.service.engine import UNBOUNDED_GAP
from lrpilot.daemon.service.ledger import RunLedger
from lrpilot.daemon.service.registry import (
    COMMAND_LEAD_SECONDS,
    RATE_WEIGHT,
    Run,
    RunRegistry,
    Session,
)
from lrpilot.protocol import ClientStats, GroupInfo, Hello

# Cuts at every report that is no better than the best: a decision on demand.
PLATEAU = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.5}
GROUPS = [GroupInfo(name="body", lr=0.1), GroupInfo(name="head", lr=0.05)]


def hello(run: str = "r", rank: int = 0, **fields) -> Hello:
    return Hello(run=run, rank=rank, groups=GROUPS, policy=PLATEAU, **fields)


def joined(registry: RunRegistry, run: Run, rank: int, now: float = 0.0, **fields) -> Session:
    """Rank ``rank`` of ``run`` says hello from its own client."""
    fields.setdefault("world_size", max(run.world_size, rank + 1))
    identity = f"{run.run_id}/{rank}".encode()
    return registry.join(identity, run, hello(run.run_id, rank, **fields), now)


def driving_ledger() -> RunLedger:
    return RunLedger(driver=b"rank0".hex(), seq=7, stored_seq=5, committed_seq=3)


# --- runs and sessions ------------------------------------------------------------------


def test_a_new_run_is_what_its_hello_says():
    registry = RunRegistry(lead_steps=2, max_gap=50)
    before = time.time()
    run = registry.new_run(hello(world_size=4, step=30, applied_version=2))
    assert registry.runs == {"r": run}
    assert (run.group_names, run.base_lrs, run.world_size) == (["body", "head"], [0.1, 0.05], 4)
    assert run.requested_policy == PLATEAU
    assert before <= run.created <= time.time()
    assert run.sessions == {} and run.driver is None and run.ended is None
    # The engine takes over where the client is, with the registry's settings.
    engine = run.engine
    assert (engine.step, engine.version, engine.lrs) == (30, 2, [0.1, 0.05])
    assert engine.spec is not None and engine.spec.kind == "plateau"
    assert (engine.lead_steps, engine.max_gap) == (2, 50)
    assert run.ledger == RunLedger()  # nobody drives it yet


def test_the_policy_is_built_from_the_base_lrs_the_hello_gives():
    registry = RunRegistry()
    run = registry.new_run(hello(policy_base_lrs=[0.4, 0.2]))
    assert run.base_lrs == [0.1, 0.05]  # the groups' LRs, as the script set them
    assert run.engine.base_lrs == [0.4, 0.2]  # an operator's switch rebased the policy
    with pytest.raises(ValueError, match="policy_base_lrs has 1 LRs for 2 param groups"):
        registry.new_run(hello("other", policy_base_lrs=[0.4]))
    assert "other" not in registry.runs


def test_join_adds_a_session_and_end_session_ends_the_run_with_its_last_one():
    registry = RunRegistry()
    run = registry.new_run(hello(world_size=2))
    run.ended = 5.0  # it had ended before this training came back
    first = joined(registry, run, 0, now=10.0, world_size=2, host="gpu-1", pid=41, sync=True)
    assert run.ended is None
    assert registry.sessions == {b"r/0": first} and run.sessions == {0: first}
    assert (first.run, first.rank, first.host, first.pid, first.sync) == ("r", 0, "gpu-1", 41, True)
    assert first.last_seen == 10.0
    assert registry.session(b"r/0") == (run, first)
    assert registry.session(b"nobody") is None
    second = joined(registry, run, 1, world_size=2)
    assert run.sessions == {0: first, 1: second} and run.multi_rank
    assert registry.active_count() == 1

    assert registry.end_session(b"r/0", 20.0) is run
    assert run.sessions == {1: second} and run.ended is None  # rank 1 is still there
    assert registry.end_session(b"r/0", 20.0) is None  # ended already
    before = time.time()
    assert registry.end_session(b"r/1", 21.0) is run
    assert run.sessions == {} and registry.sessions == {}
    assert run.ended is not None and before <= run.ended <= time.time()  # wall clock
    assert registry.active_count() == 0


def test_a_hello_says_what_the_session_starts_from():
    registry = RunRegistry()
    run = registry.new_run(hello(step=40, applied_version=3))
    session = joined(registry, run, 0, world_size=3, step=40, applied_version=3)
    assert (session.step, session.applied_version) == (40, 3)
    assert (session.steps_per_s, session.applied_step, session.late_by) == (0.0, 0, 0)
    assert session.stats == ClientStats()
    assert run.world_size == 3  # torchelastic may bring a run back at another size


def test_silent_names_the_sessions_not_heard_from_for_longer_than_the_timeout():
    registry = RunRegistry()
    run = registry.new_run(hello())
    joined(registry, run, 0, now=100.0)
    joined(registry, run, 1, now=104.0)
    assert registry.silent(now=110.0, timeout=10.0) == []  # 10 s is not longer than 10 s
    assert registry.silent(now=110.5, timeout=10.0) == [b"r/0"]
    registry.sessions[b"r/0"].last_seen = 110.0  # it sent something
    assert registry.silent(now=115.0, timeout=10.0) == [b"r/1"]


def test_the_driver_is_the_lowest_rank_connected():
    registry = RunRegistry()
    run = registry.new_run(hello(world_size=3))
    two = joined(registry, run, 2)
    assert run.driver is two
    one = joined(registry, run, 1)
    assert run.driver is one
    zero = joined(registry, run, 0)
    assert run.driver is zero
    registry.end_session(b"r/0", 1.0)
    assert run.driver is one  # rank 0 left (a restart): rank 1's metrics drive until it is back
    registry.end_session(b"r/1", 1.0)
    registry.end_session(b"r/2", 1.0)
    assert run.driver is None


def test_a_second_hello_from_one_client_for_another_run_ends_its_old_session():
    registry = RunRegistry()
    old, new = registry.new_run(hello("old")), registry.new_run(hello("new"))
    registry.join(b"client", old, hello("old"), 1.0)
    assert old.sessions and old.ended is None
    session = registry.join(b"client", new, hello("new"), 2.0)
    assert old.sessions == {} and old.ended is not None  # not kept active forever
    assert new.sessions == {0: session} and registry.sessions == {b"client": session}
    assert registry.session(b"client") == (new, session)


def test_a_new_client_for_a_rank_takes_it_over_from_the_one_that_had_it():
    """A rank that restarted says hello from a new socket before the daemon
    noticed its old one went silent: the old identity is forgotten, so it
    cannot end the new session later."""
    registry = RunRegistry()
    run = registry.new_run(hello())
    registry.join(b"before", run, hello(), 1.0)
    after = registry.join(b"after", run, hello(), 2.0)
    assert run.sessions == {0: after} and registry.sessions == {b"after": after}
    assert registry.end_session(b"before", 3.0) is None
    assert run.sessions == {0: after} and run.ended is None


# --- step rates and command leads -------------------------------------------------------


def test_saw_step_moves_the_rate_a_weighted_step_towards_the_measured_one():
    session = Session(b"id", "r", 0, "", 0, False, last_seen=0.0)
    session.saw_step(10, 100.0)  # the first: nothing to measure from
    assert (session.step, session.steps_per_s) == (10, 0.0)
    session.saw_step(110, 101.0)  # 100 steps/s
    assert session.steps_per_s == pytest.approx(RATE_WEIGHT * 100)
    first = session.steps_per_s
    # 10 ms later: measured from 101.0 all the same, which stays the mark
    # (a rate over a few ms is noise)...
    session.saw_step(111, 101.01)
    second = first + RATE_WEIGHT * (1 / 0.01 - first)
    assert (session.step, session.steps_per_s) == (111, pytest.approx(second))
    session.saw_step(130, 101.1)  # ...so 20 steps in 100 ms
    third = second + RATE_WEIGHT * (20 / 0.1 - second)
    assert session.steps_per_s == pytest.approx(third)
    # A step back (a checkpoint reloaded) measures nothing; the rate stands.
    session.saw_step(50, 102.0)
    assert (session.step, session.steps_per_s) == (50, pytest.approx(third))
    session.saw_step(60, 102.0)  # no time passed: nothing to divide by
    assert (session.step, session.steps_per_s) == (60, pytest.approx(third))


def test_lead_steps_is_the_fastest_rank_over_the_seconds_and_at_least_one():
    registry = RunRegistry()
    run = registry.new_run(hello(world_size=2))
    assert run.lead_steps(0.1) == 1  # no ranks, no rate
    slow, fast = joined(registry, run, 0), joined(registry, run, 1)
    slow.steps_per_s, fast.steps_per_s = 100.0, 436.0
    assert run.lead_steps(0.1) == 44
    fast.steps_per_s = 4.0
    assert run.lead_steps(0.1) == 10
    slow.steps_per_s = fast.steps_per_s = 1.0
    assert run.lead_steps(0.1) == 1


def test_lock_step_ranks_get_a_command_one_step_ahead_plus_the_extra():
    registry = RunRegistry()
    run = registry.new_run(hello(world_size=2, step=10))
    for rank in (0, 1):
        joined(registry, run, rank, world_size=2, step=10, sync=True).steps_per_s = 1000.0
    assert run.command_lead() == 1  # however fast they go: each waits for its answer
    assert run.command_lead(extra=3) == 4  # --command-lead-steps


def test_async_ranks_get_a_command_the_run_steps_of_the_lead_seconds_ahead():
    registry = RunRegistry()
    run = registry.new_run(hello(world_size=2, step=10))
    driver = joined(registry, run, 0, world_size=2, step=10, sync=True)
    other = joined(registry, run, 1, world_size=2, step=10, sync=False)
    driver.steps_per_s, other.steps_per_s = 150.0, 300.0
    lead = round(300.0 * COMMAND_LEAD_SECONDS)
    assert lead > 1
    assert run.command_lead() == lead  # one rank that does not wait is enough
    assert run.command_lead(extra=2) == lead + 2
    # No rank connected: the least lead there is.
    for rank in (0, 1):
        registry.end_session(f"r/{rank}".encode(), 1.0)
    assert run.command_lead() == 1


@pytest.mark.parametrize("sync", [True, False], ids=["lock-step", "async"])
def test_a_rank_ahead_of_the_driver_adds_its_distance_to_the_lead(sync):
    """The lead counts from the driver's step (the engine's); a rank already
    answered for a later step would hear the command late without it."""
    registry = RunRegistry()
    run = registry.new_run(hello(world_size=2, step=10))
    for rank in (0, 1):
        joined(registry, run, rank, world_size=2, step=10, sync=sync).steps_per_s = 20.0
    at_the_driver = run.command_lead(extra=1)
    run.sessions[1].step = 13
    assert run.step == 13 and run.engine.step == 10
    assert run.command_lead(extra=1) == at_the_driver + 3
    # The driver itself ahead of its last folded record counts the same way.
    run.sessions[1].step = 10
    run.sessions[0].step = 12
    assert run.command_lead(extra=1) == at_the_driver + 2
    # A rank behind the driver adds nothing.
    run.sessions[0].step = run.sessions[1].step = 8
    assert run.command_lead(extra=1) == at_the_driver


# --- the store's row --------------------------------------------------------------------


def stepped_run(registry: RunRegistry) -> Run:
    """A run whose policy has state of its own: a best, a decision, a hold."""
    run = registry.new_run(hello(world_size=2))
    engine = run.engine
    engine.on_step(1, {"loss": 1.0})
    engine.on_report(1, {"val_loss": 2.0})
    engine.on_step(2, {"loss": 0.9})
    assert engine.on_report(2, {"val_loss": 3.0}) is not None  # a cut: version 1
    engine.hold([0.01, 0.01], "set-lr", "tester", lead=1)
    run.ledger = driving_ledger()
    run.ended = 1234.5
    return run


def test_a_run_comes_back_from_its_row_as_it_was():
    registry = RunRegistry()
    run = stepped_run(registry)
    row = run.row(now=2000.0)
    assert row["rev"] == 1 and row["updated"] == 2000.0
    assert (row["driver"], row["seq"], row["stored_seq"]) == (b"rank0".hex(), 7, 5)
    assert (row["step"], row["version"], row["held"]) == (2, 2, [0.01, 0.01])

    again = Run.from_row(row, lead_steps=3, max_gap=40)
    assert again.row(now=2000.0) == {**row, "rev": 2}  # the same run, one row later
    assert (again.run_id, again.group_names, again.base_lrs) == ("r", ["body", "head"], [0.1, 0.05])
    assert (again.world_size, again.created, again.ended) == (2, run.created, 1234.5)
    assert again.requested_policy == PLATEAU
    assert again.engine.policy.state_dict() == run.engine.policy.state_dict()
    assert again.engine.lrs == [0.01, 0.01]  # still held
    assert (again.engine.lead_steps, again.engine.max_gap) == (3, 40)
    assert again.sessions == {}  # no rank is connected to a restored run
    # What the row says is stored was committed with it.
    assert again.ledger == RunLedger(b"rank0".hex(), seq=7, stored_seq=5, committed_seq=5)


def test_a_row_written_on_its_own_says_only_what_is_committed():
    """Outside a tick the row goes without the records handed to the store
    with it: a restart must not skip records the store never got."""
    run = stepped_run(RunRegistry())
    row = run.row(now=1.0, committed_only=True)
    assert row["stored_seq"] == 3 and row["seq"] == 7
    assert run.ledger == driving_ledger()  # the run's own ledger is untouched
    assert run.row(now=2.0)["rev"] == row["rev"] + 1  # every row orders after the last


def test_a_run_restored_without_an_end_ended_when_the_daemon_stopped():
    registry = RunRegistry()
    run = registry.new_run(hello())
    joined(registry, run, 0)
    row = run.row(now=1.0)
    assert row["ended"] is None  # it was training when its row was written
    before = time.time()
    again = Run.from_row(row)
    assert again.ended is not None and before <= again.ended <= time.time()
    assert (again.engine.lead_steps, again.engine.max_gap) == (0, UNBOUNDED_GAP)


def test_regroup_takes_the_clients_groups_and_forgets_the_driver():
    registry = RunRegistry()
    run = stepped_run(registry)
    last = run.engine.last_change
    groups = [GroupInfo(name=name, lr=0.2) for name in ("a", "b", "c")]
    registry.regroup(run, Hello(run="r", groups=groups, policy=PLATEAU, applied_version=1))
    assert (run.group_names, run.base_lrs) == (["a", "b", "c"], [0.2, 0.2, 0.2])
    assert run.engine.lrs == [0.2, 0.2, 0.2]
    assert run.engine.held is None  # a hold for the old groups ends
    assert run.engine.version == 2 and run.engine.last_change is last  # versions go on
    assert run.ledger == RunLedger()  # whoever drives next numbers its records from 1
    assert run.row(now=1.0)["version"] == 2


def test_regroup_keeps_the_clients_version_when_it_is_ahead():
    registry = RunRegistry()
    run = stepped_run(registry)
    registry.regroup(run, Hello(run="r", groups=GROUPS[:1], applied_version=9))
    assert run.engine.version == 9 and run.group_names == ["body"]


def test_restart_is_what_the_script_says_now_and_forgets_the_driver():
    registry = RunRegistry()
    run = stepped_run(registry)
    run.last_metrics["loss"] = 0.9
    run.loss_history.append(0.9)
    old_created = run.created = 10.0
    policy = {"kind": "step", "step_size": 5}
    registry.restart(run, Hello(run="r", groups=GROUPS, world_size=4, policy=policy))
    assert run.created > old_created
    assert (run.world_size, run.requested_policy) == (4, policy)
    assert run.engine.spec.kind == "step" and run.engine.held is None
    assert (run.engine.step, run.engine.version) == (0, 0)
    assert run.ledger == RunLedger()
    assert run.last_metrics == {} and list(run.loss_history) == []


def test_a_restart_refused_for_its_policy_changes_nothing():
    registry = RunRegistry()
    run = stepped_run(registry)
    engine, row = run.engine, run.row(now=1.0)
    with pytest.raises(ValueError):
        registry.restart(run, Hello(run="r", groups=GROUPS, policy={"kind": "no-such-kind"}))
    assert run.engine is engine and run.ledger == driving_ledger()
    assert run.row(now=1.0) == {**row, "rev": row["rev"] + 1}


def test_the_loss_is_sampled_only_while_a_rank_is_connected():
    registry = RunRegistry()
    run = registry.new_run(hello())
    run.last_metrics.update(val_loss=2.0)
    run.sample_loss()
    assert list(run.loss_history) == []  # ended: nothing new to show
    joined(registry, run, 0)
    run.sample_loss()  # no loss: the first metric stands in
    run.last_metrics["loss"] = 0.5
    run.sample_loss()
    assert list(run.loss_history) == [2.0, 0.5]
