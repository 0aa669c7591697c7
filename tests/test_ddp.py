"""Data-parallel training under real torchrun: two ranks of one run
(DistributedDataParallel, gloo on CPU; tests/live/train_ddp.py) attach with
no run, rank or world size given, and a real `lrpilot daemon` steers them.

Every rank of a run applies the same LR at the same step (docs/hook.md). Checked
here step by step, for the policy's own decisions (plateau on rank 0's
validation loss) and for an operator's set-lr and resume, in async and in
lock-step mode: both ranks hold the same LRs after every step, apply every
journaled change at its effective step (none late), and end with the same
parameters (DDP keeps them equal only while the ranks' LRs agree).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from procs import (
    DIGITS_PLATEAU,
    LIVE,
    daemon_process,
    ddp_ranks_agree,
    free_ports,
    mean_val_losses,
    metric_value,
    read_jsonl,
    start_train_ddp,
    stored_val_losses,
    wait_for,
)

TRAIN = LIVE / "train_ddp.py"
PLATEAU = DIGITS_PLATEAU
HOLD_LR = 0.003


def changes(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line.get("event") == "change"]


def torchrun(where: Path, daemon_address: str, sync: bool, digits: Path) -> subprocess.Popen:
    config = {
        "data": str(digits),
        "policy": PLATEAU,
        "sync": sync,
        "report_every": 10,
        "max_steps": 20_000,
        "stop_file": str(where / "stop"),
        "step_sleep": 0.003,  # pace only: leaves CPU to the daemon and this test
        "out_dir": str(where),
        "deadline_s": 120,
    }
    return start_train_ddp(
        where,
        config,
        ["--standalone", "--nproc-per-node", "2"],
        {"LRPILOT_DAEMON": daemon_address},
    )


@pytest.mark.parametrize(
    "sync, shards",
    [(False, 1), (True, 1), (True, 2)],
    ids=["async", "lock-step", "lock-step-2-shards"],
)
def test_every_rank_applies_every_change_at_the_same_step(
    lrpilot_exe, digits, tmp_path, sync, shards
):
    flags = ["--shards", str(shards), "--shard-base-port", str(free_ports(shards))]
    with daemon_process(
        lrpilot_exe, tmp_path / "state", tmp_path / "daemon.log", *(flags if shards > 1 else [])
    ) as daemon:
        ranks_apply_every_change_at_one_step(daemon, digits, tmp_path, sync)


def ranks_apply_every_change_at_one_step(daemon, digits: Path, tmp_path: Path, sync: bool) -> None:
    training = torchrun(tmp_path, daemon.address, sync, digits)
    rank0, rank1 = tmp_path / "rank0.jsonl", tmp_path / "rank1.jsonl"

    def output() -> str:
        return (tmp_path / "train.out").read_text() + "\n" + daemon.log()[-3000:]

    def applied_by_both(actor_is_policy: bool) -> bool:
        if training.poll() is not None:
            raise AssertionError(f"torchrun exited with {training.returncode}:\n{output()}")
        return all(
            any((c["actor"] == "policy") == actor_is_policy for c in changes(read_jsonl(p)))
            for p in (rank0, rank1)
        )

    try:
        wait_for(lambda: applied_by_both(True), 60, "a plateau cut on both ranks", output)
        runs = daemon.cli("runs")
        assert [(r["ranks"], r["world_size"]) for r in runs] == [([0, 1], 2)], runs
        run = runs[0]["run"]
        # Each rank said hello for itself, in the mode the training asked for.
        sessions = daemon.cli("show", run)["sessions"]
        assert [(s["rank"], s["sync"]) for s in sessions] == [(0, sync), (1, sync)], sessions
        text = daemon.scrape()
        assert metric_value(text, "lrpilot_run_world_size", run=run) == 2, text
        assert metric_value(text, "lrpilot_run_connected_ranks", run=run) == 2, text

        daemon.cli("set-lr", run, str(HOLD_LR))
        wait_for(lambda: applied_by_both(False), 30, "the set-lr on both ranks", output)
        daemon.cli("resume", run)

        def resumed_on_both() -> bool:
            return all(
                len([c for c in changes(read_jsonl(p)) if c["actor"] != "policy"]) == 2
                for p in (rank0, rank1)
            )

        wait_for(resumed_on_both, 30, "the resume on both ranks", output)
        (tmp_path / "stop").touch()
        training.wait(60)
    finally:
        if training.poll() is None:
            training.kill()
            training.wait(10)
    assert training.returncode == 0, output()
    history = daemon.cli("history", run)
    ddp_ranks_agree(tmp_path, run, history, world=2)
    actors = [e["actor"] for e in history]
    assert actors.count("policy") >= 1 and len(actors) - actors.count("policy") == 2, history
    # Each rank validates on its own shard; plateau decided on their mean
    # (its reduce's default), which is what the store has for a replay.
    want = mean_val_losses(tmp_path, world=2)
    assert stored_val_losses(daemon, run, len(want)) == want


RANGE_TEST = {
    "kind": "range_test",
    "min_lr": 1e-4,
    "max_lr": 1.0,
    "steps": 40,
    "skip_begin": 5,
    # Constant LRs at the suggestion: the journal's new_lrs are a command's
    # LRs as of the record it was decided on, and a schedule after it would
    # have moved on by the lead at the step the ranks apply it.
    "then": None,
}


def test_a_range_test_puts_every_rank_back_at_the_same_step(running_daemon, digits, tmp_path):
    """The sweep's copy is taken at attach and put back when its end is
    applied: at the same step on both ranks, bit-identical to the parameters
    at attach; then both hold the suggestion (the ranks' mean loss is what
    the sweep smoothed)."""
    daemon = running_daemon
    config = {
        "data": str(digits),
        "policy": RANGE_TEST,
        "sync": True,
        "report_every": 0,
        "max_steps": 60,
        "stop_file": str(tmp_path / "stop"),
        "out_dir": str(tmp_path),
        "deadline_s": 90,
        "hash_params": True,
    }
    training = start_train_ddp(
        tmp_path,
        config,
        ["--standalone", "--nproc-per-node", "2"],
        {"LRPILOT_DAEMON": daemon.address},
    )
    try:
        training.wait(120)
    finally:
        if training.poll() is None:
            training.kill()
            training.wait(10)
    output = (tmp_path / "train.out").read_text() + "\n" + daemon.log()[-3000:]
    assert training.returncode == 0, output
    [run] = [r["run"] for r in daemon.cli("runs")]
    history = daemon.cli("history", run)
    ddp_ranks_agree(tmp_path, run, history, world=2)
    [end] = [e for e in history if e["reason"].startswith("range_test:")]
    state = end["policy_state"]
    assert state["phase"] == "done" and len(state["curve_lrs"]) == len(state["curve_losses"]) > 5
    for rank in (0, 1):
        lines = read_jsonl(tmp_path / f"rank{rank}.jsonl")
        [attached] = [line for line in lines if line.get("event") == "attached"]
        [ended] = [c for c in changes(lines) if c["reason"].startswith("range_test:")]
        assert ended["step"] == end["effective_step"], (ended, end)
        assert ended["params"] == attached["params"], f"rank {rank}: not put back\n{output}"
        assert ended["new"][0] == state["suggested_lr"]
