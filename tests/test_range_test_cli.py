"""`lrpilot range-test` as an operator runs it: a real `lrpilot daemon` and a
real torch training (tests/live/train_digits.py, lock-step), the command as
a subprocess.

The operator starts an LR range test on the live run and waits for it
(`--wait --plot`): the plot is a real PNG, the journal's decision holds the
curve (a point a step of the sweep, fewer when it ended early) and the
suggestion, which the training then uses, and `--last` reads the same
suggestion back. `--suggest-only` gives the run its policy back where it
stood: the LRs after the sweep are the ones before it, and the parameters
the sweep blew up are put back. `show` says where a sweep is. Bad flags, a
held run, a run in a sweep and an unknown run are refused in one line,
changing nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import (
    DaemonProcess,
    daemon_process,
    lrpilot,
    ok,
    ok_json,
    one_line_error,
    read_jsonl,
    settled_history,
    start_digits,
    wait_for,
)

from lrpilot.daemon.cli.main import main as cli_main

BASE_LRS = [0.1, 0.05]  # groups body and head: the sweep keeps their ratio
# A plateau that never cuts in these tests: the LRs move only by the range test.
STILL = {"kind": "plateau", "metric": "val_loss", "patience": 100_000}
# A schedule that moves every step: going back "where it stood" is exact or not.
COSINE = {"kind": "cosine", "T_max": 100_000}
SUGGESTION = re.compile(
    r"^suggested lr (\S+) \((.+)\), (\d+) points?, ended early: (no|yes \(.+\))$", re.M
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def daemon(lrpilot_exe, tmp_path_factory) -> Iterator[DaemonProcess]:
    where = tmp_path_factory.mktemp("range-test-daemon")
    with daemon_process(lrpilot_exe, where / "state", where / "daemon.log") as running:
        yield running


class Live:
    """One run of train_digits.py (lock-step), until the test stops it."""

    def __init__(self, where: Path, daemon: DaemonProcess, digits: Path, run: str, policy) -> None:
        self.run, self.daemon = run, daemon
        self.out, self.stop_file = where / f"{run}.jsonl", where / "stop"
        config = {
            "address": daemon.address,
            "data": str(digits),
            "steps": 1_000_000,
            "deadline_s": 60,
            "stop_file": str(self.stop_file),
            "step_sleep": 0.001,
            "summary": str(where / "summary.json"),
            "trainers": [
                {
                    "run": run,
                    "policy": policy,
                    "sync": True,
                    "report_every": 10,
                    "lrs": BASE_LRS,
                    "out": str(self.out),
                }
            ],
        }
        self.proc = start_digits(config, where)
        self.where = where

    def at_step(self, step: int) -> list[dict]:
        """The training's step lines once it is past ``step``."""

        def there() -> list[dict] | None:
            if self.proc.poll() is not None:
                raise AssertionError((self.where / "train.out").read_text()[-3000:])
            lines = [line for line in read_jsonl(self.out) if "step" in line and "lrs" in line]
            return lines if lines and lines[-1]["step"] > step else None

        return wait_for(there, 30, f"{self.run} past step {step}", self.daemon.log)

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return lrpilot(self.daemon.exe, *args, "--control", self.daemon.control, timeout=timeout)

    def history(self) -> list[dict]:
        return ok_json(self.cli("history", self.run, "--json"))

    def stop(self) -> None:
        self.stop_file.write_text("stop")
        try:
            self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def live(daemon, digits, tmp_path) -> Iterator:
    started: list[Live] = []

    def start(run: str, policy) -> Live:
        training = Live(tmp_path, daemon, digits, run, policy)
        started.append(training)
        training.at_step(10)  # attached, and the daemon has its steps
        return training

    yield start
    for training in started:
        training.stop()


def decisions(history: list[dict]) -> list[dict]:
    """The journal entries that ended a range test's sweep."""
    return [
        e
        for e in history
        if (e.get("policy_state") or {}).get("phase") == "done"
        and "curve_lrs" in e["policy_state"]
        and e["reason"].startswith("range_test:")
    ]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, data[:16]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def by_step(lines: list[dict]) -> dict[int, dict]:
    return {line["step"]: line for line in lines if "lrs" in line}


# --- start, wait, plot, read back ---------------------------------------------------


