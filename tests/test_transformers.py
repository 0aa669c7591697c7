"""``lrpilot.integrations.transformers.LRPilotCallback`` on real
``transformers.Trainer`` fits (tests/live/train_transformers.py: a tiny BERT
from a config, in-memory data, gradient accumulation, the Trainer's warmup
scheduler, an evaluation every few steps, checkpoints), each in its own
process, against a real `lrpilot daemon`, in lock-step mode so that every
decision lands at the step it is meant for.

One uninterrupted fit, steered from outside while it runs (`set-lr`, then
`resume`), then two resumes from its mid-run checkpoint in new Trainers:
one against the same daemon, one (with
``restore_callback_states_from_checkpoint``) against a daemon with a fresh
store. At every real optimizer step the LR the optimizer used is checked
against the daemon's journal, against the ``learning_rate`` the Trainer
logged, and for the resumes against the uninterrupted fit.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import (
    LIVE,
    DaemonProcess,
    daemon_process,
    finish_live,
    lrs_from_journal,
    read_jsonl,
    settled_history,
    simulate,
    start_live,
    steer_at_gates,
    store_records,
    wait_for,
)

RUN = "hf-tiny"
BASE_LR = 0.01  # TrainingArguments.learning_rate: both of the Trainer's param groups
STEPS, EVAL_EVERY, SAVE_EVERY, ACCUMULATION, WARMUP = 36, 2, 18, 2, 5
HOLD_AT, RELEASE_AT, HELD_LR = 6, 10, 0.002  # set-lr after step 6, resume after step 10
# On the tiny BERT's random labels the evaluation loss soon improves by less
# than the threshold: a cut every few evaluations, before and after the
# checkpoint (and its state holds a bad count to carry over).
PLATEAU = {
    "kind": "plateau",
    "metric": "eval_loss",
    "factor": 0.5,
    "patience": 1,
    "threshold": 0.003,
}
COSINE = {"kind": "cosine", "T_max": STEPS}
TRAIN = LIVE / "train_transformers.py"


class Fit:
    """One training's output: the LRs of each real optimizer step, its summary."""

    def __init__(self, where: Path, name: str) -> None:
        self.summary = json.loads((where / f"{name}.json").read_text())
        lines = read_jsonl(where / f"{name}.jsonl")
        self.used = {line["step"]: line["lrs"] for line in lines}
        steps = [line["step"] for line in lines]
        assert steps == list(range(steps[0], steps[0] + len(steps))), steps

    @property
    def logged(self) -> dict[int, float]:
        """The learning_rate the Trainer logged at each step."""
        history = self.summary["log_history"]
        return {e["step"]: e["learning_rate"] for e in history if "learning_rate" in e}


def training(where: Path, name: str, **fields) -> dict:
    return {
        "output_dir": str(where / f"{name}-out"),
        "out": str(where / f"{name}.jsonl"),
        "summary": str(where / f"{name}.json"),
        **fields,
    }


def start(where: Path, name: str, config: dict) -> subprocess.Popen:
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # nothing from a hub
    return start_live(TRAIN, where, name, config, offline)


@pytest.fixture(scope="module")
def fits(lrpilot_exe, tmp_path_factory) -> Iterator[dict]:
    """The uninterrupted fit (steered at its gates) and a resume from its
    checkpoint at step SAVE_EVERY, on one daemon; then a resume from the same
    checkpoint against a daemon with a fresh store, which has never seen the
    run. The journal after each."""
    where = tmp_path_factory.mktemp("transformers")
    config = {
        "run": RUN,
        "policy": PLATEAU,
        "sync": True,
        "steps": STEPS,
        "eval_steps": EVAL_EVERY,
        "save_steps": SAVE_EVERY,
        "accumulation": ACCUMULATION,
        "warmup_steps": WARMUP,
        "lr": BASE_LR,
        "deadline_s": 100,
        "gate_dir": str(where),
        "gates": [HOLD_AT, RELEASE_AT],
    }
    checkpoint = str(where / "full-out" / f"checkpoint-{SAVE_EVERY}")
    with daemon_process(lrpilot_exe, where / "state", where / "daemon.log") as daemon:
        config["address"] = daemon.address
        first = start(where, "full", {**config, "trainings": [training(where, "full", gated=True)]})

        try:
            steer_at_gates(daemon, first, where, "full", RUN, (HOLD_AT, RELEASE_AT), HELD_LR)
        finally:
            finish_live(first, where / "full.out")
        full_history = history(daemon)

        resume = training(where, "resumed", resume_from=checkpoint)
        finish_live(
            start(where, "resumed", {**config, "trainings": [resume]}), where / "resumed.out"
        )
        resumed_history = history(daemon)

        def stored() -> list | None:
            reports = reports_of(store_records(where / "state", RUN))
            return reports if len([m for _, m in reports if "loss" in m]) >= STEPS else None

        records = wait_for(stored, 30, "the run's reports in the store", daemon.log)

    # A second resume from that checkpoint against the same store would meet
    # a daemon bug (the rebuilt state can count the checkpoint step's
    # evaluation twice): this one's daemon has a fresh store, on the same
    # address (the checkpoint's callback has it).
    fresh = where / "fresh"
    fresh.mkdir()
    second = DaemonProcess(
        lrpilot_exe,
        fresh / "state",
        fresh / "daemon.log",
        address=daemon.address,
        control=daemon.control,
    )
    try:
        daemon = second.wait_ready()
        # The Trainer builds the callback again from the checkpoint.
        restored = training(where, "restored", resume_from=checkpoint, restore_callback_states=True)
        # A run without a policy, under the same warmup.
        bare = training(where, "bare", run="hf-bare", policy=None)
        # A scheduler the Trainer steps after evaluations and reads the LR
        # it logs of from the param groups.
        cosine = training(
            where,
            "cosine",
            run="hf-cosine",
            policy=COSINE,
            lr_scheduler_type="reduce_lr_on_plateau",
        )
        third = start(where, "restored", {**config, "trainings": [restored, bare, cosine]})
        finish_live(third, where / "restored.out")
        restored_history = history(daemon)
    finally:
        second.stop()

    yield {
        "full": Fit(where, "full"),
        "resumed": Fit(where, "resumed"),
        "restored": Fit(where, "restored"),
        "bare": Fit(where, "bare"),
        "cosine": Fit(where, "cosine"),
        "full_history": full_history,
        "resumed_history": resumed_history[len(full_history) :],
        "restored_history": restored_history,
        "records": records,
    }


