"""lrpilot's live LR range test against Lightning's ``Tuner.lr_find``, on a
real model and data: the same MLP (same seed, same initial weights), the
same digits batches in the same order, the same optimizer (Adam), the same
sweep (1e-5 to 1 over 100 optimizer steps, exponential, early stop at 4 x
the best smoothed loss). Each side runs in its own process
(tests/live/range_test_vs_lightning.py), at the same time; lrpilot's against
a real `lrpilot daemon`, in a plain torch loop with ``sync=True``.

What this shows: lrpilot's suggestion is within a factor of 2 of Lightning's
(here it is the same LR), its curve is Lightning's (LRs and smoothed losses),
and the parameters after the sweep are bit-identical to those before it.

What differs between the two loops, and how the comparison is made fair:

- Lightning's ``lr_find`` is a fit of its own: it saves a checkpoint, swaps
  in its ``_ExponentialLR`` (every group set to ``min_lr``) and its
  ``_LRCallback``, runs up to ``num_training`` steps, then restores the model
  and optimizer from the checkpoint and ends (``Tuner.lr_find`` stops the fit
  there). lrpilot's sweep runs inside the training: the hook copies the
  parameters and Adam's state at ``attach()`` (where the sweep starts), the
  daemon decides the end from the losses it receives, and the ``pilot.step()``
  that applies that decision writes the copy back and sets the suggestion;
  the training then goes on, on the next batches. So the two are compared on
  the sweep's steps only: both start on a fresh model and optimizer from the
  first batch of the same loader (``shuffle=False`` over one fixed
  permutation; one epoch has more batches than the sweep takes), and the
  test checks that they did: the same initial parameters (a hash), the same
  LR at each optimizer step (read by an optimizer step pre-hook on both
  sides) and the same raw loss at each step.
- What each side records: Lightning logs, per optimizer step, the
  scheduler's LR before the batch and the smoothed loss after it, with the
  bias correction ``1 - beta ** (global_step + 1)``; lrpilot's curve is, per
  step record carrying the loss, the LR that step ran at and the smoothed
  loss with ``1 - beta ** (points + 1)``. For an ``lr_find`` from step 0 the
  two are the same numbers. Both end on the step whose smoothed loss passes
  4 x the best (that point on the curve) or after the 100th step; with
  ``sync=True`` the end is applied before the next optimizer step, so
  lrpilot runs no more sweep steps than Lightning (with this model the first
  smoothed point, about half the loss, stays the best and neither stops
  early: 100 points each; the test checks that both agree on it).
- The suggestion: both take the steepest fall of the smoothed loss against
  the LR after dropping 10 points at the start and 1 at the end; Lightning's
  gradient is in float32, lrpilot's in float64, so in a near tie they may pick
  neighbouring points (a factor of 1e5 ** (1 / 100) = 1.12 apart): hence the
  factor of 2.
- lrpilot's suggestion and curve are read back from the daemon's journal
  (`lrpilot range-test RUN --last --json`, and the decision in `lrpilot
  history RUN --json`), not from the training process.

The restore: the parameters right before the first sweep step are those at
``attach()``; right before the ``pilot.step()`` that applies the end they
differ (the sweep trained them), right after it they are ``torch.equal`` to
the first, Adam's state is empty again (the copy was a fresh optimizer's),
and the steps after the sweep give the parameters of a fresh model and Adam
trained on the same batches at the same LRs: bit for bit, the training the
sweep never touched.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess

import pytest
from procs import LIVE, daemon_process, finish_live, settled_history, start_live

SCRIPT = LIVE / "range_test_vs_lightning.py"
RUN = "rt-vs-lightning"
MIN_LR, MAX_LR, STEPS, DIVERGE = 1e-5, 1.0, 100, 4.0
AFTER = 5  # optimizer steps the lrpilot side takes once the sweep's end is applied
POLICY = {
    "kind": "range_test",
    "min_lr": MIN_LR,
    "max_lr": MAX_LR,
    "steps": STEPS,
    "diverge": DIVERGE,
    "then": {"kind": "cosine", "T_max": 1000},
}
ENV = {"OMP_NUM_THREADS": "1"}  # the scripts use one thread: the same bits on both sides


def max_rel_diff(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want), (len(got), len(want))
    return max(abs(a - b) / abs(b) for a, b in zip(got, want))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def both(lrpilot_exe, digits, tmp_path_factory) -> dict:
    """Both sides' outputs, lrpilot's journal of its range test and the run's
    history, from one run of each."""
    assert importlib.util.find_spec("lightning") is not None, (
        "this test compares with Lightning's Tuner.lr_find: install lightning "
        "(pip install lightning) in the test environment"
    )
    where = tmp_path_factory.mktemp("rt-vs-lightning")
    shared = {"data": str(digits), "min_lr": MIN_LR, "max_lr": MAX_LR, "steps": STEPS}
    lightning_config = {
        **shared,
        "side": "lightning",
        "out": str(where / "lightning.json"),
        "work_dir": str(where),
        "diverge": DIVERGE,
    }
    lightning = start_live(SCRIPT, where, "lightning", lightning_config, ENV, cwd=where)
    try:
        with daemon_process(lrpilot_exe, where / "state", where / "daemon.log") as daemon:
            pilot_config = {
                **shared,
                "side": "lrpilot",
                "out": str(where / "lrpilot.json"),
                "address": daemon.address,
                "run": RUN,
                "policy": POLICY,
                "after": AFTER,
                "deadline_s": 60,
            }
            pilot = start_live(SCRIPT, where, "lrpilot", pilot_config, ENV, cwd=where)
            try:
                finish_live(pilot, where / "lrpilot.out", timeout=90)
            finally:
                stop(pilot)
            history = settled_history(lambda: daemon.cli("history", RUN))
            journal = daemon.cli("range-test", RUN, "--last")
        finish_live(lightning, where / "lightning.out", timeout=90)
    finally:
        stop(lightning)
    ours = json.loads((where / "lrpilot.json").read_text())
    assert "error" not in ours, ours["error"]
    return {
        "lightning": json.loads((where / "lightning.json").read_text()),
        "lrpilot": ours,
        "journal": journal,
        "history": history,
    }


def test_both_sides_ran_the_same_sweep_on_the_same_model_and_batches(both):
    """The comparison is fair: same initial weights, same LR and same raw loss
    at every sweep step."""
    theirs, ours = both["lightning"], both["lrpilot"]
    assert ours["initial_sha"] == theirs["initial_sha"]
    points = len(theirs["results"]["lr"])
    assert ours["sweep_steps"] == points == len(theirs["used_lrs"]) == len(theirs["raw_losses"])
    assert ours["used_lrs"][:points] == pytest.approx(theirs["used_lrs"], rel=1e-12)
    loss_diff = max_rel_diff(ours["raw_losses"][:points], theirs["raw_losses"])
    identical = ours["raw_losses"][:points] == theirs["raw_losses"]
    print(f"\nraw losses over {points} steps: max relative difference {loss_diff:.3g}")
    print(f"raw losses bit-identical: {identical}")
    assert loss_diff <= 1e-6, loss_diff


def test_the_suggestion_is_within_a_factor_of_2_of_lightning_s(both):
    theirs, journal = both["lightning"], both["journal"]
    ours = journal["suggested_lr"]
    print(f"\nlrpilot suggests {ours!r}, Lightning {theirs['suggestion']!r}")
    assert journal["rule"] == "steepest fall of the smoothed loss"
    assert theirs["suggestion"] is not None and ours is not None
    assert 0.5 <= ours / theirs["suggestion"] <= 2, (ours, theirs["suggestion"])


def test_the_curve_is_lightning_s(both):
    theirs, journal = both["lightning"], both["journal"]
    lrs, losses = journal["curve"]["lrs"], journal["curve"]["losses"]
    lr_diff = max_rel_diff(lrs, theirs["results"]["lr"])
    loss_diff = max_rel_diff(losses, theirs["results"]["loss"])
    print(f"\ncurve: {len(lrs)} points (Lightning {len(theirs['results']['lr'])})")
    print(f"curve LRs: max relative difference {lr_diff:.3g}")
    print(f"curve smoothed losses: max relative difference {loss_diff:.3g}")
    assert journal["points"] == len(lrs) == len(theirs["results"]["lr"])
    assert all(math.isfinite(x) for x in losses)
    assert lr_diff <= 1e-12
    assert loss_diff <= 1e-6
    # Both stop at the same point: early (a smoothed loss above 4 x the best) or after STEPS.
    assert journal["ended_early"] == (len(theirs["results"]["lr"]) < STEPS)


def test_the_parameters_after_the_sweep_are_bit_identical_to_before(both):
    ours, theirs = both["lrpilot"], both["lightning"]
    assert not ours["swept_equal_initial"]  # the sweep did train them...
    assert ours["swept_sha"] != ours["initial_sha"]
    assert ours["after_equal_initial"]  # ...and its end put them back, bit for bit
    assert ours["after_sha"] == ours["initial_sha"]
    assert ours["state_after_end"] == {}  # Adam's state as at attach(): a fresh optimizer's
    # The training after the sweep is the one a fresh model and Adam would have.
    assert ours["continued_equal_reference"]
    # Lightning's lr_find, restored from its checkpoint, is back at the start too.
    assert theirs["after_equal_initial"]


def test_the_lr_after_the_end_is_the_suggestion_and_the_journal_says_where(both):
    ours, journal, history = both["lrpilot"], both["journal"], both["history"]
    suggested = journal["suggested_lr"]
    assert ours["lr_after_end"] == suggested  # group 0, right after the applying step
    assert ours["change"]["new"] == [suggested]
    assert ours["change"]["reason"].startswith(f"range_test: suggested lr {suggested:.6g}")
    # The first step after the sweep runs at the suggestion, the cosine moves on from it.
    after = ours["used_lrs"][ours["sweep_steps"] :]
    assert len(after) == AFTER and after[0] == suggested and after[-1] < suggested
    [decision] = [e for e in history if e["reason"].startswith("range_test: suggested")]
    assert decision["version"] == journal["decision"]["version"]
    assert decision["policy_state"]["suggested_lr"] == suggested
    assert decision["policy_state"]["curve_lrs"] == journal["curve"]["lrs"]
    assert decision["new_lrs"] == [suggested]
    # Decided on the last sweep step's record, applied before the next step.
    assert decision["applied_step"] == decision["effective_step"] == ours["sweep_steps"] + 1
