"""What a step is (client/hook.py): the optimizer's real steps, counted by
torch's step hooks, not calls to pilot.step(); metrics of batches the
optimizer did not step on; values read from a device without waiting for it
(client/device_reads.py); and the rank a process attaches as, from
torch.distributed when it is initialised."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from procs import (
    FakeOptimizer,
    free_address,
    free_port,
    serving,
    stored_records,
    train_step,
    two_groups,
)

import lrpilot
from lrpilot import device_reads
from lrpilot.errors import UsageError
from lrpilot.policies import parse_policy


@contextmanager
def _quiet() -> Iterator[None]:
    """No daemon listens in some tests: the pilot's warnings about it are
    not what they check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


WARMUP = {"kind": "linear", "start_factor": 0.1, "end_factor": 1.0, "total_iters": 10}


def lrs_used(optimizer) -> list[list[float]]:
    """A step pre-hook registered after attach's: the LRs each real step uses."""
    seen: list[list[float]] = []
    optimizer.register_step_pre_hook(
        lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups])
    )
    return seen


def test_gradient_accumulation_steps_the_schedule_once_per_optimizer_step(tmp_path):
    """40 batches, accumulation 4: 10 real steps, the warmup's 10 LRs, and
    each step's record carries the mean of its 4 batches' losses."""
    optimizer = two_groups()
    with serving(tmp_path / "state") as daemon:
        pilot = lrpilot.attach(
            optimizer, run="accumulate", policy=WARMUP, daemon=daemon.bound_address, sync=True
        )
        used = lrs_used(optimizer)
        try:
            for batch in range(1, 41):
                if batch % 4 == 0:
                    train_step(optimizer)
                pilot.step(loss=float(batch))
            assert pilot.step_count == 10
        finally:
            pilot.close()
        reference = parse_policy(WARMUP).build([0.1, 0.02])
        want = []
        for _ in range(10):
            want.append(reference.lrs)
            reference.step()
        assert used == want
        records = stored_records(tmp_path / "state", "accumulate", 10)
    assert [step for step, _, _ in records] == list(range(1, 11))
    # Step k's batches are 4k-3 .. 4k: their mean loss is 4k - 1.5.
    assert [m["loss"] for _, _, m in records] == [4 * k - 1.5 for k in range(1, 11)]


def test_steps_a_grad_scaler_skips_are_not_steps():
    """A GradScaler skips optimizer.step() when a gradient is not finite: a
    call to pilot.step() after each scaler.step() counted those as steps
    (22 of 36 real steps got a wrong LR); the optimizer's hooks count right."""
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    spec = {"kind": "step", "step_size": 1, "gamma": 0.9}
    with _quiet():
        pilot = lrpilot.attach(optimizer, run="scaler", policy=spec, daemon=free_address())
    used = lrs_used(optimizer)
    real = 0
    try:
        for batch in range(48):
            loss = (param * 2.0).sum()
            scaler.scale(loss).backward()
            if batch % 4 == 3:
                param.grad[0] = math.inf  # an overflow: the scaler skips this step
            before = len(used)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            real += len(used) - before
            pilot.step(loss=loss.detach())
        assert real == 36 and pilot.step_count == 36
    finally:
        with _quiet():
            pilot.close()
    reference = parse_policy(spec).build([0.1])
    want = []
    for _ in range(36):
        want.append(reference.lrs)
        reference.step()
    assert used == want


def test_a_step_with_no_call_after_it_is_recorded_at_the_next_step(tmp_path):
    """A loop that calls pilot.step() only every other optimizer step still
    sends one record per real step, with its own step number (the steps no
    call came for carry no metrics)."""
    optimizer = two_groups()
    with serving(tmp_path / "state") as daemon:
        pilot = lrpilot.attach(optimizer, run="sparse", daemon=daemon.bound_address, sync=True)
        try:
            for step in range(1, 11):
                train_step(optimizer)
                if step % 2 == 0:
                    pilot.step(loss=float(step))
        finally:
            pilot.close()
        records = stored_records(tmp_path / "state", "sparse", 10)
    assert [(s, m) for s, _, m in records] == [
        (k, {"loss": float(k)} if k % 2 == 0 else {}) for k in range(1, 11)
    ]


