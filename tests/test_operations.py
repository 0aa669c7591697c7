"""The operator's commands (`lrpilot runs`, `show`, `history`, `set-lr`,
`pause`, `resume`, `policy`, `simulate --from-run`) as a user runs them:
subprocesses against a real `lrpilot daemon` (its own state dir, free ports)
steering a real training process (tests/live/train_stream.py, lock-step).

The training stops at gates (after step k it waits for the test), so the
daemon's step when a command is made is known; once it is done, its recorded
LRs are checked step by step: each change lands exactly at the step the
command names (`history --json`: effective_step, applied_step), held LRs
stay held, the policy goes on counting under a hold, a switched-to policy
gives what `lrpilot simulate` gives from the LRs in effect. Every error is
one line on stderr and a non-zero exit, and changes nothing.
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from procs import (
    DaemonProcess,
    Training,
    daemon_process,
    free_address,
    lrpilot,
    metric_stream,
    ok,
    ok_json,
    one_line_error,
    read_steps,
    settled_history,
    simulate,
    wait_for,
)

PLATEAU = {"kind": "plateau", "metric": "val_loss", "factor": 0.5, "patience": 1, "threshold": 0.01}
BASE_LRS = [0.1, 0.05]  # groups "body" and "head"
REPORT_EVERY = 5
ACTOR = f"{getpass.getuser()}@{socket.gethostname()}"


@pytest.fixture(scope="module")
def daemon(lrpilot_exe, tmp_path_factory) -> Iterator[DaemonProcess]:
    where = tmp_path_factory.mktemp("ops-daemon")
    with daemon_process(lrpilot_exe, where / "state", where / "daemon.log") as running:
        yield running


class Op:
    """`lrpilot COMMAND ... --control ADDR` against the test's daemon."""

    def __init__(self, exe: str, daemon: DaemonProcess) -> None:
        self.exe, self.daemon = exe, daemon

    def __call__(self, *args: str, stdin: str | None = None):
        return lrpilot(self.exe, *args, "--control", self.daemon.control, stdin=stdin)

    def json(self, *args: str, stdin: str | None = None):
        return ok_json(self(*args, "--json", stdin=stdin))


@pytest.fixture
def op(lrpilot_exe, daemon) -> Op:
    return Op(lrpilot_exe, daemon)


def start_training(
    where: Path,
    daemon: DaemonProcess,
    run: str,
    steps: int,
    gates: list[int] = (),
    step_sleep: float = 0.0,
) -> tuple[Training, Path]:
    out = where / f"{run}.jsonl"
    config = {
        "steps": steps,
        "report_every": REPORT_EVERY,
        "seed": 7,
        "gates": list(gates),
        "step_sleep": step_sleep,
        "deadline_s": 60,
        "trainers": [
            {
                "run": run,
                "address": daemon.address,
                "policy": PLATEAU,
                "sync": True,
                "sync_timeout": 10.0,
                "lrs": BASE_LRS,
                "out": str(out),
            }
        ],
    }
    return Training(where, config, name=run), out


@pytest.fixture
def trainings() -> Iterator[list[Training]]:
    """Trainings a test starts; killed at the end whatever happened."""
    started: list[Training] = []
    yield started
    for training in started:
        training.stop()


def used_lrs(out: Path) -> dict[int, list[float]]:
    """The LRs each optimizer step of the training used."""
    return {line["step"]: line["used"] for line in read_steps(out)}


def plateau_lrs(exe: str, lines: list[dict]) -> dict[int, list[float]]:
    """What `lrpilot simulate` says the run's own policy gives: the LRs step
    j uses are those after record j - 1."""
    after = simulate(exe, PLATEAU, metric_stream(lines), BASE_LRS)
    return {1: BASE_LRS, **{j: after[j - 2] for j in range(2, len(lines) + 1)}}


def assert_lands_on_its_step(history: list[dict], used: dict[int, list[float]]) -> None:
    """Each journaled change was applied at the step it names, on time, and
    the training used its LRs from exactly that step (when two land at one
    step, the later version's)."""
    assert history, "no journaled change"
    at: dict[int, list[dict]] = {}
    for entry in history:
        assert entry["applied_step"] == entry["effective_step"], entry
        assert entry["late"] == 0, entry
        at.setdefault(entry["effective_step"], []).append(entry)
    for step, entries in at.items():
        if step in used:
            assert used[step] == entries[-1]["new_lrs"], (step, entries)
            assert used[step - 1] == entries[0]["old_lrs"], (step, entries)