def test_a_range_test_on_a_live_run_waits_plots_and_journals_its_curve(live, tmp_path):
    run = live("rt-wait", STILL)
    png = tmp_path / "out.png"
    steps = 60
    done = run.cli(
        "range-test", run.run, "--steps", str(steps), "--min-lr", "1e-5", "--max-lr", "10",
        "--plot", str(png),
    )  # fmt: skip
    text = ok(done)
    first = text.splitlines()[0]
    assert first.startswith(f"run {run.run}: v1 from step "), text
    assert "(range test: lr 1e-05 -> 10 over 60 steps (exponential), then plateau" in first
    said = SUGGESTION.search(text)
    assert said, text
    assert said.group(2) == "steepest fall of the smoothed loss"
    assert text.rstrip().endswith(f"plot: {png}")

    # The plot: a real PNG, of the size it is drawn at, with something drawn.
    assert png_size(png) == (800, 500)
    assert png.stat().st_size > 10_000

    # The journal: the start, then the decision with the whole curve.
    history = settled_history(run.history)
    start = next(e for e in history if e["version"] == 1)
    assert start["policy"]["kind"] == "range_test" and start["policy"]["steps"] == steps
    assert start["policy"]["then"]["kind"] == "plateau"  # the run's policy follows
    [decision] = decisions(history)
    state = decision["policy_state"]
    points = len(state["curve_lrs"])
    assert points == len(state["curve_losses"]) == int(said.group(3))
    if state["stopped_early"]:
        assert 2 <= points < steps and said.group(4).startswith("yes (")
    else:
        assert points == steps and said.group(4) == "no"
    lrs = state["curve_lrs"]
    assert lrs[0] == pytest.approx(1e-5) and lrs == sorted(lrs) and lrs[-1] <= 10
    assert all(math.isfinite(loss) for loss in state["curve_losses"])
    suggested = state["suggested_lr"]
    assert suggested in lrs and f"{suggested:.1e}" == said.group(1)
    # The plateau starts from the suggestion, at the groups' ratio, and the
    # training uses it from the decision's step.
    assert decision["new_lrs"] == pytest.approx([suggested, suggested / 2])
    lines = by_step(run.at_step(decision["applied_step"] + 2))
    assert lines[decision["applied_step"] - 1]["lrs"] == decision["new_lrs"]

    # --last reads the same range test back, as JSON and as text.
    again = ok_json(run.cli("range-test", run.run, "--last", "--json"))
    assert again["suggested_lr"] == suggested and again["points"] == points
    assert again["decision"]["version"] == decision["version"]
    assert again["curve"] == {"lrs": lrs, "losses": state["curve_losses"]}
    assert again["spec"]["steps"] == steps and again["command"] is None
    assert SUGGESTION.search(ok(run.cli("range-test", run.run, "--last"))).group(0) == (
        said.group(0)
    )
    # show: the policy is the range test, done, and its suggestion.
    shown = ok(run.cli("show", run.run))
    assert f"range test done, suggested lr {suggested:.1e}, then plateau" in shown, shown
    assert f"last range test v{decision['version']} from step " in shown


# --- suggest only: the policy back where it stood, the parameters put back ------------


