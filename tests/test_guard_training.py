"""The ``guard`` policy on a real training that meets a corrupted batch: a
real `lrpilot daemon` process, a real torch training (tests/live/train_guard.py:
an MLP on the digits, SGD with momentum, lock-step) over real ZeroMQ.

Four runs of the same script, same seed, same data, same batches, on a
cosine decay; at step INJECT one batch is corrupted:

- its inputs times 1e30 (a spike: the loss of that batch is ~1e28, finite,
  and the update it makes sends the weights to inf/NaN from the next step);
- or one pixel NaN (the loss is NaN and so is every weight after the update).

Without the guard (the cosine alone) nothing tells the loop: the run is NaN
from there to the end, at chance accuracy. With ``{"kind": "guard", "inner":
<the cosine>}`` the trip shows in ``pilot.tripped`` right after
``pilot.step()`` of the bad step (lock-step), the loop loads its last good
in-memory copy back, the LRs are the cosine's times ``cut`` for ``hold``
optimizer steps and the cosine's again after, the journal and /metrics name
the trip, and the run ends with the digits learned (validation accuracy above
0.9; the unguarded runs end at chance, 0.1).

The training runs once, for the module; each test reads what it needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import (
    DaemonProcess,
    daemon_process,
    finish_live,
    first_difference,
    metric_value,
    read_jsonl,
    settled_history,
    start_guard,
)

STEPS, INJECT, SAVE_EVERY, VAL_EVERY = 400, 150, 20, 50
LAST_SAVE = (INJECT - 1) // SAVE_EVERY * SAVE_EVERY  # the last copy before the bad step
BASE_LRS = [0.1, 0.05]  # groups body and head
HOLD, CUT = 30, 0.1
SCALE = 1e30
INNER = {"kind": "cosine", "T_max": STEPS, "eta_min": 0.001}
# factor 10: the converged loss of a batch of 64 is noisy enough to go past
# 3x its mean now and then (a needless trip); the corrupted batch's is 1e29x.
GUARD = {"kind": "guard", "inner": INNER, "factor": 10.0, "cut": CUT, "hold": HOLD}
SPIKE = {"step": INJECT, "kind": "scale", "factor": SCALE}
NAN = {"step": INJECT, "kind": "nan"}
RUNS = {
    "bare-spike": (INNER, SPIKE),
    "guard-spike": (GUARD, SPIKE),
    "guard-nan": (GUARD, NAN),
    "bare-nan": (INNER, NAN),
}
GUARDED = {"guard-spike": "guard:spike", "guard-nan": "guard:nan"}
BARE = {"bare-spike": "guard-spike", "bare-nan": "guard-nan"}  # -> its guarded twin


class Trained:
    """What the training wrote, per run: its step lines and its end line."""

    def __init__(self, daemon: DaemonProcess, where: Path) -> None:
        self.daemon, self.where = daemon, where
        self.steps: dict[str, list[dict]] = {}
        self.end: dict[str, dict] = {}
        for run in RUNS:
            lines = read_jsonl(where / f"{run}.jsonl")
            assert lines and lines[-1].get("event") == "end", self.detail(run)
            self.steps[run], self.end[run] = lines[:-1], lines[-1]
            assert [s["step"] for s in self.steps[run]] == list(range(1, STEPS + 1))

    def step(self, run: str, k: int) -> dict:
        return self.steps[run][k - 1]

    def lrs(self, run: str) -> list[list[float]]:
        """The LRs optimizer step k used, k = 1..STEPS."""
        return [s["lrs"] for s in self.steps[run]]

    def detail(self, run: str, *found: object) -> str:
        """For a failure message: what was ``found``, the run's steps around
        the bad batch and around the hand-back, its end line, the training's
        output and the daemon's log."""
        path = self.where / f"{run}.jsonl"
        lines = read_jsonl(path) if path.exists() else []
        near = [
            line
            for line in lines
            if "step" in line
            and (
                INJECT - 3 <= line["step"] <= INJECT + 3
                or INJECT + HOLD - 1 <= line["step"] <= INJECT + HOLD + 2
            )
        ]
        out = self.where / "train.out"
        return "\n".join(
            [
                *(repr(item) for item in found),
                f"--- {run}: steps near {INJECT} and {INJECT + HOLD}",
                *(json.dumps(line) for line in near),
                f"--- {run}: end",
                json.dumps(lines[-1] if lines else None),
                "--- training output",
                out.read_text()[-3000:] if out.exists() else "(none)",
                "--- daemon log",
                self.daemon.log()[-3000:],
            ]
        )