def change_steps(used: dict[int, list[float]]) -> list[int]:
    return [j for j in sorted(used) if j > 1 and used[j] != used[j - 1]]


# --- reading a live run ------------------------------------------------------


def test_runs_show_and_history_on_a_live_run(op, daemon, lrpilot_exe, tmp_path, trainings):
    run = "ops-read"
    training, out = start_training(tmp_path, daemon, run, steps=120, gates=[100])
    trainings.append(training)
    training.at(100)
    lines = read_steps(out)
    assert len(lines) == 100

    runs = op.json("runs")
    [mine] = [r for r in runs if r["run"] == run]
    assert (mine["status"], mine["step"], mine["policy_kind"], mine["held"]) == (
        "active",
        100,
        "plateau",
        False,
    )
    assert mine["groups"] == ["body", "head"]
    assert mine["lrs"] == lines[-1]["lrs"]
    table = ok(op("runs")).splitlines()
    assert table[0].split()[:4] == ["RUN", "STATUS", "STEP", "STEPS/S"]
    [row] = [line for line in table if line.startswith(run + " ")]
    assert row.split()[1:3] == ["active", "100"]

    shown = op.json("show", run)
    assert (shown["run"], shown["step"], shown["status"]) == (run, 100, "active")
    assert shown["policy"]["kind"] == "plateau"
    assert shown["requested_policy"] == shown["policy"]
    assert shown["base_lrs"] == BASE_LRS
    # The last value of each metric: the step's loss, the report's val_loss.
    assert shown["last_metrics"] == {
        "loss": lines[-1]["loss"],
        "val_loss": lines[-1]["val_loss"],
    }
    [session] = shown["sessions"]
    assert (session["rank"], session["sync"], session["step"]) == (0, True, 100)
    assert session["pid"] == training.proc.pid
    # The policy's state is the one `lrpilot simulate` reaches on the same records.
    after = simulate(lrpilot_exe, PLATEAU, metric_stream(lines), BASE_LRS)
    assert shown["lrs"] == shown["policy_state"]["lrs"] == after[-1]
    text = ok(op("show", run))
    assert f"run        {run} (active, ranks [0] of 1)" in text
    assert "step       100 " in text
    assert "lrs        " + ", ".join(f"{lr:.4g}" for lr in after[-1]) in text
    assert "HELD" not in text

    history = settled_history(lambda: op.json("history", run), until_step=100)
    cuts = change_steps(used_lrs(out))
    assert len(cuts) >= 2, "the run was meant to plateau at least twice by step 100"
    assert [e["effective_step"] for e in history if e["effective_step"] <= 100] == cuts
    assert [e["version"] for e in history] == list(range(1, len(cuts) + 1))
    assert {e["actor"] for e in history} == {"policy"}
    assert all("plateau" in e["reason"] for e in history)
    assert_lands_on_its_step(history, used_lrs(out))
    assert op.json("history", run, "--limit", "1") == history[-1:]
    assert shown["history"] == history[-5:]
    text = ok(op("history", run)).splitlines()
    assert text[0].split()[:4] == ["VER", "FROM", "STEP", "APPLIED"]
    assert [line.split()[:3] for line in text[1:]] == [
        [f"v{e['version']}", str(e["effective_step"]), str(e["applied_step"])] for e in history
    ]
    training.go(100)
    training.finish()
    # The bye is sent without waiting for an answer, and show asks another socket.
    wait_for(lambda: op.json("show", run)["status"] == "ended", 10, "the bye to end the run")


# --- holding the LRs ------------------------------------------------------------