def test_suggest_only_gives_the_policy_back_where_it_stood_and_the_parameters_too(live):
    run = live("rt-only", COSINE)
    before = run.at_step(20)
    steps = 40
    answer = ok_json(
        run.cli(
            "range-test", run.run, "--suggest-only", "--steps", str(steps), "--min-lr", "1e-4",
            "--max-lr", "1000", "--no-diverge", "--wait", "--json",
        )
    )  # fmt: skip
    command, decision = answer["command"], answer["decision"]
    assert command["policy"]["suggest_only"] and command["policy"]["then"]["kind"] == "cosine"
    assert answer["points"] <= steps and answer["suggested_lr"] is not None
    history = settled_history(run.history)
    start = next(e for e in history if e["version"] == command["version"])
    # The cosine is back at the LRs it had when the sweep began.
    assert decision["new_lrs"] == start["old_lrs"]
    lines = by_step(run.at_step(decision["applied_step"] + 20))
    sweep_from, sweep_to = start["applied_step"], decision["applied_step"]
    assert lines[sweep_from - 2]["lrs"] == start["old_lrs"]  # what the last step before used
    assert lines[sweep_to - 1]["lrs"] == start["old_lrs"]  # what the first step after used
    # ... and moves on from there as the cosine does: down, a little a step.
    after = lines[sweep_to + 10]["lrs"]
    assert after[0] < start["old_lrs"][0]
    assert after[0] == pytest.approx(start["old_lrs"][0], rel=1e-4)
    # The sweep to an LR of 1000 blew the model up; its end put the
    # parameters back: the loss after it is the loss before it.
    swept = [lines[k]["loss"] for k in range(sweep_from, sweep_to) if k in lines]
    assert any(not math.isfinite(x) or x > 100 for x in swept), swept
    usual = max(line["loss"] for line in before[-10:])
    assert all(lines[k]["loss"] < 2 * usual + 0.5 for k in range(sweep_to, sweep_to + 10))
    # The policy: the range test, done, its then the cosine that was.
    shown = ok_json(run.cli("show", run.run, "--json"))
    assert shown["policy"]["kind"] == "range_test" and shown["policy_state"]["phase"] == "done"
    assert shown["policy"]["then"] == shown["requested_policy"]
    assert shown["policy"]["then_base_lrs"] == BASE_LRS


# --- the control op on its own ----------------------------------------------------------


@pytest.fixture
def plane(make_plane):
    """A control plane over run "r" (groups at 0.1 and 0.01, a cosine ten
    steps in, one connected rank) and run "flat" (no policy)."""
    from lrpilot.daemon.service.control import ControlPlane
    from lrpilot.protocol import STEP, BatchEncoder, GroupInfo, Hello, encode

    data = make_plane()
    groups = [GroupInfo(name="body", lr=0.1), GroupInfo(name="head", lr=0.01)]
    for run, policy in (("r", {"kind": "cosine", "T_max": 50}), ("flat", None)):
        ident = run.encode()
        data.handle(ident, [encode(Hello(run=run, groups=groups, policy=policy, pid=1))], 0.0)
        records = [(k, k, STEP, {"loss": 1.0}) for k in range(1, 11)]
        data.handle(ident, BatchEncoder(run, 0).encode(records, {}), 0.5)
    return ControlPlane(data)


def ask(plane, **request) -> dict:
    answer, outgoing = plane.answer(json.dumps({"op": "range_test", **request}).encode())
    wire = answer.model_dump()
    assert wire["ok"] == bool(outgoing), (wire, outgoing)
    return wire


def test_the_op_builds_the_range_test_from_the_run_s_policy(plane):
    engine = plane.plane.registry.runs["r"].engine
    cosine, state = engine.spec.model_dump(), engine.policy.state_dict()
    sent = ask(plane, run="r", sweep={"steps": 30, "min_lr": 1e-6}, suggest_only=True)["command"]
    policy = sent["policy"]
    assert (policy["kind"], policy["steps"], policy["min_lr"]) == ("range_test", 30, 1e-6)
    # Back where it stood: the cosine, its base LRs and its state as of the request.
    assert policy["suggest_only"] and policy["then"] == cosine
    assert (policy["then_base_lrs"], policy["then_state"]) == ([0.1, 0.01], state)
    assert sent["lrs"] == [1e-6, 1e-7]  # the groups' ratio kept
    assert sent["reason"] == (
        "range test: lr 1e-06 -> 1 over 30 steps (exponential), then back to cosine where it "
        "stood (suggest only)"
    )
    # A run with no policy gets its LRs back; then null holds the suggestion.
    flat = ask(plane, run="flat", sweep={}, suggest_only=True)["command"]["policy"]
    assert (flat["then"], flat["then_base_lrs"], flat["then_state"]) == (None, [0.1, 0.01], None)
    held = ask(plane, run="flat", sweep={"then": None, "steps": 5})
    assert held["ok"] is False and "already in a range test" in held["error"]


