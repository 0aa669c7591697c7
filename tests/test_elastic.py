"""torchrun's elastic restart of a DDP job (tests/live/train_ddp.py under real
torchrun, `--max-restarts 1`, two ranks, gloo on CPU) against a real
`lrpilot daemon` (docs/distributed.md, "torchrun's elastic restart").

Rank 0 saves a checkpoint (model, optimizer, ``pilot.state_dict()``) every
CHECKPOINT_EVERY steps; on torchrun's first attempt rank 0 dies abruptly
(``os._exit(1)``: no bye, nothing flushed) FAIL_AT - CHECKPOINT steps after
the last checkpoint. torchrun stops rank 1 and starts both again; they load
the checkpoint and go on from the step after it, under the same run id (the
rendezvous id). Checked, from what every rank wrote per step and from the
daemon's runs and journal:

- the job ends with status 0 after exactly one restart;
- one run across both attempts, and the daemon took it back to the
  checkpoint's step (its log says so);
- after the restart both ranks hold, from the checkpoint's step on, the LRs
  attempt 0 held there, then at every step the LRs the journal gives for the
  resumed timeline (each entry from its effective step: those made since the
  restart, and one decided before the checkpoint but due after it), none
  late, and end with the same parameters;
- the plateau cut the LRs before the checkpoint and again after the restart,
  so that the LR state that came back is one a cut had changed.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from procs import DIGITS_PLATEAU, lrs_from_journal, read_jsonl, start_train_ddp, wait_for

CHECKPOINT_EVERY = 150
FAIL_AT = 190  # after the checkpoint of step 150: the resume goes back 40 steps
CHECKPOINT = FAIL_AT // CHECKPOINT_EVERY * CHECKPOINT_EVERY
MAX_STEPS = 400
WORLD = 2
START_LRS = [0.2, 0.1]  # train_ddp.py's groups: body, head


def torchrun(where: Path, daemon_address: str, digits: Path) -> subprocess.Popen:
    config = {
        "data": str(digits),
        "policy": DIGITS_PLATEAU,
        "sync": False,
        "report_every": 10,
        "max_steps": MAX_STEPS,
        "stop_file": str(where / "stop"),  # never made: the run ends at max_steps
        "step_sleep": 0.003,  # pace only: leaves CPU to the daemon and this test
        "out_dir": str(where),
        "deadline_s": 40,
        "checkpoint": str(where / "checkpoint.pt"),
        "checkpoint_every": CHECKPOINT_EVERY,
        "fail_at": FAIL_AT,
        "fail_rank": 0,
    }
    env = {
        "LRPILOT_DAEMON": daemon_address,
        # torchrun (torch 2.13 here) shares its agent's TCPStore with the
        # workers by default, and the restarted workers' gloo set-up then
        # fails ("connectFullMesh failed ... Connection refused": it finds
        # the first attempt's keys; pytorch/pytorch#135712). With a store of
        # each attempt's own (rank 0 hosts it) the restart works.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    torchrun = ["--standalone", "--nproc-per-node", str(WORLD), "--max-restarts", "1"]
    return start_train_ddp(where, config, torchrun, env)


def test_an_elastic_restart_resumes_the_run_from_its_checkpoint(running_daemon, digits, tmp_path):
    daemon = running_daemon
    training = torchrun(tmp_path, daemon.address, digits)

    def output() -> str:
        return (
            "--- torchrun\n"
            + (tmp_path / "train.out").read_text()[-6000:]
            + "\n--- daemon log\n"
            + daemon.log()[-4000:]
        )

    try:
        wait_for(lambda: training.poll() is not None, 55, "torchrun to end", output)
    finally:
        if training.poll() is None:
            training.kill()
            training.wait(10)
    # 1. The job ended well, after one restart that went back to the checkpoint.
    assert training.returncode == 0, output()
    lines = [read_jsonl(tmp_path / f"rank{r}.jsonl") for r in range(WORLD)]
    summaries = [json.loads((tmp_path / f"summary{r}.json").read_text()) for r in range(WORLD)]
    for summary in summaries:
        # The restarted ranks had the daemon from their first step (a hello
        # refused, a daemon that did not answer: a warning here).
        assert summary["warnings"] == [], said(summary, output())
        assert (summary["attempt"], summary["first_step"], summary["steps"]) == (
            1,
            CHECKPOINT + 1,
            MAX_STEPS,
        ), said(summary, output())
    steps = [{a: per_step(rank_lines, a) for a in (0, 1)} for rank_lines in lines]
    resumed = [[line for line in rank_lines if is_resumed(line)] for rank_lines in lines]
    for rank in range(WORLD):
        # Attempt 0 got to the failure (rank 1 stopped at or after it);
        # attempt 1 loaded the checkpoint and went from there to the end.
        assert sorted(steps[rank][0])[:FAIL_AT] == list(range(1, FAIL_AT + 1)), said(rank, output())
        assert [(r["attempt"], r["step"]) for r in resumed[rank]] == [(1, CHECKPOINT)], said(
            rank, resumed[rank], output()
        )
        assert sorted(steps[rank][1]) == list(range(CHECKPOINT + 1, MAX_STEPS + 1)), said(
            rank, output()
        )

    # 2. One run across both attempts, which the daemon took back to the
    # checkpoint's step; both ranks said bye at the end.
    def ended() -> list[dict] | None:
        runs = daemon.cli("runs")
        return runs if all(r["status"] == "ended" for r in runs) else None

    runs = wait_for(ended, 10, "the run to end (both ranks' bye)", output)
    assert [(r["ranks"], r["world_size"], r["step"]) for r in runs] == [([], WORLD, MAX_STEPS)], (
        said(runs, output())
    )
    run = runs[0]["run"]
    assert all(s["run"] == run for s in summaries), said(run, summaries, output())
    took_back = re.compile(
        rf"run {re.escape(run)} (resumed from a checkpoint at step {CHECKPOINT}"
        rf"|rank \d+ joined at step {CHECKPOINT}, behind rank \d+): state rebuilt"
    )
    assert took_back.search(daemon.log()), output()

    # 3. The LRs. The journal's entries made since the restart (attempt 1's
    # processes started) are the run's changes from the checkpoint on.
    restarted_at = min(r[0]["started"] for r in resumed)
    history = daemon.cli("history", run)
    before = [e for e in history if e["time"] < restarted_at]
    # A change decided before the checkpoint and due after it belongs to the
    # resumed timeline too (the resumed ranks must apply it at its step);
    # one decided after the checkpoint belongs to the timeline left behind.
    carried = [e for e in before if e["state_step"] <= CHECKPOINT < e["effective_step"]]
    after = carried + [e for e in history if e["time"] >= restarted_at]

    def detail() -> str:
        return f"--- journal\n{json.dumps(history, indent=1)}\n{output()}"

    at_checkpoint = steps[0][0][CHECKPOINT]  # attempt 0's line of it: the LRs after it
    # What the groups held in attempt 1 before each step k: the checkpoint's
    # LRs before the first one, then each line's (step k - 1's line).
    held = [
        {CHECKPOINT + 1: resumed[rank][0]["lrs"]}
        | {k: steps[rank][1][k - 1] for k in range(CHECKPOINT + 2, MAX_STEPS + 1)}
        for rank in range(WORLD)
    ]
    for rank in range(WORLD):
        assert steps[rank][0][CHECKPOINT] == at_checkpoint, said(rank, detail())
        # The LR state came back as it was at the checkpoint.
        assert held[rank][CHECKPOINT + 1] == at_checkpoint, said(rank, resumed[rank], detail())
    parted = [(k, held[0][k], held[1][k]) for k in sorted(held[0]) if held[0][k] != held[1][k]]
    assert not parted, said("(step, rank 0's LRs, rank 1's):", parted[:5], detail())
    want = lrs_from_journal(after, range(CHECKPOINT + 1, MAX_STEPS + 1), at_checkpoint)
    wrong = [(k, held[0][k], want[k]) for k in sorted(want) if held[0][k] != want[k]]
    assert not wrong, said("(step, LRs held, the journal's):", wrong[:5], detail())
    # The journaled changes due in attempt 1 that change the LRs (a rank's
    # on_change says those), in order.
    due, lrs = [], at_checkpoint
    for e in sorted(after, key=lambda e: e["version"]):
        if e["effective_step"] <= MAX_STEPS + 1 and e["new_lrs"] != lrs:
            due.append((e["effective_step"], e["new_lrs"], e["actor"]))
            lrs = e["new_lrs"]
    # One due at the step after the last is applied when it came in time for
    # the last pilot.step (which sets the next step's LRs), else not at all.
    in_run = [change for change in due if change[0] <= MAX_STEPS]
    for rank, summary in enumerate(summaries):
        # Every change of attempt 1 on each rank is a journaled one, at its
        # effective step.
        seen = [
            (c["step"], c["new"], c["actor"])
            for c in lines[rank]
            if c.get("event") == "change" and c["attempt"] == 1
        ]
        assert seen in (in_run, due), said(rank, "(step, LRs, actor):", seen, detail())
        assert summary["stats"]["commands_late"] == 0, said(summary, detail())
    assert len({s["params_sha256"] for s in summaries}) == 1, said(summaries, detail())

    # 4. The checks mean something: the plateau had cut the LRs the checkpoint
    # holds, and cut them again after the restart.
    assert at_checkpoint != START_LRS, detail()
    assert any(e["actor"] == "policy" and e["effective_step"] <= CHECKPOINT for e in before), (
        detail()
    )
    assert any(actor == "policy" for _, _, actor in due), detail()


def said(*what: object) -> str:
    """A failure message in full (pytest shortens one that is not a string)."""
    return "\n".join(str(thing) for thing in what)


def is_resumed(line: dict) -> bool:
    return line.get("event") == "resumed"


def per_step(lines: list[dict], attempt: int) -> dict[int, list[float]]:
    """step -> the LRs held after it (those of the next step), in one attempt."""
    return {
        line["step"]: line["lrs"]
        for line in lines
        if "event" not in line and line["attempt"] == attempt
    }