def test_set_lr_and_pause_hold_from_their_step_and_resume_gives_the_policy_back(
    op, daemon, lrpilot_exe, tmp_path, trainings
):
    run = "ops-hold"
    training, out = start_training(tmp_path, daemon, run, steps=200, gates=[40, 80, 120, 160])
    trainings.append(training)

    training.at(40)
    held = op.json("set-lr", run, "0.01")
    assert (held["effective_step"], held["state_step"]) == (42, 40)  # the next step + 1
    assert (held["lrs"], held["hold"], held["actor"]) == ([0.01, 0.01], True, ACTOR)
    assert "HELD by an operator" in ok(op("show", run))
    shown = op.json("show", run)
    assert (shown["held"], shown["lrs"], shown["version"]) == (True, [0.01, 0.01], held["version"])
    one_line_error(op("pause", run), "pause", "already held")
    training.go(40)

    training.at(80)
    # Under the hold the policy goes on taking the records.
    state_at_80 = op.json("show", run)["policy_state"]
    assert state_at_80 != shown["policy_state"]
    head = op.json("set-lr", run, "0.5", "--group", "head")
    assert (head["effective_step"], head["lrs"], head["hold"]) == (82, [0.01, 0.5], True)
    training.go(80)

    training.at(120)
    released = op.json("resume", run)
    assert (released["effective_step"], released["hold"]) == (122, False)
    assert released["actor"] == ACTOR
    training.go(120)

    training.at(160)
    paused = op.json("pause", run)
    assert (paused["effective_step"], paused["hold"]) == (162, True)
    training.go(160)
    training.finish()

    lines = read_steps(out)
    used = used_lrs(out)
    policy = plateau_lrs(lrpilot_exe, lines)
    # The resume gives the LRs the policy reached meanwhile (it kept counting).
    assert released["lrs"] == policy[121]
    assert paused["lrs"] == policy[161]
    want = {
        j: (
            policy[j]
            if j < 42 or 122 <= j < 162
            else [0.01, 0.01]
            if j < 82
            else [0.01, 0.5]
            if j < 122
            else policy[161]
        )
        for j in used
    }
    assert used == want
    history = op.json("history", run)
    mine = [e for e in history if e["actor"] == ACTOR]
    assert [(e["effective_step"], e["hold"]) for e in mine] == [
        (42, 1),
        (82, 1),
        (122, 0),
        (162, 1),
    ]
    assert [e["version"] for e in history] == list(range(1, len(history) + 1))
    # No decision of the policy is sent while an operator holds the LRs.
    assert not [e for e in history if e["actor"] == "policy" and 42 <= e["effective_step"] < 122]
    assert [e for e in history if e["actor"] == "policy" and 122 < e["effective_step"] < 162]
    assert_lands_on_its_step(history, used)
    assert set(change_steps(used)) <= {e["effective_step"] for e in history}


def test_set_lr_on_a_running_training_lands_at_its_step(
    op, daemon, lrpilot_exe, tmp_path, trainings
):
    """The commands come while the training steps (its one gate, at 950,
    only keeps it from ending before the second command is in)."""
    run = "ops-running"
    training, out = start_training(tmp_path, daemon, run, steps=1000, gates=[950], step_sleep=0.002)
    trainings.append(training)
    wait_for(lambda: out.exists() and len(read_steps(out)) >= 50, 30, "step 50")
    held = op.json("set-lr", run, "0.02")
    wait_for(lambda: len(read_steps(out)) >= held["effective_step"] + 50, 30, "50 more steps")
    released = op.json("resume", run)
    training.go(950)
    training.finish()
    used = used_lrs(out)
    assert 50 < held["effective_step"] < released["effective_step"] < 1000
    history = op.json("history", run)
    assert [e["version"] for e in history if e["actor"] == ACTOR] == [
        held["version"],
        released["version"],
    ]
    assert_lands_on_its_step(history, used)
    assert {used[j][0] for j in range(held["effective_step"], released["effective_step"])} == {0.02}
    # The policy's LRs again from the release's step; a decision the policy
    # made right after the release can land at that same step (it wins then).
    landing = [e for e in history if e["effective_step"] == released["effective_step"]]
    assert landing[0]["version"] == released["version"]
    assert used[released["effective_step"]] == landing[-1]["new_lrs"]


# --- switching the policy -----------------------------------------------------