def test_then_defaults_to_the_run_s_policy_from_the_suggestion(plane):
    sent = ask(plane, run="r", sweep={"mode": "linear", "max_lr": 0.5})["command"]
    assert sent["policy"]["then"]["kind"] == "cosine" and not sent["policy"]["suggest_only"]
    assert sent["reason"].endswith("(linear), then cosine from the suggestion")
    other = ask(plane, run="flat", sweep={"then": {"kind": "step", "step_size": 5}})["command"]
    assert other["policy"]["then"]["kind"] == "step"


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        ({"run": "r", "sweep": {"bogus": 1}}, "sweep: unknown field 'bogus'"),
        ({"run": "r", "sweep": {"kind": "cosine"}}, "sweep: unknown field 'kind'"),
        ({"run": "r", "sweep": {"then_state": {}}}, "unknown field 'then_state'"),
        ({"run": "r", "sweep": {"then": None}, "suggest_only": True}, "two ends"),
        ({"run": "r", "sweep": {"min_lr": 1.0, "max_lr": 0.1}}, "must be above min_lr"),
        ({"run": "r", "sweep": {"steps": 0}}, "steps"),
        ({"run": "r", "sweep": {"steps": 1e300}}, "±2**53"),
        ({"run": "r", "sweep": {"then": {"kind": "range_test"}}}, "then"),
        ({"run": "r", "sweep": {"then": {"kind": "cosine"}}}, "T_max"),
        ({"run": "r", "sweep": {"mode": "cubic"}}, "mode"),
        ({"run": "nope", "sweep": {}}, "unknown run 'nope'"),
        ({"run": "r", "sweep": [1]}, "sweep"),
    ],
)
def test_the_op_refuses_in_one_line_and_changes_nothing(plane, request_, says):
    engine = plane.plane.registry.runs["r"].engine
    before = (engine.version, engine.spec)
    answer = ask(plane, **request_)
    assert answer["ok"] is False and says in answer["error"], answer
    assert "\n" not in answer["error"]
    assert (engine.version, engine.spec) == before


def test_a_held_run_and_a_run_with_no_rank_are_refused(plane):
    from lrpilot.protocol import Bye, encode

    plane.answer(json.dumps({"op": "pause", "run": "r"}).encode())
    answer = ask(plane, run="r")
    assert not answer["ok"] and "resume first" in answer["error"]
    plane.plane.handle(b"flat", [encode(Bye(run="flat", step=10))], 1.0)
    answer = ask(plane, run="flat")
    assert not answer["ok"] and "no connected rank" in answer["error"]


# --- what is refused -------------------------------------------------------------------


def test_a_held_run_a_sweeping_run_and_an_unknown_run_are_refused_in_one_line(live):
    run = live("rt-refused", STILL)
    ok(run.cli("set-lr", run.run, "0.01"))
    one_line_error(run.cli("range-test", run.run), "range-test", "held", "resume first")
    ok(run.cli("resume", run.run))
    one_line_error(run.cli("range-test", "nope"), "range-test", "unknown run 'nope'")
    one_line_error(
        run.cli("range-test", run.run, "--then", '{"kind": "warp"}'), "range-test", "warp"
    )
    one_line_error(run.cli("range-test", run.run, "--last"), "range-test", "no finished range test")
    assert not [e for e in run.history() if "range" in e["reason"]]  # none started
    # A sweep long enough to look at: show says where it is.
    ok(run.cli("range-test", run.run, "--steps", "10000", "--max-lr", "1e-6"))
    wait_for(
        lambda: re.search(
            r"^range test sweeping, step \d+/10000, lr \S+$",
            ok(run.cli("show", run.run)),
            re.M,
        ),
        10,
        "show to say where the sweep is",
    )
    one_line_error(
        run.cli("range-test", run.run), "range-test", "already in a range test", "sweeping"
    )
    ok(run.cli("policy", run.run, "--requested"))  # ends the sweep: the plateau is back
    shown = ok_json(run.cli("show", run.run, "--json"))
    assert shown["policy"]["kind"] == "plateau"


