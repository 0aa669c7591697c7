"""A rank killed mid-run (kill -9: no bye): the daemon sees it go silent,
shows it (`lrpilot show`, `runs`), exports it (its last message's age, left
out of decisions, the wait that timed out), and the other ranks' run goes on
deciding without it. Three real training processes of one run (ranks from
$RANK and $WORLD_SIZE, as a launcher sets them), plateau on val_loss, a real
daemon with a short --rank-wait-timeout."""

from __future__ import annotations

from procs import (
    DIGITS_PLATEAU,
    DaemonProcess,
    lrpilot,
    metric_value,
    ok,
    read_jsonl,
    start_digits,
    stored_val_losses,
    wait_for,
)

RUN = "three-ranks"
WORLD = 3
KILLED = 2


def test_a_killed_rank_is_seen_shown_and_left_out_while_the_others_go_on(
    lrpilot_exe, digits, tmp_path, processes
):
    daemon = DaemonProcess(
        lrpilot_exe, tmp_path / "state", tmp_path / "daemon.log", "--rank-wait-timeout", "1"
    )
    processes.append(daemon)
    daemon.wait_ready()
    stop = tmp_path / "stop"
    trainings, outputs = [], []
    for rank in range(WORLD):
        where = tmp_path / f"rank{rank}"
        where.mkdir()
        outputs.append(where / "steps.jsonl")
        config = {
            "address": daemon.address,
            "data": str(digits),
            "steps": 1_000_000,
            "deadline_s": 120,
            "stop_file": str(stop),
            "step_sleep": 0.01,  # pace only
            "summary": str(where / "summary.json"),
            "trainers": [
                {
                    "run": RUN,
                    "policy": DIGITS_PLATEAU,
                    "lrs": [0.1, 0.05],
                    "report_every": 10,
                    "out": str(outputs[-1]),
                }
            ],
        }
        env = {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1"}
        trainings.append(start_digits(config, where, env))
    try:
        watch_a_rank_die(daemon, lrpilot_exe, tmp_path, trainings, outputs, stop)
    finally:
        for training in trainings:
            if training.poll() is None:
                training.kill()
                training.wait(10)


def watch_a_rank_die(
    daemon: DaemonProcess, lrpilot_exe: str, tmp_path, trainings, outputs, stop
) -> None:

    def detail() -> str:
        return "\n".join(
            [(tmp_path / f"rank{r}" / "train.out").read_text() for r in range(WORLD)]
            + [daemon.log()[-3000:]]
        )

    def last_step(rank: int) -> int:
        if rank != KILLED and trainings[rank].poll() is not None:
            raise AssertionError(
                f"rank {rank} exited with {trainings[rank].returncode}\n{detail()}"
            )
        steps = [
            line["step"] for line in read_jsonl(outputs[rank]) if "step" in line and "loss" in line
        ]
        return steps[-1] if steps else 0

    wait_for(
        lambda: all(last_step(r) >= 30 for r in range(WORLD)), 60, "every rank at step 30", detail
    )
    [run] = daemon.cli("runs")
    assert (run["ranks"], run["world_size"], run["silent"]) == ([0, 1, 2], WORLD, [])

    trainings[KILLED].kill()
    assert trainings[KILLED].wait(10) == -9
    killed_at = last_step(KILLED)

    # Seen and shown: silent past the timeout, and left out of the decision
    # that waited for it (a report every 10 steps, ~0.1 s apart).
    def seen() -> dict | None:
        shown = daemon.cli("show", RUN)
        return shown if shown["silent"] == [KILLED] and shown["left_out"] == [KILLED] else None

    shown = wait_for(seen, 20, f"rank {KILLED} shown silent and left out", detail)
    sessions = {s["rank"]: s for s in shown["sessions"]}
    assert sessions[KILLED]["left_out"] and sessions[KILLED]["silent_s"] > 1.0, sessions
    assert not sessions[0]["left_out"] and sessions[0]["silent_s"] < 1.0, sessions
    # The training writes a step's line after pilot.step() (and report) sent
    # it: killed in between, the daemon has one step more than the file.
    assert sessions[KILLED]["step"] <= killed_at + 1, (killed_at, sessions)
    text = ok(lrpilot(lrpilot_exe, "show", RUN, "--control", daemon.control))
    assert f"silent ranks [{KILLED}]" in text and "LEFT OUT" in text, text

    # Exported.
    scraped = daemon.scrape()
    labels = {"run": RUN}
    assert metric_value(scraped, "lrpilot_rank_left_out", **labels, rank=str(KILLED)) == 1
    assert metric_value(scraped, "lrpilot_rank_left_out", **labels, rank="0") == 0
    age = metric_value(scraped, "lrpilot_rank_last_message_age_seconds", **labels, rank="2")
    assert age > 1.0, scraped
    assert metric_value(scraped, "lrpilot_run_rank_wait_timeouts_total", **labels) >= 1
    assert metric_value(scraped, "lrpilot_run_connected_ranks", **labels) == WORLD
    assert "rank 2 sent nothing for 1s while a decision waited for it" in daemon.log()

    # The others go on, and so do the decisions on their metrics.
    target = killed_at + 100
    wait_for(
        lambda: min(last_step(0), last_step(1)) >= target, 60, f"ranks 0, 1 at {target}", detail
    )
    reports = stored_val_losses(daemon, RUN, target // 10 - 1)
    assert any(step > killed_at + 50 for step, _ in reports), reports
    stop.touch()
    for rank in (0, 1):
        assert trainings[rank].wait(30) == 0, detail()
