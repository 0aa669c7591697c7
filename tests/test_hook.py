"""The training-side hook (client/hook.py) on real torch optimizers: with no
daemon at all (an address nobody listens on), or with a daemon serving in a
thread of the test process."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from procs import FakeOptimizer, control, free_address, serving, train_step, two_groups, wait_for

import lrpilot
from lrpilot.daemon.service.server import Daemon
from lrpilot.hook import DECIDING_BATCH, IO_INTERVAL
from lrpilot.policies import parse_policy
from lrpilot.protocol import LRCommand


@pytest.fixture
def daemon(tmp_path) -> Iterator[Daemon]:
    with serving(tmp_path / "state") as running:
        yield running


@contextmanager
def recording() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def lrpilot_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("lrpilot")
    ]


SCHEDULES = {
    "cosine-sgd": (
        {"kind": "cosine", "T_max": 300, "eta_min": 1e-4},
        lambda: two_groups(torch.optim.SGD, momentum=0.9),
    ),
    "onecycle-adam": (
        {"kind": "onecycle", "max_lr": [0.1, 0.02], "total_steps": 2000},
        lambda: two_groups(torch.optim.Adam),
    ),
    "cyclic-sgd": (
        {
            "kind": "cyclic",
            "base_lr": 0.01,
            "max_lr": 0.1,
            "step_size_up": 70,
            "mode": "triangular2",
        },
        lambda: two_groups(torch.optim.SGD, momentum=0.9),
    ),
    "cyclic-adam": (
        {"kind": "cyclic", "base_lr": [0.001, 0.002], "max_lr": [0.01, 0.03], "step_size_up": 40},
        lambda: two_groups(torch.optim.AdamW),
    ),
}


def momenta_of(optimizer: torch.optim.Optimizer) -> list[float]:
    return [g["betas"][0] if "betas" in g else g["momentum"] for g in optimizer.param_groups]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_step_driven_schedule_is_exact_every_step_with_no_daemon(name):
    spec, make_optimizer = SCHEDULES[name]
    optimizer = make_optimizer()
    reference = parse_policy(spec).build([0.1, 0.02])
    steps = 2000
    pilot = lrpilot.attach(optimizer, run=f"no-daemon-{name}", policy=spec, daemon=free_address())
    try:
        seen_lrs, seen_momenta = [], []
        for _ in range(steps):
            # What the optimizer is about to use is the policy's LR for this step.
            lrs = [g["lr"] for g in optimizer.param_groups]
            assert lrs == reference.lrs
            if reference.momenta is not None:
                assert momenta_of(optimizer) == reference.momenta
            seen_lrs.append(lrs[0])
            seen_momenta.append(momenta_of(optimizer)[0])
            train_step(optimizer)
            pilot.step(loss=1.0)
            reference.step()
        assert [g["lr"] for g in optimizer.param_groups] == reference.lrs
        assert pilot.lrs == reference.lrs
        assert pilot.step_count == steps
        assert pilot.stats.records_dropped == 0
        assert pilot.stats.foreign_lr_writes == 0
        assert pilot.stats.commands_applied == 0
    finally:
        with recording():  # the pipe is full (no daemon): close warns the bye was not sent
            pilot.close()
    # The schedule really moved (a constant LR would pass the comparison too).
    assert len(set(seen_lrs)) > 100
    if spec["kind"] in ("cyclic", "onecycle"):
        assert len(set(seen_momenta)) > 50
    else:
        assert set(seen_momenta) == {0.9}


def test_exhausted_schedule_holds_the_last_lrs_and_warns_once():
    optimizer = two_groups()
    spec = {"kind": "onecycle", "max_lr": 0.1, "total_steps": 20}
    with recording() as caught:
        pilot = lrpilot.attach(optimizer, run="exhausted", policy=spec, daemon=free_address())
        try:
            for _ in range(20):
                train_step(optimizer)
                pilot.step()
            last = pilot.lrs
            for _ in range(10):
                train_step(optimizer)
                pilot.step()
                assert [g["lr"] for g in optimizer.param_groups] == last
        finally:
            pilot.close()
    messages = [m for m in lrpilot_warnings(caught) if "holding the last LRs" in m]
    assert len(messages) == 1


def test_sync_without_daemon_times_out_once_then_stops_waiting():
    optimizer = two_groups()
    spec = {"kind": "step", "step_size": 10, "gamma": 0.5}
    reference = parse_policy(spec).build([0.1, 0.02])
    with recording() as caught:
        pilot = lrpilot.attach(
            optimizer,
            run="sync-alone",
            policy=spec,
            daemon=free_address(),
            sync=True,
            sync_timeout=0.2,
        )
        try:
            for _ in range(200):
                train_step(optimizer)
                pilot.step(loss=1.0)
                reference.step()
                assert [g["lr"] for g in optimizer.param_groups] == reference.lrs
            pilot.report(val_loss=1.0)
            assert pilot.stats.sync_timeouts == 1
        finally:
            pilot.close()
    assert len([m for m in lrpilot_warnings(caught) if "did not answer" in m]) == 1


def test_bounded_queue_drops_the_oldest_records_and_counts_them(tmp_path):
    address = free_address()
    optimizer = two_groups()
    with recording() as caught:
        pilot = lrpilot.attach(optimizer, run="bounded", daemon=address, max_queue=8)
        try:
            # Each report() sends at once: the socket's pipe fills (no daemon),
            # then the pilot's own queue of 8 records, then the oldest go.
            for i in range(1, 301):
                train_step(optimizer)
                pilot.step(loss=float(i))
                pilot.report(val_loss=float(i))
            total = 600
            dropped, sent = pilot.stats.records_dropped, pilot.stats.records_sent
            assert dropped > 0
            assert sent > 0
            assert sent + dropped <= total
            assert total - sent - dropped <= 8  # the rest waits in the queue
            drops = [m for m in lrpilot_warnings(caught) if "records_dropped" in m]
            assert len(drops) == 1, lrpilot_warnings(caught)
            # A daemon comes up on that address: what was kept reaches it, and
            # what was kept is the newest (the last step), not the oldest.
            with serving(tmp_path / "state", address) as daemon:
                wait_for(lambda: pilot.flush(timeout=0.05), what="the queue to drain")
                assert pilot.stats.records_sent + pilot.stats.records_dropped == total
                assert pilot.stats.records_dropped == dropped
                wait_for(
                    lambda: daemon.plane.records_ingested == pilot.stats.records_sent,
                    what="the daemon to ingest every record sent",
                )
                # The count moves before the record is folded in (daemon thread).
                run = daemon.plane.registry.runs["bounded"]
                wait_for(lambda: run.engine.step == 300, what="the last record to be folded in")
                assert run.sessions[0].step == 300
        finally:
            pilot.close()


def test_foreign_scheduler_is_overridden_with_one_warning():
    optimizer = two_groups(torch.optim.SGD, momentum=0.9)
    foreign = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    spec = {"kind": "cosine", "T_max": 50}
    reference = parse_policy(spec).build([0.1, 0.02])
    with recording() as caught:
        pilot = lrpilot.attach(optimizer, run="foreign", policy=spec, daemon=free_address())
        try:
            for _ in range(30):
                train_step(optimizer)
                foreign.step()  # halves every group's LR behind lrpilot's back
                pilot.step(loss=1.0)
                reference.step()
                assert [g["lr"] for g in optimizer.param_groups] == reference.lrs
            assert pilot.stats.foreign_lr_writes == 30 * 2  # every group, every step
        finally:
            pilot.close()
    messages = lrpilot_warnings(caught)
    assert len(messages) == 1, messages
    assert "'body'" in messages[0]
    assert "scheduler" in messages[0]


def test_an_outside_lr_change_to_a_later_group_of_the_same_shape_is_overridden():
    # Groups with the same keys and equally many params: dict equality would
    # compare their param tensors (ambiguous truth value), so a change to the
    # second group must not be looked up by equality.
    body, head = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([{"params": [body], "lr": 0.1}, {"params": [head], "lr": 0.02}])
    spec = {"kind": "cosine", "T_max": 50}
    reference = parse_policy(spec).build([0.1, 0.02])
    with recording() as caught:
        pilot = lrpilot.attach(optimizer, run="same-shape", policy=spec, daemon=free_address())
        try:
            train_step(optimizer)
            optimizer.param_groups[1]["lr"] = 0.5
            pilot.step(loss=1.0)
            reference.step()
            assert [g["lr"] for g in optimizer.param_groups] == reference.lrs
            assert pilot.stats.foreign_lr_writes == 1
        finally:
            pilot.close()
    messages = [m for m in lrpilot_warnings(caught) if "something else" in m]
    assert len(messages) == 1
    assert "param group '1'" in messages[0]


def test_an_outside_lr_change_without_a_policy_is_undone_and_counted_once():
    optimizer = two_groups()
    with recording() as caught:
        pilot = lrpilot.attach(optimizer, run="no-policy-foreign", daemon=free_address())
        try:
            for _ in range(3):
                train_step(optimizer)
                pilot.step(loss=1.0)
            optimizer.param_groups[0]["lr"] = 0.5  # once, behind lrpilot's back
            for _ in range(20):
                train_step(optimizer)
                pilot.step(loss=1.0)
                assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.02]
            assert pilot.stats.foreign_lr_writes == 1
            assert pilot.lrs == [0.1, 0.02]
        finally:
            pilot.close()
    assert len([m for m in lrpilot_warnings(caught) if "lrpilot overrides it" in m]) == 1


def test_no_foreign_write_is_counted_when_lrpilot_is_alone():
    optimizer = two_groups()
    with recording() as caught:
        pilot = lrpilot.attach(
            optimizer,
            run="alone",
            policy={"kind": "exponential", "gamma": 0.9},
            daemon=free_address(),
        )
        try:
            for _ in range(50):
                train_step(optimizer)
                pilot.step(loss=1.0)
        finally:
            pilot.close()
    assert pilot.stats.foreign_lr_writes == 0
    assert not [m for m in lrpilot_warnings(caught) if "something else" in m]


def test_metric_values_of_every_number_type_reach_the_daemon(daemon):
    optimizer = two_groups()
    spec = {"kind": "plateau", "metric": "loss", "patience": 0, "factor": 0.5}
    pilot = lrpilot.attach(
        optimizer,
        run="types",
        policy=spec,
        daemon=daemon.bound_address,
        sync=True,
        sync_timeout=5.0,
    )
    try:
        values = [
            5,  # int: best
            np.float32(6.0),  # worse: cut
            torch.tensor(3.5, requires_grad=True) * 2,  # a loss as backward() leaves it: cut
            np.int64(8),  # worse: cut
            torch.tensor(1.5, dtype=torch.float64),  # better: no cut
            np.float64(1.25),  # better
        ]
        lrs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for value in values:
                train_step(optimizer)
                pilot.step(loss=value)
                lrs.append([g["lr"] for g in optimizer.param_groups])
        assert not [str(w.message) for w in caught if "requires_grad" in str(w.message)]
        assert lrs == [
            [0.1, 0.02],
            [0.05, 0.01],
            [0.025, 0.005],
            [0.0125, 0.0025],
            [0.0125, 0.0025],
            [0.0125, 0.0025],
        ]
        assert pilot.stats.sync_timeouts == 0
        assert pilot.stats.commands_applied == 3
        engine = daemon.plane.registry.runs["types"].engine
        assert engine.policy.best == 1.25
        assert engine.step == len(values)
    finally:
        pilot.close()


def test_operator_commands_apply_to_a_run_whose_schedule_is_exhausted(daemon):
    optimizer = two_groups()
    spec = {"kind": "onecycle", "max_lr": 0.1, "total_steps": 10}
    with recording() as caught:
        pilot = lrpilot.attach(
            optimizer,
            run="exhausted-ops",
            policy=spec,
            daemon=daemon.bound_address,
            sync=True,
            sync_timeout=5.0,
        )
        try:
            for _ in range(15):  # past total_steps: the last LRs are held
                train_step(optimizer)
                pilot.step(loss=1.0)
            last = pilot.lrs
            control_address = daemon.bound_control_address

            def lrs_after_command(op: dict, applied: int) -> list[float]:
                control(control_address, {"run": "exhausted-ops", **op})
                # Lock-step: the command lands one step after the daemon's step.
                for _ in range(3):
                    train_step(optimizer)
                    pilot.step(loss=1.0)
                assert pilot.stats.commands_applied == applied
                return [g["lr"] for g in optimizer.param_groups]

            assert lrs_after_command({"op": "set_lr", "lr": 0.05}, 1) == [0.05, 0.05]
            assert lrs_after_command({"op": "resume"}, 2) == last
            assert lrs_after_command({"op": "pause"}, 3) == last
            assert pilot.stats.daemon_errors == 0
            assert pilot.stats.sync_timeouts == 0
        finally:
            pilot.close()
    messages = lrpilot_warnings(caught)
    assert not [m for m in messages if "could not apply" in m], messages
    assert len([m for m in messages if "holding the last LRs" in m]) == 1


def test_a_command_whose_state_does_not_load_changes_nothing():
    optimizer = two_groups()
    spec = CHECKPOINTED["warmup-cosine"]
    reference = parse_policy(spec).build([0.1, 0.02])
    with recording() as caught:
        pilot = lrpilot.attach(optimizer, run="bad-state", policy=spec, daemon=free_address())
        try:
            for _ in range(5):
                train_step(optimizer)
                pilot.step(loss=1.0)
                reference.step()
            # A sequential state that gets as far as its step count, then
            # lacks a field: rejected, and the running schedule is untouched.
            state = {**reference.state_dict(), "last_epoch": 50}
            del state["held_momenta"]
            pilot._receive(
                LRCommand(
                    run="bad-state",
                    version=1,
                    effective_step=6,
                    state_step=5,
                    lrs=reference.lrs,
                    policy_state=state,
                )
            )
            for _ in range(40):
                train_step(optimizer)
                pilot.step(loss=1.0)
                reference.step()
                assert [g["lr"] for g in optimizer.param_groups] == reference.lrs
            assert pilot.stats.daemon_errors == 1
            assert pilot.stats.commands_applied == 0
        finally:
            pilot.close()
    assert len([m for m in lrpilot_warnings(caught) if "could not apply command 1" in m]) == 1


@pytest.mark.parametrize(
    "counts", [{"lrs": [0.05]}, {"lrs": []}, {"lrs": [0.05, 0.01, 0.3]}, {"base_lrs": [0.1]}]
)
def test_a_command_for_another_number_of_groups_changes_nothing(counts):
    """LRs for one group of two would leave the other stale and a checkpoint
    that no longer loads (found by tests/test_fuzz.py): refused whole."""
    optimizer = two_groups()
    spec = {"kind": "step", "step_size": 2, "gamma": 0.5}
    reference = parse_policy(spec).build([0.1, 0.02])
    with recording() as caught:
        pilot = lrpilot.attach(optimizer, run="groups", policy=spec, daemon=free_address())
        try:
            train_step(optimizer)
            pilot.step(loss=1.0)
            reference.step()
            fields = {"lrs": [0.05, 0.01], "hold": True, **counts}
            pilot._receive(
                LRCommand(run="groups", version=1, effective_step=2, state_step=1, **fields)
            )
            for _ in range(4):
                train_step(optimizer)
                pilot.step(loss=1.0)
                reference.step()
                assert [g["lr"] for g in optimizer.param_groups] == reference.lrs
            assert pilot.stats.daemon_errors == 1
            assert pilot.stats.commands_applied == 0
            pilot.load_state_dict(pilot.state_dict())  # the checkpoint still loads
        finally:
            pilot.close()
    assert len([m for m in lrpilot_warnings(caught) if "could not apply command 1" in m]) == 1


def test_after_a_report_with_no_daemon_steps_stop_looking_for_the_answer():
    pilot = lrpilot.attach(two_groups(), run="no-answer", daemon=free_address())
    exchanges = 0  # looks for what the daemon sent: with a send, or alone

    def counted(method):
        def count(*args, **kwargs):
            nonlocal exchanges
            exchanges += 1
            return method(*args, **kwargs)

        return count

    pilot._exchange = counted(pilot._exchange)
    pilot._look = counted(pilot._look)
    try:
        with recording():  # no daemon: the pipe may fill
            pilot.step(loss=1.0)
            reported = time.monotonic()
            pilot.report(val_loss=1.0)
            # Right after the report, every step looks for the decision.
            exchanges = 0
            for _ in range(20):
                pilot.step(loss=1.0)
            assert exchanges == 20
            # The daemon never answers: soon (~0.2 s), steps stop looking; the
            # regular I/O, once per IO_INTERVAL, would still pick an answer up.

            def steps_stopped_looking() -> bool:
                nonlocal exchanges
                exchanges, steps = 0, 100
                started = time.monotonic()
                for _ in range(steps):
                    pilot.step(loss=1.0)
                elapsed = time.monotonic() - started
                return exchanges <= elapsed / IO_INTERVAL + 2 and exchanges < steps / 2

            wait_for(steps_stopped_looking, timeout=2.0, what="steps to stop exchanging")
            assert time.monotonic() - reported < 1.0
    finally:
        with recording():
            pilot.close()


@pytest.mark.parametrize("bad", ["high", None, [1.0], object(), torch.ones(2)])
def test_non_number_metric_raises_type_error_naming_it(bad):
    pilot = lrpilot.attach(two_groups(), run="bad-metric", daemon=free_address())
    try:
        with pytest.raises(TypeError, match="'val_acc'"):
            pilot.step(loss=1.0, val_acc=bad)
        with pytest.raises(TypeError, match="'val_acc'"):
            pilot.report(val_acc=bad)
    finally:
        pilot.close()


def test_numeric_string_metric_is_not_a_number():
    pilot = lrpilot.attach(two_groups(), run="string-metric", daemon=free_address())
    try:
        with pytest.raises(TypeError, match="'loss'"):
            pilot.step(loss="0.5")
    finally:
        pilot.close()


def test_a_step_refused_for_a_bad_metric_does_not_advance_the_schedule():
    """When calls are steps (steps='calls'), a call refused for its metrics
    is no step. (Counting the optimizer's steps, the optimizer says.)"""
    optimizer = two_groups()
    spec = {"kind": "step", "step_size": 1, "gamma": 0.5}
    pilot = lrpilot.attach(
        optimizer, run="refused", policy=spec, daemon=free_address(), steps="calls"
    )
    try:
        pilot.step(loss=1.0)
        before = (pilot.step_count, pilot.lrs, [g["lr"] for g in optimizer.param_groups])
        with pytest.raises(TypeError):
            pilot.step(loss="oops")
        assert (pilot.step_count, pilot.lrs) == before[:2]
        pilot.step(loss=1.0)  # the retry is step 2, with step 2's LR after it
        reference = parse_policy(spec).build([0.1, 0.02])
        reference.step()
        reference.step()
        assert [g["lr"] for g in optimizer.param_groups] == reference.lrs
    finally:
        pilot.close()


CHECKPOINTED = {
    "cyclic": {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 15},
    "warmup-cosine": {
        "kind": "sequential",
        "policies": [
            {"kind": "linear", "start_factor": 0.1, "total_iters": 20},
            {"kind": "cosine", "T_max": 60, "eta_min": 0.001},
        ],
        "milestones": [20],
    },
}


@pytest.mark.parametrize("name", list(CHECKPOINTED))
@pytest.mark.parametrize("attach_with_policy", [True, False])
def test_state_dict_continues_the_identical_sequence_in_a_fresh_pilot(name, attach_with_policy):
    spec = CHECKPOINTED[name]
    address = free_address()
    whole = two_groups(torch.optim.SGD, momentum=0.9)
    straight = lrpilot.attach(whole, run="straight", policy=spec, daemon=address)
    first = two_groups(torch.optim.SGD, momentum=0.9)
    before = lrpilot.attach(first, run="ckpt", policy=spec, daemon=address)
    try:
        expected = []
        for _ in range(97):
            train_step(whole)
            straight.step(loss=1.0)
            expected.append(([g["lr"] for g in whole.param_groups], momenta_of(whole)))
        got = []
        for _ in range(37):
            train_step(first)
            before.step(loss=1.0)
            got.append(([g["lr"] for g in first.param_groups], momenta_of(first)))
        state = before.state_dict()
    finally:
        straight.close()
        before.close()
    # A new process: fresh model, fresh optimizer at the original LRs.
    second = two_groups(torch.optim.SGD, momentum=0.9)
    after = lrpilot.attach(
        second, run="ckpt", policy=spec if attach_with_policy else None, daemon=address
    )
    try:
        after.load_state_dict(state)
        assert after.step_count == 37
        assert [g["lr"] for g in second.param_groups] == got[-1][0]
        assert momenta_of(second) == got[-1][1]
        for _ in range(60):
            train_step(second)
            after.step(loss=1.0)
            got.append(([g["lr"] for g in second.param_groups], momenta_of(second)))
        assert after.stats.foreign_lr_writes == 0
    finally:
        after.close()
    assert got == expected
    assert len({lrs[0] for lrs, _ in expected}) > 20


@pytest.mark.parametrize(
    "thing",
    [object(), {"lr": 0.1}, type("NoGroups", (), {"param_groups": []})()],
    ids=["object", "dict", "empty-groups"],
)
def test_attach_refuses_what_is_not_an_optimizer(thing):
    with pytest.raises(TypeError, match="param_groups"):
        lrpilot.attach(thing, run="nope", daemon=free_address())


def test_attach_refuses_groups_without_lr():
    class Fake:
        param_groups = [{"params": []}]  # noqa: RUF012

    with pytest.raises(TypeError, match="'lr'"):
        lrpilot.attach(Fake(), run="nope", daemon=free_address())


def test_named_param_groups_reach_the_daemon(daemon):
    optimizer = two_groups()  # groups: "body" (named), then an unnamed one
    pilot = lrpilot.attach(optimizer, run="named", daemon=daemon.bound_address)
    try:
        pilot.step(loss=1.0)  # hello goes with the first step (a checkpoint may come first)
        runs = daemon.plane.registry.runs
        # The daemon thread registers the run a moment before the rank joins it.
        run = wait_for(
            lambda: runs.get("named") if "named" in runs and runs["named"].sessions else None,
            what="the hello to reach the daemon",
        )
        assert run.group_names == ["body", "1"]
        assert run.engine.base_lrs == [0.1, 0.02]
        assert run.sessions[0].pid > 0
    finally:
        pilot.close()
    wait_for(lambda: not runs["named"].sessions, what="the bye to end the session")


def test_attach_takes_the_address_from_the_environment(daemon, monkeypatch):
    monkeypatch.setenv("LRPILOT_DAEMON", daemon.bound_address)
    monkeypatch.setenv("LRPILOT_RUN", "from-env")
    pilot = lrpilot.attach(two_groups())
    try:
        assert pilot.run == "from-env"
        pilot.step(loss=1.0)
        wait_for(lambda: "from-env" in daemon.plane.registry.runs, what="the hello")
    finally:
        pilot.close()


def test_optimizer_load_state_dict_after_attach_keeps_the_schedule_in_the_groups():
    """A resume that attaches first and then loads the optimizer's checkpoint:
    torch puts new param group dicts in, and lrpilot must write to those."""
    optimizer = two_groups()
    checkpoint = optimizer.state_dict()  # its groups hold lr 0.1 and 0.02
    spec = {"kind": "step", "step_size": 1, "gamma": 0.5}
    pilot = lrpilot.attach(optimizer, run="reload", policy=spec, daemon=free_address())
    try:
        old_groups = optimizer.param_groups
        for _ in range(3):
            train_step(optimizer)
            pilot.step(loss=1.0)
        optimizer.load_state_dict(checkpoint)
        assert optimizer.param_groups is not old_groups  # what torch does
        train_step(optimizer)
        pilot.step(loss=1.0)
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([0.1 * 0.5**4, 0.02 * 0.5**4])
        assert pilot.stats.foreign_lr_writes == 0
    finally:
        pilot.close()


def test_an_lr_written_between_pilot_step_and_optimizer_step_is_not_used():
    """Lightning steps a ReduceLROnPlateau between the pilot's step and the
    optimizer's: the LR optimizer.step() uses must still be lrpilot's."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    spec = {"kind": "cosine", "T_max": 20}
    reference = parse_policy(spec).build([0.1])
    with recording() as caught:
        pilot = lrpilot.attach(optimizer, run="late-write", policy=spec, daemon=free_address())
        try:
            for _ in range(10):
                before = param.item()
                param.grad = torch.ones(1)
                optimizer.param_groups[0]["lr"] = 0.5  # after pilot.step, before the step
                optimizer.step()
                used = before - param.item()  # SGD without momentum: lr * grad
                assert used == pytest.approx(reference.lrs[0], rel=1e-6), used
                pilot.step(loss=1.0)
                reference.step()
            assert pilot.stats.foreign_lr_writes == 10
        finally:
            pilot.close()
    assert len([m for m in lrpilot_warnings(caught) if "something else" in m]) == 1
    # Closed, the pilot leaves the optimizer alone.
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_the_base_lr_is_torchs_initial_lr_when_a_scheduler_left_one():
    optimizer = two_groups()
    torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.002])
    spec = {"kind": "cosine", "T_max": 30}
    pilot = lrpilot.attach(optimizer, run="initial-lr", policy=spec, daemon=free_address())
    try:
        assert pilot.lrs == parse_policy(spec).build([0.1, 0.02]).lrs
    finally:
        pilot.close()


def test_attach_after_a_warmup_that_left_lr_0_warns_and_training_goes_on():
    optimizer = two_groups()
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # a warmup's first value, without torch's initial_lr
    with recording() as caught:
        pilot = lrpilot.attach(
            optimizer,
            run="lr-zero",
            policy={"kind": "cosine", "T_max": 5},
            daemon=free_address(),
        )
        try:
            for _ in range(3):
                train_step(optimizer)
                pilot.step(loss=1.0)
            assert pilot.policy is None and pilot.step_count == 3
        finally:
            pilot.close()
    [message] = [m for m in lrpilot_warnings(caught) if "lr=0.0" in m]
    assert "without one" in message
    # The warning points at the caller's line, not inside lrpilot.
    [where] = [w for w in caught if "lr=0.0" in str(w.message)]
    assert where.filename == __file__


@pytest.mark.parametrize("run", ["evil\x1b[31m", "a\nb", "x" * 201])
def test_attach_refuses_a_run_id_the_daemon_would_refuse(run):
    with pytest.raises(ValueError, match="run must be 1 to 200 printable characters"):
        lrpilot.attach(two_groups(), run=run, daemon=free_address())


def test_a_checkpoint_holds_what_the_metrics_did_to_a_plateau():
    """pilot.state_dict() after val_loss 1.0, 1.1, 1.2 holds what torch's
    ReduceLROnPlateau holds (best 1.0, 2 bad), daemon or not."""
    optimizer = two_groups()
    spec = {"kind": "plateau", "metric": "val_loss", "patience": 3}
    torch_optimizer = two_groups()
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(torch_optimizer, patience=3)
    pilot = lrpilot.attach(optimizer, run="plateau-ckpt", policy=spec, daemon=free_address())
    try:
        for value in (1.0, 1.1, 1.2):
            train_step(optimizer)
            pilot.step(loss=1.0)
            pilot.report(val_loss=value)
            reference.step(value)
        state = pilot.state_dict()["mirror_state"]
        assert (state["best"], state["num_bad_steps"]) == (1.0, 2)
        assert (reference.best, reference.num_bad_epochs) == (1.0, 2)
        assert pilot.lrs == [0.1, 0.02]  # no decision without the daemon
    finally:
        pilot.close()


def test_a_checkpoint_resumes_with_its_lrs_not_a_cut_that_is_not_due_yet():
    """Between a decision and the step it is due at, a checkpoint's LRs are the
    ones in effect; the mirror has already cut (it took the metric), and the
    command waiting for its step is in the checkpoint too: a resume holds the
    LRs and applies the cut where the uninterrupted run did."""
    spec = {"kind": "plateau", "metric": "val_loss", "patience": 0}
    pilot = lrpilot.attach(two_groups(), run="due-later", policy=spec, daemon=free_address())
    resumed = lrpilot.attach(two_groups(), run="due-later", policy=spec, daemon=free_address())
    try:
        for value in (1.0, 2.0):
            train_step(pilot._optimizer)
            pilot.step(loss=1.0)
            pilot.report(val_loss=value)
        mirror = pilot.state_dict()["mirror_state"]
        cut_lrs = mirror["lrs"]  # x0.1, patience 0
        assert cut_lrs == pytest.approx([0.01, 0.002])
        cut = LRCommand(
            run="due-later",
            version=1,
            effective_step=5,
            state_step=2,
            lrs=cut_lrs,
            policy_state=mirror,
            reason="plateau",
            actor="policy",
        )
        pilot._receive(cut)
        state = pilot.state_dict()
        assert state["lrs"] == [0.1, 0.02]  # the cut is due at step 5
        assert state["mirror_state"]["lrs"] == cut_lrs
        assert [c["version"] for c in state["pending"]] == [1]
        resumed.load_state_dict(state)
        assert resumed.lrs == [0.1, 0.02]
        lrs = []
        for _ in range(4):  # steps 3..6
            train_step(resumed._optimizer)
            resumed.step(loss=1.0)
            lrs.append(resumed.lrs)
        # After step 4 the groups hold step 5's LRs: the cut.
        assert lrs == [[0.1, 0.02], cut_lrs, cut_lrs, cut_lrs]
    finally:
        pilot.close()
        resumed.close()


def test_a_resume_against_a_fresh_store_cuts_where_the_uninterrupted_run_did(tmp_path):
    """The checkpoint's plateau progress reaches the daemon in the hello: a
    resume against a daemon that never saw the run cuts at the same step."""
    spec = {"kind": "plateau", "metric": "val_loss", "patience": 2, "factor": 0.5}
    losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 1.01, 1.02]

    def train(pilot, optimizer, values, lrs):
        for value in values:
            train_step(optimizer)
            pilot.step(loss=1.0)
            pilot.report(val_loss=value)
            lrs.append(list(pilot.lrs))

    uninterrupted: list[list[float]] = []
    with serving(tmp_path / "one") as daemon:
        optimizer = two_groups()
        with lrpilot.attach(
            optimizer, run="whole", policy=spec, daemon=daemon.bound_address, sync=True
        ) as pilot:
            train(pilot, optimizer, losses, uninterrupted)
    resumed: list[list[float]] = []
    with serving(tmp_path / "two") as daemon:
        optimizer = two_groups()
        with lrpilot.attach(
            optimizer, run="halves", policy=spec, daemon=daemon.bound_address, sync=True
        ) as pilot:
            train(pilot, optimizer, losses[:4], resumed)
            checkpoint = pilot.state_dict()
    with serving(tmp_path / "three") as daemon:  # a fresh store: it never saw the run
        optimizer = two_groups()
        with lrpilot.attach(
            optimizer, run="halves", policy=spec, daemon=daemon.bound_address, sync=True
        ) as pilot:
            pilot.load_state_dict(checkpoint)
            train(pilot, optimizer, losses[4:], resumed)
    assert resumed == uninterrupted
    assert uninterrupted[-1] != uninterrupted[0]  # it did cut


def test_a_command_that_sets_no_policy_is_told_from_one_that_keeps_it():
    """policy null means "no policy" only when the command sets the policy."""
    params = [{"params": [], "lr": 0.1}]
    spec = {"kind": "exponential", "gamma": 0.5}
    pilot = lrpilot.attach(
        FakeOptimizer(params), run="policy-set", policy=spec, daemon=free_address()
    )
    try:
        pilot.step()
        keep = LRCommand(run="policy-set", version=1, effective_step=2, state_step=1, lrs=[0.05])
        pilot._receive(keep)
        pilot.step()
        assert pilot.policy is not None and pilot.lrs == [0.025]
        drop = LRCommand(
            run="policy-set",
            version=2,
            effective_step=3,
            state_step=2,
            lrs=[0.025],
            policy_set=True,
            hold=True,
        )
        pilot._receive(drop)
        pilot.step()
        pilot.step()
        assert pilot.policy is None and pilot.lrs == [0.025]
    finally:
        pilot.close()


def test_acks_are_sent_again_to_a_daemon_that_restarted():
    """A daemon killed after the training applied a command, before it wrote
    the ack, would keep that journal entry unapplied: the pilot sends its
    recent acks again with its hello to the daemon that asks for one."""
    import zmq

    from lrpilot.protocol import Ack, Error, Hello, decode, encode

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    params = [{"params": [], "lr": 0.1}]
    pilot = lrpilot.attach(FakeOptimizer(params), run="acks", daemon=f"tcp://127.0.0.1:{port}")

    def received(kind, deadline=10.0):
        while router.poll(int(deadline * 1000)):
            identity, *frames = router.recv_multipart()
            message = decode(frames)
            if isinstance(message, kind):
                return identity, message
        raise AssertionError(f"no {kind.__name__} from the pilot")

    try:
        pilot.step()
        identity, _ = received(Hello)
        command = LRCommand(run="acks", version=1, effective_step=2, state_step=1, lrs=[0.05])
        router.send_multipart([identity, encode(command)])
        wait_for(lambda: (pilot.step(), pilot.lrs == [0.05])[1], what="the command to apply")
        _, ack = received(Ack)
        assert ack.version == 1
        # The "restarted" daemon does not know the session.
        router.send_multipart([identity, encode(Error(code="unknown_session", message="hello"))])
        wait_for(lambda: (pilot.step(), router.poll(0))[1], what="the pilot's answer")
        _, hello = received(Hello)
        assert hello.applied_version == 1
        _, again = received(Ack)
        assert (again.version, again.applied_step) == (1, ack.applied_step)
    finally:
        pilot.close()
        router.close()
        context.term()


def test_a_command_for_another_run_is_not_applied():
    from lrpilot.protocol import encode

    params = [{"params": [], "lr": 0.1}]
    pilot = lrpilot.attach(FakeOptimizer(params), run="mine", daemon=free_address())
    try:
        pilot.step()
        other = LRCommand(run="theirs", version=1, effective_step=1, state_step=0, lrs=[9.0])
        with recording() as caught:
            pilot._handle([encode(other)])
            pilot.step()
        assert pilot.lrs == [0.1] and params[0]["lr"] == 0.1
        assert pilot.stats.daemon_errors == 1
        assert any("run 'theirs'" in m for m in lrpilot_warnings(caught))
    finally:
        pilot.close()


@pytest.mark.parametrize(
    ("policy", "sent"),
    [
        ({"kind": "cosine", "T_max": 1000}, "every interval"),
        ({"kind": "plateau", "metric": "val_loss"}, "every 32 records"),
        ({"kind": "plateau", "metric": "loss"}, "at once"),
    ],
    ids=["step-driven", "plateau-on-reports", "plateau-on-the-step-loss"],
)
def test_async_step_records_go_in_batches_unless_the_policy_decides_on_them(policy, sent):
    """Every SEND_INTERVAL, not every step (a message per rank and step is
    what would limit the daemon); with a policy that decides on reports, also
    once DECIDING_BATCH are queued (a report's message must not carry a
    backlog the daemon folds in before it decides); a record carrying the
    metric the policy decides on goes at once, as a report does. A ROUTER
    stands in for the daemon and counts the metrics messages of 200 steps at
    ~1 kHz."""
    import zmq

    from lrpilot.protocol import SEND_INTERVAL, MetricsHeader, decode

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    pilot = lrpilot.attach(
        two_groups(), run="batched", policy=policy, daemon=f"tcp://127.0.0.1:{port}"
    )
    try:
        started = time.monotonic()
        for _ in range(200):
            train_step(pilot._optimizer)
            pilot.step(loss=1.0)
            time.sleep(0.001)
        elapsed = time.monotonic() - started
        assert pilot.flush(timeout=5.0)
        records = batches = 0
        while router.poll(500):
            message = decode(router.recv_multipart()[1:])
            if isinstance(message, MetricsHeader):
                batches += 1
                records += sum(count for _, count in message.blocks)
        assert records == 200
        by_interval = elapsed / SEND_INTERVAL
        if sent == "at once":
            assert batches >= 190, batches  # one a step (a few may share a send)
        elif sent == "every 32 records":
            by_count = 200 / DECIDING_BATCH
            assert by_count - 1 <= batches <= by_count + by_interval + 3, (batches, elapsed)
        else:
            assert batches <= by_interval + 3, (batches, elapsed)
    finally:
        pilot.close()
        router.close(linger=0)
        ctx.term()