def test_policy_from_a_file_stdin_and_inline_then_the_requested_one_back(
    op, daemon, lrpilot_exe, tmp_path, trainings
):
    run = "ops-switch"
    training, out = start_training(tmp_path, daemon, run, steps=150, gates=[30, 60, 90, 120])
    trainings.append(training)
    cosine = {"kind": "cosine", "T_max": 50, "eta_min": 0.001}
    exponential = {"kind": "exponential", "gamma": 0.97}
    step = {"kind": "step", "step_size": 7, "gamma": 0.5}
    (tmp_path / "cosine.json").write_text(json.dumps(cosine))
    switches = []

    training.at(30)
    switches.append((cosine, op.json("policy", run, str(tmp_path / "cosine.json"))))
    shown = op.json("show", run)
    assert shown["policy"]["kind"] == "cosine"
    assert shown["requested_policy"]["kind"] == "plateau"
    assert shown["policy_base_lrs"] == switches[0][1]["lrs"]
    training.go(30)
    training.at(60)
    switches.append((exponential, op.json("policy", run, "-", stdin=json.dumps(exponential))))
    training.go(60)
    training.at(90)
    switches.append((step, op.json("policy", run, json.dumps(step))))
    training.go(90)
    training.at(120)
    requested = op.json("policy", run, "--requested")
    switches.append((PLATEAU, requested))
    assert "given back to the script's (plateau)" in requested["reason"]
    shown = op.json("show", run)
    assert shown["policy"] == shown["requested_policy"]
    training.go(120)
    training.finish()

    lines = read_steps(out)
    used = used_lrs(out)
    bounds = [c["effective_step"] for _, c in switches] + [len(lines) + 1]
    assert bounds[:-1] == [32, 62, 92, 122]
    for (spec, command), end in zip(switches, bounds[1:]):
        g = command["state_step"]
        assert command["reason"].startswith("policy ")
        assert command["actor"] == ACTOR
        # The new policy starts at its step 0 (record g) from the LRs in
        # effect then, and takes the records after g: simulate from there.
        assert command["policy"]["kind"] == spec["kind"]
        assert command["base_lrs"] == command["lrs"] == used[g + 1]
        after = simulate(lrpilot_exe, spec, metric_stream(lines[g:]), command["base_lrs"])
        got = [used[j] for j in range(g + 2, end)]
        assert got == after[: end - g - 2], spec["kind"]
        assert len(set(map(tuple, got))) > 1, spec["kind"]  # the policy moved the LR
    history = op.json("history", run)
    assert all(e["applied_step"] == e["effective_step"] and e["late"] == 0 for e in history)
    assert [e["reason"] for e in history if e["actor"] == ACTOR] == [
        "policy switched to cosine",
        "policy switched to exponential",
        "policy switched to step",
        "policy given back to the script's (plateau)",
    ]
    assert [e["policy"]["kind"] for e in history if e["actor"] == ACTOR] == [
        "cosine",
        "exponential",
        "step",
        "plateau",
    ]


# --- what-if, on a finished run ---------------------------------------------


@pytest.fixture(scope="module")
def finished(daemon, tmp_path_factory) -> tuple[str, list[dict]]:
    """A run trained to the end (150 steps) under its plateau policy."""
    where = tmp_path_factory.mktemp("ops-finished")
    training, out = start_training(where, daemon, "ops-done", steps=150)
    try:
        training.finish()
    finally:
        training.stop()
    return "ops-done", read_steps(out)


COSINE = {"kind": "cosine", "T_max": 120, "eta_min": 0.001}


def test_preview_changes_nothing_and_prints_what_simulate_gives(
    op, daemon, lrpilot_exe, finished, tmp_path
):
    run, lines = finished
    (tmp_path / "cosine.json").write_text(json.dumps(COSINE))
    before = (op.json("show", run), op.json("history", run))
    curve = [
        json.loads(line)
        for line in ok(op("policy", run, str(tmp_path / "cosine.json"), "--preview", "--json"))
        .strip()
        .splitlines()
    ]
    want = simulate(lrpilot_exe, COSINE, metric_stream(lines), BASE_LRS)
    assert curve == [{"step": 0, "lrs": BASE_LRS}] + [
        {"step": k, "lrs": lrs} for k, lrs in enumerate(want, start=1)
    ]
    # From stdin, read from the store directly: the same curve.
    direct = ok(
        op(
            "policy",
            run,
            "-",
            "--preview",
            "--json",
            "--state-dir",
            str(daemon.state_dir),
            stdin=json.dumps(COSINE),
        )
    )
    assert [json.loads(line) for line in direct.strip().splitlines()] == curve
    text = ok(op("policy", run, str(tmp_path / "cosine.json"), "--preview")).splitlines()
    assert text[0] == (
        f"preview: cosine replayed on the 150 recorded steps of {run} (nothing changed)"
    )
    assert text[1].split() == ["STEP", "LRS"]
    assert text[-1].endswith("final lrs " + ", ".join(f"{lr:.4g}" for lr in want[-1]))
    assert (op.json("show", run), op.json("history", run)) == before