BAD_FLAGS = [
    (["--min-lr", "0"], "argument --min-lr"),
    (["--max-lr", "nan"], "argument --max-lr"),
    (["--max-lr", "1e308"], "1e-12 to 1000"),
    (["--min-lr", "1", "--max-lr", "0.5"], "--max-lr (0.5) must be above --min-lr (1)"),
    (["--max-lr", "1e-9"], "must be above --min-lr"),
    (["--steps", "0"], "argument --steps"),
    (["--steps", "10001"], "1 to 10000"),
    (["--steps", "1.5"], "not a whole number"),
    (["--mode", "cubic"], "argument --mode"),
    (["--smoothing", "1"], "argument --smoothing"),
    (["--smoothing", "-0.1"], "argument --smoothing"),
    (["--diverge", "1"], "argument --diverge"),
    (["--diverge", "2", "--no-diverge"], "not allowed with"),
    (["--suggest", "best"], "argument --suggest"),
    (["--metric", ""], "argument --metric"),
    (["--skip-begin", "-1"], "argument --skip-begin"),
    (["--suggest-only", "--then", '{"kind": "cosine", "T_max": 9}'], "give one"),
    (["--last", "--steps", "10"], "--last starts nothing"),
    (["--last", "--suggest-only"], "--last starts nothing"),
    (["--plot", "out.gif"], ".png, .svg, .pdf"),
    (["--plot", "/no/such/dir/out.png"], "no directory"),
    (["--timeout", "0"], "argument --timeout"),
]


@pytest.mark.parametrize(("flags", "says"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_every_bad_flag_is_one_line_and_exit_2_before_anything_is_sent(flags, says, capsys):
    # No daemon at this address: a flag that got through would fail otherwise.
    argv = ["range-test", "some-run", *flags, "--control", "tcp://127.0.0.1:9", "--timeout", "1"]
    if "--timeout" in flags:
        argv = argv[:-2]
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    out, err = capsys.readouterr()
    done = subprocess.CompletedProcess(argv, exited.value.code, out, err)
    one_line_error(done, "range-test", says, status=2)


def test_a_then_that_is_not_json_is_one_line(capsys):
    argv = ["range-test", "r", "--then", "{nope", "--control", "tcp://127.0.0.1:9"]
    status = cli_main(argv)
    out, err = capsys.readouterr()
    one_line_error(
        subprocess.CompletedProcess(argv, status, out, err), "range-test", "--then: invalid JSON"
    )


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    """The CLI with matplotlib unimportable, as where lrpilot was installed
    without the plot extra: --plot fails before anything is sent."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from lrpilot.daemon.cli.main import main\n"
        f"sys.exit(main(['range-test', 'r', '--plot', {str(tmp_path / 'x.png')!r}, "
        "'--control', 'tcp://127.0.0.1:9']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
        timeout=60,
    )  # fmt: skip
    one_line_error(done, "range-test", "pip install 'lrpilot[plot]'", status=2)
    assert not (tmp_path / "x.png").exists()


def test_help_explains_each_flag_and_the_flow(lrpilot_exe):
    text = ok(lrpilot(lrpilot_exe, "range-test", "--help"))
    for flag in (
        "--min-lr", "--max-lr", "--steps", "--mode", "--metric", "--smoothing", "--diverge",
        "--no-diverge", "--suggest", "--then", "--suggest-only", "--no-restore", "--wait",
        "--timeout", "--plot", "--last", "--json",
    ):  # fmt: skip
        assert flag in text, flag
    assert "put back" in text and "suggest" in text and "journal" in text
    assert "range-test" in ok(lrpilot(lrpilot_exe, "--help"))


@pytest.mark.parametrize(
    "request_", [{"op": "set_lr", "lr": 0.5}, {"op": "pause"}], ids=["set-lr", "pause"]
)
def test_a_hold_during_a_sweep_is_refused_and_a_switch_ends_the_sweep(plane, request_):
    # A hold would keep the sweep's end (its suggestion and curve) from the
    # journal; `lrpilot policy` is how to stop a sweep.
    engine = plane.plane.registry.runs["r"].engine
    ask(plane, run="r", sweep={"steps": 30})
    version = engine.version
    answer, outgoing = plane.answer(json.dumps({**request_, "run": "r"}).encode())
    wire = answer.model_dump()
    assert wire["ok"] is False and not outgoing
    assert "is in a range test (step 0 of 30)" in wire["error"]
    assert "lrpilot policy" in wire["error"] and "\n" not in wire["error"]
    assert engine.version == version and engine.held is None
    answer, _ = plane.answer(
        json.dumps(
            {"op": "policy", "run": "r", "policy": {"kind": "step", "step_size": 5}}
        ).encode()
    )
    assert answer.model_dump()["ok"] and not engine.policy.sweeping