@pytest.fixture(scope="module")
def trained(lrpilot_exe, digits, tmp_path_factory) -> Iterator[Trained]:
    where = tmp_path_factory.mktemp("guard-training")
    with daemon_process(lrpilot_exe, where / "state", where / "daemon.log") as daemon:
        runs = [
            {"run": run, "policy": policy, "inject": inject, "out": str(where / f"{run}.jsonl")}
            for run, (policy, inject) in RUNS.items()
        ]
        config = {
            "address": daemon.address,
            "data": str(digits),
            "steps": STEPS,
            "save_every": SAVE_EVERY,
            "val_every": VAL_EVERY,
            "lrs": BASE_LRS,
            "deadline_s": 90,
            "runs": runs,
        }
        training = start_guard(config, where)
        try:
            finish_live(training, where / "train.out", timeout=120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log\n{daemon.log()[-5000:]}") from None
        yield Trained(daemon, where)


def cosine(k: int) -> list[float]:
    """The cosine's LRs for optimizer step k (torch's closed form)."""
    factor = (1 + math.cos(math.pi * (k - 1) / STEPS)) / 2
    return [INNER["eta_min"] + (lr - INNER["eta_min"]) * factor for lr in BASE_LRS]


# --- one script, one seed, one data ----------------------------------------------


def test_the_runs_are_one_run_until_the_bad_batch(trained):
    first = trained.steps["bare-spike"][: INJECT - 1]
    for run in RUNS:
        before = trained.steps[run][: INJECT - 1]
        assert [s["loss"] for s in before] == [s["loss"] for s in first], trained.detail(run)
        assert [s["lrs"] for s in before] == [s["lrs"] for s in first], trained.detail(run)
        assert all(s["tripped"] is None and s["trips"] == 0 for s in before), trained.detail(run)
        end = trained.end[run]
        assert end["warnings"] == [], trained.detail(run)
        assert end["stats"]["sync_timeouts"] == 0, trained.detail(run)
        assert end["stats"]["commands_late"] == 0, trained.detail(run)
    # A sane LR: by the bad batch the model has learned the digits (the
    # last validation before it).
    checked = (INJECT - 1) // VAL_EVERY * VAL_EVERY
    assert trained.step("bare-spike", checked)["val_acc"] > 0.9, trained.detail("bare-spike")


def test_the_lrs_of_a_run_without_the_guard_are_the_cosines(trained):
    for run in BARE:
        for k, lrs in enumerate(trained.lrs(run), start=1):
            assert lrs == pytest.approx(cosine(k), rel=1e-9, abs=0), trained.detail(
                run, f"step {k}: {lrs} != {cosine(k)}"
            )


# --- without the guard ---------------------------------------------------------


@pytest.mark.parametrize("run", list(BARE))
def test_without_the_guard_the_run_diverges_and_stays_diverged(trained, run):
    bad = trained.step(run, INJECT)["loss"]
    if run == "bare-spike":
        # The spike itself is finite: only a spike check can see it.
        assert math.isfinite(bad) and bad > 1e20, trained.detail(run)
    else:
        assert math.isnan(bad), trained.detail(run)
    after = [s["loss"] for s in trained.steps[run][INJECT:]]
    assert all(math.isnan(loss) for loss in after), trained.detail(run)
    tripped = [s for s in trained.steps[run] if s["tripped"] is not None or s["trips"]]
    assert tripped == [], trained.detail(run, tripped[:3])
    assert not any("reloaded" in s for s in trained.steps[run]), trained.detail(run)
    end = trained.end[run]
    assert math.isnan(end["val_loss"]) and math.isnan(end["last_losses"]), trained.detail(run)
    assert end["val_acc"] < 0.2, trained.detail(run)  # chance is 0.1
    assert end["trips"] == 0 and end["stats"]["commands_applied"] == 0, trained.detail(run)


# --- with the guard ------------------------------------------------------------


@pytest.mark.parametrize("run", list(GUARDED))
def test_the_guard_trips_right_after_the_bad_steps_pilot_step(trained, run):
    """Lock-step: the trip decided on step INJECT's loss is in
    ``pilot.tripped`` right after that step's ``pilot.step()``, only then;
    the loop loads its last good copy back."""
    cause = GUARDED[run]
    tripped = [s["step"] for s in trained.steps[run] if s["tripped"] is not None]
    assert tripped == [INJECT], trained.detail(run)
    at = trained.step(run, INJECT)
    value = None if cause == "guard:nan" else at["loss"]
    want = {"step": INJECT, "cause": cause, "metric": "loss", "value": value}
    assert at["tripped"] == want, trained.detail(run)
    if cause == "guard:nan":
        assert math.isnan(at["loss"]), trained.detail(run)
    else:
        assert at["loss"] > 1e20, trained.detail(run)
    assert [s["trips"] for s in trained.steps[run]] == [0] * (INJECT - 1) + [1] * (
        STEPS - INJECT + 1
    ), trained.detail(run)
    assert at["reloaded"] == LAST_SAVE, trained.detail(run)
    reloads = [s["step"] for s in trained.steps[run] if "reloaded" in s]
    assert reloads == [INJECT], trained.detail(run)
    end = trained.end[run]
    assert end["trips"] == 1 and end["stats"]["commands_applied"] == 1, trained.detail(run)


@pytest.mark.parametrize("run", list(GUARDED))
def test_the_lrs_are_the_inners_times_cut_for_hold_steps_then_the_inners(trained, run):
    """Read from the optimizer at each step: the cosine's (the unguarded
    run's, step for step) up to the bad step, times CUT for the HOLD
    optimizer steps after it, then the cosine's again, where it stands."""
    inner = trained.lrs("bare-spike")
    got = trained.lrs(run)
    for k in range(1, STEPS + 1):
        cut = INJECT < k <= INJECT + HOLD
        want = [lr * CUT for lr in inner[k - 1]] if cut else inner[k - 1]
        assert got[k - 1] == want, trained.detail(
            run, f"step {k} ({'cut' if cut else 'inner'}): {got[k - 1]} != {want}"
        )
    # Not a vacuous comparison: the cut is a tenth of an LR that is still high.
    assert got[INJECT][0] < 0.01 < got[INJECT - 1][0], trained.detail(run)
    assert got[INJECT + HOLD][0] > 0.05, trained.detail(run)


@pytest.mark.parametrize("run", list(GUARDED))
def test_with_the_guard_the_run_recovers(trained, run):
    bare = next(b for b, twin in BARE.items() if twin == run)
    losses = [s["loss"] for s in trained.steps[run]]
    bad = [(k, loss) for k, loss in enumerate(losses, 1) if k != INJECT and not math.isfinite(loss)]
    assert bad == [], trained.detail(run, bad[:5])
    end, unguarded = trained.end[run], trained.end[bare]
    assert end["val_acc"] > 0.9, trained.detail(run)
    assert end["val_loss"] < 0.5 and end["last_losses"] < 0.5, trained.detail(run)
    assert unguarded["val_acc"] < 0.2, trained.detail(bare)
    # The loaded copy and the batches after it are the same whatever the
    # bad batch was: both guarded runs go on as one from there.
    spike, nan = ([s["loss"] for s in trained.steps[r][INJECT:]] for r in GUARDED)
    assert spike == nan, (first_difference(spike, nan, "guard-spike", "guard-nan"), INJECT)


# --- what the daemon shows -----------------------------------------------------


@pytest.mark.parametrize("run", list(GUARDED))
def test_the_journal_names_the_trip(trained, run):
    """`lrpilot history RUN --json`: one change, the guard's, at the step
    after the bad one, with the cut LRs."""
    daemon = trained.daemon
    history = settled_history(lambda: daemon.cli("history", run))
    assert len(history) == 1, trained.detail(run, history)
    entry = history[0]
    cause = GUARDED[run]
    assert cause in entry["reason"], entry["reason"]  # it names the cause
    assert f"at step {INJECT}" in entry["reason"], entry["reason"]
    assert f"LRs x{CUT:g} for {HOLD} steps" in entry["reason"], entry["reason"]
    assert entry["actor"] == "policy", entry
    where = (entry["effective_step"], entry["applied_step"], entry["late"])
    assert where == (INJECT + 1, INJECT + 1, 0), entry
    assert entry["old_lrs"] == trained.lrs(run)[INJECT - 1], trained.detail(run, entry)
    assert entry["new_lrs"] == trained.lrs(run)[INJECT], trained.detail(run, entry)
    assert entry["policy_state"]["last_trip"]["cause"] == cause, entry
    for bare in BARE:
        assert daemon.cli("history", bare) == [], trained.detail(bare)


def test_metrics_count_the_trips(trained):
    text = trained.daemon.scrape()
    for run, cause in GUARDED.items():
        trips = metric_value(text, "lrpilot_policy_guard_trips_total", run=run)
        changes = metric_value(text, "lrpilot_run_lr_changes_total", run=run, reason=cause)
        assert (trips, changes) == (1, 1), (run, [ln for ln in text.splitlines() if run in ln])
        other = "guard:spike" if cause == "guard:nan" else "guard:nan"
        assert metric_value(text, "lrpilot_run_lr_changes_total", run=run, reason=other) is None
        assert metric_value(text, "lrpilot_policy_guard_holding", run=run) == 0
    for run in BARE:
        assert metric_value(text, "lrpilot_policy_guard_trips_total", run=run) is None
        assert metric_value(text, "lrpilot_run_lr_changes_total", run=run) is None
        assert metric_value(text, "lrpilot_run_step", run=run) == STEPS  # it is there
