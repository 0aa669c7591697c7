"""Lightning: ``LRPilotCallback`` in real fits (tests/live/train_lightning.py,
its own process) against a real `lrpilot daemon`.

- one training process runs, one after the other: an uninterrupted fit; the
  same fit stopped part way with ModelCheckpoint; two new Trainers resuming
  from one of its checkpoints with ``ckpt_path``, one against the daemon that
  saw the run (and saw it go past the checkpoint), one against a fresh daemon
  and store; and a fit during which an operator runs ``lrpilot set-lr``. All
  accumulate gradients over 2 batches, with a plateau on val_loss in lock-step
  mode (so that the LRs are the same in any two fits of the same data);
- the LR every real optimizer step used (an optimizer step pre-hook in the
  script) is checked against ``lrpilot history``, against the uninterrupted
  fit after a resume, and against what LearningRateMonitor logged; the
  recorded stream holds one record per optimizer step with the mean loss of
  its batches, and one report per validation, none for the sanity check;
- Lightning DDP on 2 CPU processes (gloo): both ranks join one run as ranks 0
  and 1 of 2, and apply every change at the same step;
- in this process: what the callback refuses (two optimizers, an LR
  scheduler, ranks given by hand), what it warns about, and that it closes
  the pilot when a fit dies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from procs import (
    DIGITS_PLATEAU,
    LIVE,
    daemon_process,
    finish_live,
    free_address,
    lrs_from_journal,
    read_jsonl,
    settled_history,
    start_live,
    stored_records,
    wait_for,
)

from lrpilot.errors import UsageError
from lrpilot.policies import SpecError

TRAIN = LIVE / "train_lightning.py"
PLATEAU = DIGITS_PLATEAU
BASE_LRS = [0.2, 0.1]  # train_lightning.py's param groups: body, head
ACCUMULATE = 2
STEPS_PER_EPOCH = 1400 // 50 // ACCUMULATE  # 28 batches of 50, 2 a step
FULL_EPOCHS, PART_EPOCHS = 16, 8
FULL_STEPS = FULL_EPOCHS * STEPS_PER_EPOCH
# The checkpoint resumed from: the end of epoch 5 (epoch=5.ckpt, step 84),
# before the fit's first plateau cut but with a report that did not improve
# on the best already counted, so the cut comes where it came only if the
# checkpoint brought the plateau's state back. The part fit ran on to step
# 112 and cut at step 99 first: the daemon that saw it must go back.
RESUME_EPOCH = 5
RESUME_STEP = (RESUME_EPOCH + 1) * STEPS_PER_EPOCH
OPERATOR_EPOCHS = 10
HOLD_LR = 0.003


# --- the training process ---------------------------------------------------


def start_training(config: dict, where: Path, name: str = "train") -> subprocess.Popen:
    # No run id from the environment: run ids come from the callback's defaults.
    env = {"OMP_NUM_THREADS": "1"}
    return start_live(TRAIN, where, name, config, env, unset=["LRPILOT_RUN"], cwd=where)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def fit(name: str, address: str, epochs: int, **fields) -> dict:
    return {
        "name": name,
        "address": address,
        "run": None,
        "policy": PLATEAU,
        "sync": True,
        "max_epochs": epochs,
        "accumulate": ACCUMULATE,
        **fields,
    }


class Fit:
    """One fit's output on one rank (train_lightning.py's events and summary)."""

    def __init__(self, where: Path, name: str, rank: int = 0) -> None:
        self.events = read_jsonl(where / f"{name}.rank{rank}.jsonl")
        self.summary = json.loads((where / f"{name}.summary{rank}.json").read_text())
        self.used = {e["step"]: e["lrs"] for e in self.of("used")}
        steps = [e["step"] for e in self.of("used")]
        # One line per real optimizer step, each step once, in order.
        assert steps == list(range(steps[0], steps[0] + len(steps))), steps

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    @property
    def changes(self) -> list[tuple[int, list[float]]]:
        return [(e["step"], e["new"]) for e in self.of("change")]


@pytest.fixture(scope="module")
def fits(lrpilot_exe, digits, tmp_path_factory) -> dict:
    """The five fits of one training process (see the module's docstring),
    the journals and recorded streams the daemons have of them."""
    where = tmp_path_factory.mktemp("lightning")
    ckpt = where / "checkpoints"
    paused, go = where / "paused.json", where / "go"
    with (
        daemon_process(lrpilot_exe, where / "state", where / "daemon.log") as daemon,
        daemon_process(lrpilot_exe, where / "fresh", where / "fresh.log") as fresh,
    ):
        resume_from = str(ckpt / f"epoch={RESUME_EPOCH}.ckpt")
        gate = {"after_applied": 1, "paused_file": str(paused), "go_file": str(go)}
        config = {
            "data": str(digits),
            "out_dir": str(where),
            "deadline_s": 150,
            "fits": [
                fit("full", daemon.address, FULL_EPOCHS, run="full"),
                fit("part", daemon.address, PART_EPOCHS, run="part", checkpoint_dir=str(ckpt)),
                fit("resumed", daemon.address, FULL_EPOCHS, resume=resume_from),
                fit("resumed-fresh", fresh.address, FULL_EPOCHS, resume=resume_from),
                fit("operator", daemon.address, OPERATOR_EPOCHS, run="operator", gate=gate),
            ],
        }
        training = start_training(config, where)
        output = where / "train.out"

        def at_gate() -> bool:
            if training.poll() is not None:
                raise AssertionError(f"training exited early:\n{output.read_text()}")
            return paused.exists()

        try:
            wait_for(at_gate, 120, "the operator fit's first plateau cut", output.read_text)
            gated = json.loads(paused.read_text())
            set_lr = daemon.cli("set-lr", "operator", str(HOLD_LR))
            go.write_text("go")
        finally:
            if not go.exists():  # a failure before the go: the training would wait for it
                stop(training)
        finish_live(training, output)

        def history(on, name: str, last: int) -> list[dict]:
            # A decision on a fit's last report is due after its last step.
            return settled_history(lambda: on.cli("history", name), until_step=last, timeout=20)

        operator = Fit(where, "operator")
        steps = operator.summary["global_step"]
        reports = len([e for e in operator.of("val") if not e["sanity"]])
        return {
            "where": where,
            "gated": gated,
            "set_lr": set_lr,
            "full": Fit(where, "full"),
            "part": Fit(where, "part"),
            "resumed": Fit(where, "resumed"),
            "resumed-fresh": Fit(where, "resumed-fresh"),
            "operator": operator,
            "history": {
                "full": history(daemon, "full", FULL_STEPS),
                "resumed": history(daemon, "part", FULL_STEPS),
                "resumed-fresh": history(fresh, "part", FULL_STEPS),
                "operator": history(daemon, "operator", steps),
            },
            "operator_records": stored_records(daemon.state_dir, "operator", steps + reports),
        }


# --- a resume gives the LRs of the uninterrupted fit --------------------------


def test_the_uninterrupted_fit_cuts_where_its_journal_says(fits):
    full, history = fits["full"], fits["history"]["full"]
    steps = FULL_STEPS
    assert sorted(full.used) == list(range(1, steps + 1))
    assert full.summary["global_step"] == full.summary["pilot_step"] == steps
    assert full.used == lrs_from_journal(history, range(1, steps + 1), BASE_LRS)
    cuts = [e["effective_step"] for e in history]
    # Cuts on both sides of the checkpoint, or the resume proves little.
    assert [c for c in cuts if c > RESUME_STEP], cuts
    assert all(e["applied_step"] == e["effective_step"] for e in history), history
    assert full.changes == [(e["effective_step"], e["new_lrs"]) for e in history]


@pytest.mark.parametrize("name", ["resumed", "resumed-fresh"], ids=["daemon-up", "fresh-store"])
def test_a_resumed_fit_uses_the_lrs_of_the_uninterrupted_one(fits, name):
    full, part, resumed = fits["full"], fits["part"], fits[name]
    steps = FULL_STEPS
    # The part fit is the uninterrupted one up to where it stopped.
    assert sorted(part.used) == list(range(1, PART_EPOCHS * STEPS_PER_EPOCH + 1))
    assert part.used == {s: full.used[s] for s in part.used}
    assert f"epoch={RESUME_EPOCH}.ckpt" in part.summary["checkpoints"]

    # Every step after the checkpoint's, with the uninterrupted fit's LRs.
    assert sorted(resumed.used) == list(range(RESUME_STEP + 1, steps + 1))
    want = {s: full.used[s] for s in resumed.used}
    assert resumed.used == want, next(
        (s, resumed.used[s], want[s]) for s in sorted(want) if resumed.used[s] != want[s]
    )
    assert resumed.changes == [c for c in full.changes if c[0] > RESUME_STEP]
    assert resumed.summary["pilot_step"] == resumed.summary["global_step"] == steps
    # No run id given: the resumed fit goes on as the checkpoint's run.
    assert resumed.summary["run"] == part.summary["run"] == "part"
    assert resumed.summary["warnings"] == []
    assert resumed.summary["stats"]["foreign_lr_writes"] == 0

    # Each change the resumed fit made is in the journal of the daemon it
    # talked to, applied at its effective step.
    history = fits["history"][name]
    journaled = {(e["effective_step"], tuple(e["new_lrs"])): e for e in history}
    for step, lrs in resumed.changes:
        entry = journaled[(step, tuple(lrs))]
        assert entry["applied_step"] == step and entry["actor"] == "policy", entry
    if name == "resumed-fresh":
        # A daemon that never saw the run: its journal is the resumed fit's.
        start = full.used[RESUME_STEP]
        assert resumed.used == lrs_from_journal(history, range(RESUME_STEP + 1, steps + 1), start)

    # LearningRateMonitor, from the first batch after the resume on (the
    # optimizer's restored param groups already hold lrpilot's LRs): what
    # it logged at step s is what optimizer step s + 1 used.
    logged = resumed.of("logged")
    assert logged[0]["step"] == RESUME_STEP
    assert len(logged) == len(resumed.of("batch"))
    assert all(e["lrs"] == resumed.used[e["step"] + 1] for e in logged), logged


# --- an operator's set-lr, and every step against the journal -----------------


def test_set_lr_during_a_fit_holds_from_its_effective_step(fits):
    operator, history = fits["operator"], fits["history"]["operator"]
    steps = OPERATOR_EPOCHS * STEPS_PER_EPOCH
    assert sorted(operator.used) == list(range(1, steps + 1))
    assert operator.summary["global_step"] == operator.summary["pilot_step"] == steps

    *decided, held = history
    assert decided and {e["actor"] for e in decided} == {"policy"}, history
    # The set-lr came while the fit waited at its gate (after step k, with
    # the first cut in the param groups for step k + 1), for a later step.
    assert held["actor"] != "policy" and held["hold"] is True, held
    assert held["version"] == fits["set_lr"]["version"]
    assert held["new_lrs"] == [HOLD_LR, HOLD_LR]
    assert decided[0]["effective_step"] <= fits["gated"]["step"] + 1 < held["effective_step"]
    # Every real optimizer step used the journal's LRs: each change from its
    # effective step, on time, and nothing moves in between.
    assert operator.used == lrs_from_journal(history, range(1, steps + 1), BASE_LRS)
    assert all(e["applied_step"] == e["effective_step"] for e in history), history
    assert operator.changes == [(e["effective_step"], e["new_lrs"]) for e in history]
    assert operator.used[steps] == [HOLD_LR, HOLD_LR]
    stats = operator.summary["stats"]
    assert (stats["commands_applied"], stats["commands_late"]) == (len(history), 0)
    assert (stats["sync_timeouts"], stats["foreign_lr_writes"], stats["daemon_errors"]) == (0, 0, 0)
    assert operator.summary["warnings"] == []


def test_learning_rate_monitor_logs_the_lrs_the_optimizer_used(fits):
    operator = fits["operator"]
    logged = operator.of("logged")
    # LearningRateMonitor logs at every batch start, with the number of
    # optimizer steps taken so far: the LR it shows is the next step's.
    assert len(logged) == len(operator.of("batch")) == ACCUMULATE * len(operator.used)
    mismatched = [e for e in logged if e["lrs"] != operator.used[e["step"] + 1]]
    assert mismatched == []
    assert {tuple(e["lrs"]) for e in logged} == {tuple(lrs) for lrs in operator.used.values()}


def test_one_record_per_optimizer_step_and_one_report_per_validation(fits):
    operator, records = fits["operator"], fits["operator_records"]
    steps = sorted(operator.used)
    step_records = [(step, m) for step, kind, m in records if kind == "s"]
    reports = [(step, m) for step, kind, m in records if kind == "r"]
    # Accumulation: one record per real step, with the mean of its batches'
    # losses (Lightning hands callbacks the loss divided by the accumulation).
    assert [step for step, _ in step_records] == steps
    batches: dict[int, list[float]] = {}
    for batch in operator.of("batch"):
        batches.setdefault(batch["step"], []).append(batch["loss"])
    assert all(len(losses) == ACCUMULATE for losses in batches.values())
    want = [{"loss": sum(batches[s]) / ACCUMULATE} for s in steps]
    assert [m for _, m in step_records] == want
    # A report after each validation with the value Lightning logged, and
    # none for the sanity check before the fit.
    validations = operator.of("val")
    assert [v["sanity"] for v in validations] == [True] + [False] * OPERATOR_EPOCHS
    assert reports == [(v["step"], {"val_loss": v["val_loss"]}) for v in validations[1:]]
    # ... and the pilot sent nothing else (a report of the sanity check would
    # be one more record, at step 0).
    assert operator.summary["stats"]["records_sent"] == len(records)


# --- Lightning DDP, two CPU ranks ---------------------------------------------


def test_ddp_ranks_join_one_run_and_apply_every_change_at_the_same_step(
    running_daemon, digits, tmp_path
):
    daemon = running_daemon
    paused, go = tmp_path / "paused.json", tmp_path / "go"
    epochs = 20
    config = {
        "data": str(digits),
        "out_dir": str(tmp_path),
        "deadline_s": 120,
        "strategy": "ddp",
        "devices": 2,
        # No run id: each rank would make its own; the callback gives rank 0's to all.
        "fits": [
            fit(
                "ddp",
                daemon.address,
                epochs,
                sync=False,
                gate={"after_step": 4, "paused_file": str(paused), "go_file": str(go)},
            )
        ],
    }
    training = start_training(config, tmp_path)
    output = tmp_path / "train.out"

    def detail() -> str:
        return output.read_text() + "\n--- daemon log\n" + daemon.log()[-3000:]

    try:
        wait_for(
            lambda: paused.exists() or training.poll() is not None, 90, "rank 0 at step 4", detail
        )
        assert training.poll() is None, detail()
        run = json.loads(paused.read_text())["run"]

        def both_ranks() -> list | None:
            runs = daemon.cli("runs")
            return runs if runs and runs[0]["ranks"] == [0, 1] else None

        runs = wait_for(both_ranks, 20, "both ranks in `lrpilot runs`", detail)
        assert [(r["run"], r["ranks"], r["world_size"]) for r in runs] == [(run, [0, 1], 2)]
        go.write_text("go")
    finally:
        if not go.exists():
            stop(training)
    finish_live(training, output)
    steps = epochs * STEPS_PER_EPOCH // 2  # each rank takes half the batches
    # A decision on the last report may be due after the last step.
    history = settled_history(lambda: daemon.cli("history", run), until_step=steps, timeout=20)
    ranks = [Fit(tmp_path, "ddp", rank) for rank in (0, 1)]
    for rank, one in enumerate(ranks):
        summary = one.summary
        assert (summary["run"], summary["rank"], summary["world_size"]) == (run, rank, 2)
        assert summary["global_step"] == summary["pilot_step"] == steps
        # No rank_taken, no late command: two sessions, one per rank.
        assert summary["warnings"] == [], summary
        assert summary["stats"]["commands_late"] == 0, summary
        assert sorted(one.used) == list(range(1, steps + 1))
    assert history and {e["actor"] for e in history} == {"policy"}, history
    # The same LRs at every step on both ranks, the journal's, changing at
    # its effective steps; DDP's replicas end as one model.
    assert ranks[0].used == ranks[1].used
    due = [e for e in history if e["effective_step"] <= steps]
    assert ranks[0].used == lrs_from_journal(due, range(1, steps + 1), BASE_LRS)
    # A change due at the step after the last is set by the last step (and
    # called back) when it came in time, else not at all.
    in_run = [(e["effective_step"], e["new_lrs"]) for e in due]
    after = [
        (e["effective_step"], e["new_lrs"]) for e in history if e["effective_step"] == steps + 1
    ]
    assert ranks[0].changes == ranks[1].changes
    assert ranks[0].changes in (in_run, in_run + after), (ranks[0].changes, history)
    assert ranks[0].summary["params_sha256"] == ranks[1].summary["params_sha256"]


# --- in this process: refusals, warnings, the end of a fit --------------------


def tiny_fit(callback, module=None, batches: int = 4, ckpt_path=None, **trainer_args):
    """A few steps of a linear model on random data, in this process."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(batches * 8, 4), torch.randn(batches * 8, 1))
    trainer_args.setdefault("max_epochs", 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_args,
    )
    loader = DataLoader(data, batch_size=8)
    trainer.fit(module or tiny_module(), loader, loader, ckpt_path=ckpt_path)
    return trainer


def tiny_module(configure=None, manual: bool = False, fail_at: int | None = None):
    """A linear model; ``configure(module)`` is its configure_optimizers
    (default: one SGD, kept as ``module.made`` for the test to step)."""
    import lightning.pytorch as pl
    import torch

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.automatic_optimization = not manual  # Lightning's rule for several optimizers
            self.made = None

        def training_step(self, batch, batch_idx):
            if batch_idx == fail_at:
                raise RuntimeError("the fit dies here")
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_mse", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

        def configure_optimizers(self):
            if configure is not None:
                return configure(self)
            self.made = torch.optim.SGD(self.parameters(), lr=0.1)
            return self.made

    return Tiny()


def test_importing_lrpilot_does_not_import_lightning():
    code = (
        "import json, sys, lrpilot, lrpilot.integrations\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


def test_more_than_one_optimizer_is_refused():
    import torch

    from lrpilot.integrations.lightning import LRPilotCallback

    def two(module):
        return [torch.optim.SGD([p], lr=0.1) for p in module.parameters()]

    callback = LRPilotCallback(policy=None, daemon=free_address())
    with pytest.raises(UsageError, match="steers one optimizer; configure_optimizers gave 2"):
        tiny_fit(callback, tiny_module(two, manual=True))
    assert callback.pilot is None  # refused before anything was attached


def test_an_lr_scheduler_next_to_the_callback_is_refused():
    import torch

    from lrpilot.integrations.lightning import LRPilotCallback

    def with_scheduler(module):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    callback = LRPilotCallback(policy={"kind": "cosine", "T_max": 10}, daemon=free_address())
    with pytest.raises(UsageError, match=r"also returns an LR scheduler \(StepLR\)"):
        tiny_fit(callback, tiny_module(with_scheduler))
    assert callback.pilot is None


def test_arguments_are_checked_when_the_callback_is_made():
    from lrpilot.integrations.lightning import LRPilotCallback

    with pytest.raises(UsageError, match="rank, world_size come from the trainer"):
        LRPilotCallback(rank=0, world_size=2)
    with pytest.raises(SpecError):
        LRPilotCallback(policy={"kind": "plateau", "factor": 2})
    with pytest.raises(UsageError, match="run must be 1 to 200 printable characters"):
        LRPilotCallback(run="bad\nrun")


def test_a_missing_monitor_warns_once_and_reports_nothing(running_daemon):
    from lrpilot.integrations.lightning import LRPilotCallback

    daemon = running_daemon
    # The policy decides on val_loss; the module logs val_mse.
    callback = LRPilotCallback(
        policy={"kind": "plateau", "metric": "val_loss"}, run="no-monitor", daemon=daemon.address
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tiny_fit(callback, batches=4, max_epochs=2)
    ours = [w for w in caught if str(w.message).startswith("lrpilot")]
    said = [str(w.message) for w in ours]
    assert len(said) == 1, said
    # Pointed at the user's trainer.fit(...), not at Lightning's insides.
    assert ours[0].filename == __file__
    assert "'val_loss' is not among the logged metrics" in said[0]
    assert "val_mse" in said[0]
    records = stored_records(daemon.state_dir, "no-monitor", 8)
    assert [kind for _, kind, _ in records] == ["s"] * 8 == ["s"] * trainer.global_step


def test_a_policy_watching_another_metric_than_monitor_is_warned_about():
    from lrpilot.integrations.lightning import LRPilotCallback

    callback = LRPilotCallback(
        policy={"kind": "plateau", "metric": "val_acc"}, monitor="val_mse", daemon=free_address()
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_fit(callback)
    said = [str(w.message) for w in caught if str(w.message).startswith("lrpilot")]
    assert said == [
        "lrpilot: the policy decides on 'val_acc' but the callback reports 'val_mse' after "
        "validation: set monitor= to the policy's metric"
    ]


def test_a_fit_that_dies_closes_its_pilot(running_daemon):
    from lrpilot.integrations.lightning import LRPilotCallback

    daemon = running_daemon
    callback = LRPilotCallback(policy=None, monitor="val_mse", run="dies", daemon=daemon.address)
    module = tiny_module(fail_at=3)
    with pytest.raises(RuntimeError, match="the fit dies here"):
        tiny_fit(callback, module, batches=6)
    pilot = callback.pilot
    assert pilot is not None and pilot.step_count == 3
    # Closed: it said bye (the daemon ends the run), and the optimizer's
    # steps are no longer counted.
    wait_for(
        lambda: [r["status"] for r in daemon.cli("runs") if r["run"] == "dies"] == ["ended"],
        10,
        "the run to end",
        daemon.log,
    )
    module.made.step()
    assert pilot.step_count == 3
    # Its state stays with the callback, for a checkpoint saved after.
    assert callback.state_dict()["pilot"]["step"] == 3


def test_a_resume_with_nothing_left_to_train_stays_at_the_checkpoint_s_step(
    running_daemon, tmp_path
):
    from lrpilot.integrations.lightning import LRPilotCallback

    daemon = running_daemon
    policy = {"kind": "cosine", "T_max": 10}
    first = LRPilotCallback(policy=policy, monitor="val_mse", run="done", daemon=daemon.address)
    trainer = tiny_fit(first, batches=4)
    # Saved after the fit: the callback keeps the state it closed with.
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    assert first.state_dict()["pilot"]["step"] == 4

    def ended_after(when: float) -> dict | None:
        shown = [r for r in daemon.cli("runs") if r["run"] == "done"]
        return shown[0] if shown and (shown[0]["ended"] or 0) > when else None

    ended = wait_for(lambda: ended_after(0), 10, "the first fit's goodbye")["ended"]
    # The checkpoint is at max_epochs already: Lightning trains nothing and
    # never calls on_train_start.
    again = LRPilotCallback(policy=policy, monitor="val_mse", daemon=daemon.address)
    resumed = tiny_fit(again, ckpt_path=str(tmp_path / "end.ckpt"))
    assert resumed.global_step == 4
    assert again.pilot is not None and again.pilot.run == "done"
    assert again.state_dict()["pilot"]["step"] == 4
    assert first.pilot is not None and again.pilot.lrs == first.pilot.lrs != [0.1]
    # The daemon heard the run come back at step 4 and leave, not start
    # over from step 0 (which it would mark in the journal).
    run = wait_for(lambda: ended_after(ended), 10, "the second fit's goodbye")
    assert run["step"] == 4
    assert daemon.cli("history", "done") == []