def history(daemon) -> list[dict]:
    return settled_history(lambda: daemon.cli("history", RUN), until_step=STEPS, timeout=30)


def reports_of(records: list[tuple[int, str, dict]]) -> list[tuple[int, dict]]:
    return [(step, metrics) for step, kind, metrics in records if kind == "r"]


def test_every_real_step_uses_the_lr_of_the_journal(fits):
    fit, journal = fits["full"], fits["full_history"]
    summary = fit.summary
    # One real step per ACCUMULATION batches, counted by the pilot as by the
    # Trainer, and the optimizer stepped that often.
    assert summary["pilot_steps"] == summary["global_step"] == STEPS
    assert sorted(fit.used) == list(range(1, STEPS + 1))
    # The Trainer's warmup would have started at 0 (its scheduler wrote it):
    # lrpilot's policy governs from the first step.
    assert all(fit.used[k] == [BASE_LR, BASE_LR] for k in range(1, WARMUP + 1))
    assert all(e["applied_step"] == e["effective_step"] for e in journal), journal
    want = lrs_from_journal(journal, range(1, STEPS + 1), [BASE_LR, BASE_LR])
    assert fit.used == want, next(k for k in want if fit.used[k] != want[k])
    # What the journal holds: the operator's hold and its release, and the
    # plateau's cuts on the evaluation loss, before and after the checkpoint.
    operator = [e for e in journal if e["actor"] != "policy"]
    assert [e["hold"] for e in operator] == [True, False], operator
    assert operator[0]["new_lrs"] == [HELD_LR, HELD_LR]
    assert HOLD_AT < operator[0]["effective_step"] < operator[1]["effective_step"]
    assert operator[1]["effective_step"] > RELEASE_AT
    assert fit.used[RELEASE_AT] == [HELD_LR, HELD_LR]
    cuts = [e["effective_step"] for e in journal if e["actor"] == "policy"]
    assert any(k <= SAVE_EVERY for k in cuts) and any(SAVE_EVERY < k <= STEPS for k in cuts), cuts
    stats = summary["stats"]
    assert stats["foreign_lr_writes"] == 0, stats
    assert stats["commands_late"] == stats["sync_timeouts"] == stats["daemon_errors"] == 0, stats
    assert stats["commands_applied"] == len(journal)
    assert summary["warnings"] == []


def test_the_trainer_logs_the_lr_the_optimizer_used(fits):
    for name in ("full", "resumed", "restored", "bare", "cosine"):
        fit = fits[name]
        first = min(fit.used)
        logged = {k: lr for k, lr in fit.logged.items() if k >= first}
        assert sorted(logged) == list(range(first, STEPS + 1)), (name, sorted(logged))
        assert logged == {k: lrs[0] for k, lrs in fit.used.items()}, name
        # The scheduler never stepped, and has its own class back.
        assert fit.summary["scheduler_last_epoch"] == 0, name
        assert fit.summary["scheduler_class"].startswith("torch."), name
    # ... and the LR does change within the fit: the log shows the cuts.
    assert len(set(fits["full"].logged.values())) >= 4