def test_a_wrapped_optimizer_is_counted_by_the_optimizer_inside_it():
    """Accelerate's AcceleratedOptimizer (``.optimizer``) and Lightning's
    LightningOptimizer (``._optimizer``) call the inner step only on real
    steps: the hooks go on the inner one."""

    class Wrapper:  # the shape of both wrappers: param_groups and the inner optimizer
        def __init__(self, inner, attribute: str) -> None:
            setattr(self, attribute, inner)
            self.param_groups = inner.param_groups

    for attribute in ("optimizer", "_optimizer"):
        inner = two_groups()
        with _quiet():
            pilot = lrpilot.attach(
                Wrapper(inner, attribute), run="wrapped", policy=WARMUP, daemon=free_address()
            )
        try:
            for _ in range(3):
                train_step(inner)
            assert pilot.step_count == 3
        finally:
            with _quiet():
                pilot.close()


def test_steps_calls_counts_each_call_and_optimizer_needs_hooks():
    optimizer = two_groups()
    with _quiet():
        pilot = lrpilot.attach(optimizer, run="calls", daemon=free_address(), steps="calls")
        pilot.step()
        pilot.step()
        assert pilot.step_count == 2 and not pilot.counts_optimizer_steps
        pilot.close()
    with pytest.raises(UsageError, match="register_step_post_hook"):
        lrpilot.attach(
            FakeOptimizer([{"lr": 0.1}]), run="x", daemon=free_address(), steps="optimizer"
        )
    with pytest.raises(UsageError, match="steps must be auto, optimizer or calls"):
        lrpilot.attach(two_groups(), run="x", daemon=free_address(), steps="batches")


# --- values on a device -----------------------------------------------------------
#
# No GPU here: a stand-in device type, "standin", whose values are Python
# floats and whose readback is ready when the test says. It is registered in
# device_reads.READERS the way "cuda" is, so the hook's own logic (order, step
# numbers, lock-step waits, checkpoints) runs as it does with CUDA tensors.


class StandinDevice:
    type = "standin"


class StandinTensor:
    """A 0-d tensor on the stand-in device: arithmetic stays on the device."""

    device = StandinDevice()

    def __init__(self, value: float) -> None:
        self.value = value

    def numel(self) -> int:
        return 1

    def __add__(self, other):
        return StandinTensor(self.value + getattr(other, "value", other))

    __radd__ = __add__

    def __truediv__(self, other):
        return StandinTensor(self.value / other)

    def __float__(self) -> float:  # what a device read must never call
        raise AssertionError("the hook waited on the device")


class StandinReadback:
    ready_now = True
    waited = 0

    def __init__(self, tensors) -> None:
        self._values = [t.value for t in tensors]

    def ready(self) -> bool:
        return StandinReadback.ready_now

    def wait(self) -> None:
        StandinReadback.waited += 1

    def values(self) -> list[float]:
        return self._values


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(device_reads.READERS, "standin", StandinReadback)
    monkeypatch.setattr(StandinReadback, "ready_now", True)
    monkeypatch.setattr(StandinReadback, "waited", 0)
    return StandinReadback


def test_device_values_are_sent_once_read_in_order_with_their_steps(tmp_path, standin):
    optimizer = two_groups()
    with serving(tmp_path / "state") as daemon:
        pilot = lrpilot.attach(optimizer, run="device", daemon=daemon.bound_address)
        try:
            standin.ready_now = False  # the device is behind: nothing can be read yet
            for step in range(1, 4):
                train_step(optimizer)
                pilot.step(loss=StandinTensor(float(step)), lr_seen=0.5)
            pilot.report(val_loss=StandinTensor(9.0))
            assert pilot.stats.records_sent == 0 and len(pilot._queue) == 0
            standin.ready_now = True  # it caught up: the next step sends them all
            train_step(optimizer)
            pilot.step(loss=4.0)
            assert pilot.flush(timeout=5.0)
        finally:
            pilot.close()
        records = stored_records(tmp_path / "state", "device", 5)
    assert records == [
        (1, "s", {"loss": 1.0, "lr_seen": 0.5}),
        (2, "s", {"loss": 2.0, "lr_seen": 0.5}),
        (3, "s", {"loss": 3.0, "lr_seen": 0.5}),
        (3, "r", {"val_loss": 9.0}),
        (4, "s", {"loss": 4.0}),
    ]
    assert standin.waited == 0  # async: never waited on the device


