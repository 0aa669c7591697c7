"""Accelerate needs no integration: ``lrpilot.attach(accelerator.prepare(
optimizer))`` in a real ``Accelerator(cpu=True, gradient_accumulation_steps=4)``
loop (tests/live/train_accelerate.py) with ``accelerator.accumulate(model)``,
``pilot.step(loss=...)`` after every batch, a plateau on a validation loss
and ``accelerator.register_for_checkpointing(pilot)``, against a real
`lrpilot daemon`, in lock-step mode.

One run steered from outside while it trains (`set-lr`, then `resume`) and
saved with ``save_state`` half-way, then a new process that ``load_state``s
that checkpoint and trains on. The pilot counts one step per four batches;
at every real step the LR the optimizer used equals the journal's, and the
resumed run's equal the uninterrupted run's; each step's record carries the
mean loss of its four batches.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import (
    LIVE,
    daemon_process,
    finish_live,
    lrs_from_journal,
    read_jsonl,
    settled_history,
    start_live,
    steer_at_gates,
    store_records,
    wait_for,
)

RUN = "accelerate-mlp"
BASE_LR = 0.05
ACCUMULATION, EPOCHS, BATCHES_PER_EPOCH = 4, 5, 32  # train_accelerate.py: 256 rows, batch 8
BATCHES = EPOCHS * BATCHES_PER_EPOCH
STEPS = BATCHES // ACCUMULATION  # real optimizer steps
EVAL_EVERY, SAVE_AT = 2, 20
HOLD_AT, RELEASE_AT, HELD_LR = 6, 10, 0.01
# On random labels the validation loss soon improves by less than the
# threshold: cuts before and after the checkpoint.
PLATEAU = {
    "kind": "plateau",
    "metric": "val_loss",
    "factor": 0.5,
    "patience": 1,
    "threshold": 0.002,
}
TRAIN = LIVE / "train_accelerate.py"


class Run:
    """One training process's output: per batch its loss, per real step the
    LRs the optimizer used; and its summary."""

    def __init__(self, where: Path, name: str) -> None:
        lines = read_jsonl(where / f"{name}.jsonl")
        self.losses = {line["batch"]: line["loss"] for line in lines if "batch" in line}
        self.used = {line["step"]: line["lrs"] for line in lines if "step" in line}
        self.summary = json.loads((where / f"{name}-summary.json").read_text())


def run_training(where: Path, name: str, config: dict) -> subprocess.Popen:
    config = {**config, "out": str(where / f"{name}.jsonl")}
    config["summary"] = str(where / f"{name}-summary.json")
    return start_live(TRAIN, where, name, config)


@pytest.fixture(scope="module")
def runs(lrpilot_exe, tmp_path_factory) -> Iterator[dict]:
    """The run (steered at its gates, saved at real step SAVE_AT), then the
    run resumed from that save in a new process; the journal after each."""
    where = tmp_path_factory.mktemp("accelerate")
    with daemon_process(lrpilot_exe, where / "state", where / "daemon.log") as daemon:
        config = {
            "address": daemon.address,
            "run": RUN,
            "policy": PLATEAU,
            "sync": True,
            "lr": BASE_LR,
            "accumulation": ACCUMULATION,
            "epochs": EPOCHS,
            "eval_every": EVAL_EVERY,
            "deadline_s": 100,
        }

        def history() -> list[dict]:
            return settled_history(lambda: daemon.cli("history", RUN), until_step=STEPS, timeout=30)

        checkpoint = where / "checkpoint"
        first = run_training(
            where,
            "full",
            {
                **config,
                "save_at": SAVE_AT,
                "save_dir": str(checkpoint),
                "gate_dir": str(where),
                "gates": [HOLD_AT, RELEASE_AT],
            },
        )

        try:
            steer_at_gates(daemon, first, where, "full", RUN, (HOLD_AT, RELEASE_AT), HELD_LR)
        finally:
            finish_live(first, where / "full.out")
        full_history = history()

        second = run_training(
            where, "resumed", {**config, "resume_from": str(checkpoint), "resume_step": SAVE_AT}
        )
        finish_live(second, where / "resumed.out")
        resumed_history = history()

        def stored() -> list | None:
            steps = [r for r in store_records(where / "state", RUN) if r[1] == "s"]
            return steps if len(steps) >= STEPS else None

        records = wait_for(stored, 30, "the run's step records in the store", daemon.log)
        yield {
            "full": Run(where, "full"),
            "resumed": Run(where, "resumed"),
            "full_history": full_history,
            "resumed_history": resumed_history[len(full_history) :],
            "step_records": records,
        }


def test_the_pilot_counts_one_step_per_accumulation_window(runs):
    full = runs["full"]
    summary = full.summary
    assert summary["batches"] == BATCHES
    assert summary["pilot_steps"] == summary["real_steps"] == STEPS == BATCHES // ACCUMULATION
    assert sorted(full.used) == list(range(1, STEPS + 1))  # the optimizer's real steps
    assert summary["warnings"] == []


def test_every_real_step_uses_the_lr_of_the_journal(runs):
    full, journal = runs["full"], runs["full_history"]
    assert all(e["applied_step"] == e["effective_step"] for e in journal), journal
    want = lrs_from_journal(journal, range(1, STEPS + 1), [BASE_LR])
    assert full.used == want, next(k for k in want if full.used[k] != want[k])
    operator = [e for e in journal if e["actor"] != "policy"]
    assert [e["hold"] for e in operator] == [True, False], operator
    assert operator[0]["new_lrs"] == [HELD_LR]
    assert HOLD_AT < operator[0]["effective_step"] < operator[1]["effective_step"]
    assert full.used[RELEASE_AT] == [HELD_LR]
    cuts = [e["effective_step"] for e in journal if e["actor"] == "policy"]
    assert any(SAVE_AT < k <= STEPS for k in cuts), cuts
    stats = full.summary["stats"]
    assert stats["foreign_lr_writes"] == stats["commands_late"] == 0, stats
    assert stats["sync_timeouts"] == stats["daemon_errors"] == 0, stats
    assert stats["commands_applied"] == len(journal)


def test_load_state_restores_the_pilot_and_the_lrs_go_on_as_uninterrupted(runs):
    full, resumed = runs["full"], runs["resumed"]
    summary = resumed.summary
    assert summary["resumed_at"] == SAVE_AT  # load_state gave the pilot its state
    assert summary["pilot_steps"] == summary["real_steps"] == STEPS
    assert sorted(resumed.used) == list(range(SAVE_AT + 1, STEPS + 1))
    assert resumed.used == {k: full.used[k] for k in resumed.used}
    journal = runs["resumed_history"]
    assert journal, "the resumed run made its own plateau decisions"
    assert all(e["applied_step"] == e["effective_step"] for e in journal), journal
    before = [e for e in runs["full_history"] if e["state_step"] <= SAVE_AT]
    want = lrs_from_journal(before + journal, range(1, STEPS + 1), [BASE_LR])
    assert resumed.used == {k: want[k] for k in resumed.used}
    stats = summary["stats"]
    assert stats["foreign_lr_writes"] == stats["sync_timeouts"] == stats["daemon_errors"] == 0
    # The daemon answers the resumed hello with the run's state at the
    # checkpoint as a command due at the next step (the same LRs): it can
    # come after that step, and is counted late. Every journaled change
    # landed on time (above).
    assert stats["commands_late"] <= 1, stats
    assert summary["warnings"] == []


def test_each_step_record_carries_the_mean_loss_of_its_batches(runs):
    # The store holds the last timeline: the run up to its checkpoint, then
    # the resumed run.
    losses = {**runs["full"].losses, **runs["resumed"].losses}
    records = runs["step_records"]
    assert [step for step, _, _ in records] == list(range(1, STEPS + 1))
    for step, _, metrics in records:
        window = [losses[b] for b in range((step - 1) * ACCUMULATION + 1, step * ACCUMULATION + 1)]
        assert metrics["loss"] == sum(window) / ACCUMULATION, (step, metrics, window)