@pytest.mark.parametrize("name", ["resumed", "restored"])
def test_a_resume_from_a_checkpoint_uses_the_lrs_of_the_uninterrupted_fit(fits, name):
    fit, full = fits[name], fits["full"]
    summary = fit.summary
    # restore_callback_states_from_checkpoint: the Trainer put a callback
    # built from the checkpoint in place of the script's; without it, the
    # script's loaded the checkpoint's state. Either way the same LRs.
    assert summary["replaced"] is (name == "restored")
    assert summary["pilot_steps"] == summary["global_step"] == STEPS
    assert sorted(fit.used) == list(range(SAVE_EVERY + 1, STEPS + 1))
    assert fit.used == {k: full.used[k] for k in fit.used}
    # The resumed timeline, as the journal has it: the fit's changes made up
    # to the checkpoint (the evaluation at its step included), then the
    # resume's own: the daemon rewound the run to the checkpoint's step, or
    # (a fresh store) took it from the checkpoint's state, and decides
    # again on the same evaluations.
    journal = fits[f"{name}_history"]
    assert journal, "the resume made its own plateau decisions"
    assert all(e["applied_step"] == e["effective_step"] for e in journal), journal
    before = [e for e in fits["full_history"] if e["state_step"] <= SAVE_EVERY]
    want = lrs_from_journal(before + journal, range(1, STEPS + 1), [BASE_LR, BASE_LR])
    assert fit.used == {k: want[k] for k in fit.used}
    stats = summary["stats"]
    assert stats["foreign_lr_writes"] == stats["sync_timeouts"] == stats["daemon_errors"] == 0
    # The daemon answers the resumed hello with the run's state at the
    # checkpoint as a command due at the next step (the same LRs): it can
    # come after that step, and is counted late. Every journaled change
    # landed on time (above).
    assert stats["commands_late"] <= 1, stats
    assert summary["warnings"] == []


def test_the_daemon_records_the_logged_loss_and_the_evaluation_loss(fits):
    # The store keeps the last timeline: the fit up to the checkpoint, then
    # the resume; its log_history holds both parts too.
    history = fits["resumed"].summary["log_history"]
    reports = fits["records"]
    losses = [(step, m["loss"]) for step, m in reports if "loss" in m]
    assert losses == [(e["step"], e["loss"]) for e in history if "loss" in e]
    evaluations = [(step, m["eval_loss"]) for step, m in reports if "eval_loss" in m]
    assert evaluations == [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    assert len(evaluations) == STEPS // EVAL_EVERY


def test_a_step_driven_policy_is_exact_under_a_plateau_scheduler_type(fits, lrpilot_exe):
    # lr_scheduler_type="reduce_lr_on_plateau": the Trainer would read the
    # LR it logs from the param groups, where the next step's is already.
    fit = fits["cosine"]
    stream = "".join(json.dumps({"step": k, "metrics": {}}) + "\n" for k in range(1, STEPS))
    after = simulate(lrpilot_exe, COSINE, stream, [BASE_LR, BASE_LR])
    assert fit.used == {1: [BASE_LR, BASE_LR], **{k + 1: lrs for k, lrs in enumerate(after, 1)}}
    assert fit.logged == {k: lrs[0] for k, lrs in fit.used.items()}
    assert fit.summary["stats"]["foreign_lr_writes"] == 0
    assert fit.summary["warnings"] == []


def test_without_a_policy_the_trainer_s_warmup_does_not_set_the_lr(fits):
    fit = fits["bare"]
    assert fit.used == {k: [BASE_LR, BASE_LR] for k in range(1, STEPS + 1)}
    stats = fit.summary["stats"]
    assert stats["foreign_lr_writes"] == 0 and stats["commands_applied"] == 0, stats
    assert fit.summary["warnings"] == []


def test_the_callback_checks_its_arguments_where_the_trainer_is_built():
    from lrpilot import SpecError
    from lrpilot.integrations.transformers import LRPilotCallback

    with pytest.raises(TypeError, match="sync_timout"):
        LRPilotCallback(policy=PLATEAU, sync_timout=3.0)
    with pytest.raises(SpecError, match="factor"):
        LRPilotCallback(policy={**PLATEAU, "factor": 2})
    with pytest.warns(RuntimeWarning, match="watches val_loss"):
        LRPilotCallback(policy={**PLATEAU, "metric": "val_loss"})

    # What a checkpoint holds of it is JSON (trainer_state.json), and is what
    # restore_callback_states_from_checkpoint builds the callback again from;
    # a callable cannot be in it.
    callback = LRPilotCallback(
        policy=PLATEAU, run="r", sync=True, sync_timeout=3.0, on_change=print, keys=Path("k")
    )
    saved = json.loads(json.dumps(callback.state()))
    assert saved["attributes"] == {"pilot_state": None}  # not attached yet
    again = LRPilotCallback.from_state(saved)
    assert (again.policy, again.run, again.sync) == (callback.policy, "r", True)
    assert again.attach_kwargs == {"sync_timeout": 3.0, "keys": "k"}