def test_lock_step_and_checkpoints_wait_for_the_device(tmp_path, standin):
    """Lock-step means the daemon has each record before the next step: it
    waits for the device. A checkpoint's mirror state must include every
    step: state_dict() waits too."""
    optimizer = two_groups()
    plateau = {"kind": "plateau", "metric": "loss", "patience": 0, "factor": 0.5}
    with serving(tmp_path / "state") as daemon:
        pilot = lrpilot.attach(
            optimizer, run="device-sync", policy=plateau, daemon=daemon.bound_address, sync=True
        )
        try:
            standin.ready_now = False
            train_step(optimizer)
            pilot.step(loss=StandinTensor(1.0))
            train_step(optimizer)
            pilot.step(loss=StandinTensor(2.0))  # worse: the daemon cuts at once
            assert standin.waited == 2
            assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.01]
        finally:
            pilot.close()
    async_pilot = lrpilot.attach(two_groups(), run="ckpt", policy=plateau, daemon=free_address())
    try:
        train_step(async_pilot._optimizer)
        async_pilot.step(loss=StandinTensor(1.0))
        train_step(async_pilot._optimizer)
        async_pilot.step(loss=StandinTensor(3.0))
        state = async_pilot.state_dict()
        # Both steps are in the mirror: best 1.0, then a worse one cut (patience 0).
        assert state["mirror_state"]["best"] == 1.0
        assert state["mirror_state"]["lrs"] == [0.05, 0.01]
    finally:
        with _quiet():
            async_pilot.close()


def test_a_device_tensor_of_several_values_is_refused_naming_the_metric(standin):
    class Several(StandinTensor):
        def numel(self) -> int:
            return 3

    pilot = lrpilot.attach(two_groups(), run="several", daemon=free_address())
    try:
        with pytest.raises(TypeError, match=r"'loss'.*3 values"):
            pilot.step(loss=Several(1.0))
    finally:
        with _quiet():
            pilot.close()


# --- ranks ----------------------------------------------------------------------


def test_spawned_processes_attach_with_torch_distributed_s_ranks():
    """mp.spawn with torch.distributed initialised sets no $RANK: each process
    must attach as its own rank of 2, not both as rank 0 of 1."""
    script = Path(__file__).parent / "live" / "spawn_ranks.py"
    done = subprocess.run(
        [sys.executable, str(script), str(free_port()), free_address()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = sorted(json.loads(line)["rank"] for line in done.stdout.splitlines())
    worlds = {json.loads(line)["world_size"] for line in done.stdout.splitlines()}
    assert found == [0, 1] and worlds == {2}, done.stdout


def test_rank_from_the_launcher_s_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with _quiet():
        pilot = lrpilot.attach(two_groups(), run="env", daemon=free_address())
        assert (pilot.rank, pilot.world_size) == (3, 4)
        pilot.close()
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(UsageError, match=r"\$RANK must be an integer, got 'two'"):
        lrpilot.attach(two_groups(), run="env", daemon=free_address())


def test_with_no_policy_the_lrs_a_scheduler_left_are_held_not_counted_as_foreign():
    """A warmup scheduler left lr 0 with initial_lr 0.1 (HF's Trainer does):
    without a policy lrpilot holds what is there; it must not take its own
    base LR (initial_lr) for what it left and count the group as written."""
    optimizer = two_groups()
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)  # a warmup at its step 0
    with _quiet():
        pilot = lrpilot.attach(optimizer, run="held", daemon=free_address())
    try:
        assert pilot.lrs == [0.0, 0.0] and pilot.base_lrs == [0.1, 0.02]
        for _ in range(3):
            train_step(optimizer)
            pilot.step(loss=1.0)
        assert pilot.stats.foreign_lr_writes == 0
        assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    finally:
        with _quiet():
            pilot.close()