def test_simulate_from_run_equals_simulate_on_the_stream_the_training_recorded(
    op, daemon, lrpilot_exe, finished
):
    run, lines = finished
    want = [
        {"step": k, "lrs": lrs}
        for k, lrs in enumerate(
            simulate(lrpilot_exe, COSINE, metric_stream(lines), BASE_LRS), start=1
        )
    ]
    spec = json.dumps(COSINE)
    via_daemon = ok(op("simulate", "--from-run", run, "--policy", spec))
    direct = ok(
        lrpilot(
            lrpilot_exe,
            "simulate",
            "--from-run",
            run,
            "--policy",
            spec,
            "--state-dir",
            str(daemon.state_dir),
        )
    )
    assert [json.loads(line) for line in via_daemon.splitlines()] == want
    assert [json.loads(line) for line in direct.splitlines()] == want
    # --base-lr replaces the run's.
    other = ok(
        op("simulate", "--from-run", run, "--policy", spec, "--base-lr", "1", "--base-lr", "2")
    )
    stream = metric_stream(lines)
    assert [json.loads(line)["lrs"] for line in other.splitlines()] == simulate(
        lrpilot_exe, COSINE, stream, [1.0, 2.0]
    )
    # The plateau the run had, replayed, gives the LRs it had.
    replayed = ok(op("simulate", "--from-run", run, "--policy", json.dumps(PLATEAU)))
    assert [json.loads(line)["lrs"] for line in replayed.splitlines()] == [
        line["lrs"] for line in lines
    ]


# --- errors ---------------------------------------------------------------------


def test_errors_are_one_line_exit_non_zero_and_change_nothing(op, lrpilot_exe, finished, tmp_path):
    run, _ = finished
    (tmp_path / "broken.json").write_text('{"kind": "cosine", "T_max": ')
    nobody = free_address()
    before = (op.json("show", run), op.json("history", run))
    cases = [
        (("show", "nope"), "show", 1, ["unknown run 'nope'", run]),
        (("history", "nope"), "history", 1, ["unknown run 'nope'"]),
        (("set-lr", "nope", "0.1"), "set-lr", 1, ["unknown run 'nope'"]),
        (("pause", "nope"), "pause", 1, ["unknown run 'nope'"]),
        (("resume", "nope"), "resume", 1, ["unknown run 'nope'"]),
        (("policy", "nope", json.dumps(COSINE)), "policy", 1, ["unknown run 'nope'"]),
        (("set-lr", run, "0"), "set-lr", 2, ["positive number", "0"]),
        (("set-lr", run, "-1"), "set-lr", 2, ["positive number", "-1"]),
        (("set-lr", run, "abc"), "set-lr", 2, ["not a number: 'abc'"]),
        (("set-lr", run, "0.1", "--group", "tail"), "set-lr", 1, ["no param group 'tail'"]),
        (("resume", run), "resume", 1, ["not held"]),
        (("policy", run, str(tmp_path / "broken.json")), "policy", 1, ["invalid JSON"]),
        (("policy", run, str(tmp_path / "missing.json")), "policy", 1, ["cannot read"]),
        (("policy", run, '{"kind": "cosine"}'), "policy", 1, ["T_max", "missing"]),
        (("policy", run, '{"kind": "plateau", "factor": 3}'), "policy", 1, ["factor"]),
        (("policy", run, '{"kind": "warp"}'), "policy", 1, ["warp"]),
        (("history", run, "--limit", "0"), "history", 2, ["--limit"]),
        # The run has ended: a change would apply to nothing (or to the next
        # script that reuses the id), so it is refused.
        (("set-lr", run, "0.1"), "set-lr", 1, ["no connected rank"]),
        (("pause", run), "pause", 1, ["no connected rank"]),
        (("policy", run, json.dumps(COSINE)), "policy", 1, ["no connected rank"]),
        (
            ("simulate", "--from-run", "nope", "--policy", json.dumps(COSINE)),
            "simulate",
            1,
            ["unknown run 'nope'"],
        ),
    ]

    def attempt(case):
        args, command, status, says = case
        return op(*args), command, status, says

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(attempt, cases))
    done.append((op("policy", run, "-", stdin="{not json"), "policy", 1, ["invalid JSON"]))
    done.append(
        (
            lrpilot(lrpilot_exe, "runs", "--control", nobody, "--timeout", "1"),
            "runs",
            1,
            ["no answer from a daemon at " + nobody, "within 1s"],
        )
    )
    done.append(
        (
            lrpilot(
                lrpilot_exe,
                "simulate",
                "--from-run",
                run,
                "--policy",
                json.dumps(COSINE),
                "--state-dir",
                str(tmp_path / "no-store"),
            ),
            "simulate",
            1,
            ["no lrpilot store at"],
        )
    )
    for result, command, status, says in done:
        one_line_error(result, command, *says, status=status)
    assert (op.json("show", run), op.json("history", run)) == before
