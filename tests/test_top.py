"""`lrpilot top`, the live terminal view.

- `render` (a pure function) on sample `runs` summaries, read back as text
  through rich's recording console: the sparkline of a known loss history,
  HELD, LRs per group, the last change, ranks and lag, "no runs", the error
  line;
- in a real terminal (tmux): `lrpilot top` against a real `lrpilot daemon`
  and a real torch training (tests/live/train_tiny.py) shows the run, its
  step moves while the view stays one screen (redrawn in place), `q` and
  Ctrl-C quit with exit status 0, no traceback, the terminal put back
  (canonical mode and echo on, alternate screen left); with no daemon it says
  "no answer from daemon at ADDR — retrying" and picks the daemon up once one
  starts.

Every wait is a poll with a deadline; every process and tmux server started
here is killed on the way out. tmux must be installed (scripts/test does it).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from procs import DaemonProcess, free_address, wait_for
from rich.console import Console

from lrpilot.daemon.cli.control_client import ControlClient, ControlClientError
from lrpilot.daemon.cli.top import BLOCKS, SPARK_WIDTH, render, sparkline
from lrpilot.daemon.control_protocol import RunSummary

TRAIN = ROOT / "tests" / "live" / "train_tiny.py"
ADDRESS = "tcp://127.0.0.1:7313"
NOW = 1_700_000_000.0
STARTUP_S = 15.0  # a daemon or a torch training is up within this
VIEW_S = 10.0  # the view shows what is asked of it within this


# --- render ------------------------------------------------------------------


def summary(run: str = "exp-1", **changes) -> dict:
    """A `runs` summary as the control plane sends it (daemon/service/control.py)."""
    base = {
        "run": run,
        "status": "active",
        "step": 1234,
        "steps_per_s": 98.5,
        "groups": ["body", "head"],
        "lrs": [0.1, 0.01],
        "policy_kind": "plateau",
        "held": False,
        "ranks": [0],
        "world_size": 1,
        "lag_steps": 0,
        "loss_history": [2.5, 2.0, 1.5],
        "last_change": {
            "version": 3,
            "step": 1200,
            "lrs": [0.1, 0.01],
            "reason": "plateau: loss did not improve for 20 records",
            "actor": "policy",
        },
        "created": NOW - 60,
        "ended": None,
    }
    return {**base, **changes}


def text_of(runs: list[dict], error: str | None = None, width: int = 160) -> str:
    console = Console(record=True, width=width, color_system=None)
    # Read as top reads an answer: through the control protocol's model.
    console.print(render([RunSummary.model_validate(r) for r in runs], ADDRESS, error, NOW))
    return console.export_text()


def row_of(text: str, run: str) -> str:
    rows = [line for line in text.splitlines() if line.split()[:1] == [run]]
    assert len(rows) == 1, f"expected one row for {run!r}:\n{text}"
    return rows[0]


def test_sparkline_maps_a_known_history_onto_the_eight_blocks():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([8, 7, 6, 5, 4, 3, 2, 1]) == "█▇▆▅▄▃▂▁"
    assert sparkline([0.5, 0.5, 0.5]) == "▄▄▄"  # flat: the middle, not the floor
    assert sparkline([1.0, float("nan"), 3.0]) == "▁ █"
    assert sparkline([]) == ""
    long = list(range(100))  # only the last SPARK_WIDTH samples
    assert sparkline(long) == sparkline(long[-SPARK_WIDTH:])
    assert len(sparkline(long)) == SPARK_WIDTH


def test_a_run_row_shows_the_loss_sparkline_and_its_last_value():
    history = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.125]
    row = row_of(text_of([summary(loss_history=history)]), "exp-1")
    # 8 → 0.125 spans the blocks: the top one first, the bottom one last.
    spark = re.search(f"([{BLOCKS}]+) 0.125", row)
    assert spark, row
    assert spark.group(1) == sparkline(history)
    assert spark.group(1)[0] == "█" and spark.group(1)[-1] == "▁"


def test_a_run_row_shows_step_rate_lrs_policy_change_ranks_and_lag():
    run = summary(ranks=[0, 1, 3], world_size=4, lag_steps=37, step=98765, steps_per_s=12.34)
    text = text_of([run])
    row = row_of(text, "exp-1")
    cells = row.split()
    assert cells[1:4] == ["active", "98765", "12.3"]
    assert "body=0.1 head=0.01" in row
    assert "v3 @1200 policy: plateau: loss did not improve for 20 records" in row
    assert cells[-2:] == ["3/4", "37"]  # ranks connected / world size, lag in steps
    assert "HELD" not in row
    header = text.splitlines()[1].split()
    assert header[-2:] == ["RANKS", "LAG"]


def test_held_runs_say_held_next_to_their_policy():
    text = text_of([summary("held-run", held=True), summary("free-run")])
    assert "plateau HELD" in row_of(text, "held-run")
    assert "HELD" not in row_of(text, "free-run")


def test_a_run_without_policy_history_or_change_still_has_a_row():
    run = summary(
        "bare",
        status="ended",
        policy_kind=None,
        loss_history=[],
        last_change=None,
        ranks=[],
        groups=["0"],
        lrs=[0.3],
    )
    cells = row_of(text_of([run]), "bare").split()
    assert cells[1] == "ended"
    assert cells[4:] == ["-", "0.3", "-", "-", "0/1", "0"]  # loss, LR, policy, change


def test_header_counts_runs_and_names_the_daemon_and_the_time():
    lines = text_of([summary("a"), summary("b")]).splitlines()
    clock = time.strftime("%H:%M:%S", time.localtime(NOW))
    assert lines[0].split() == ["lrpilot", "top", "daemon", ADDRESS, clock, "2", "runs"]
    assert lines[-1].strip() == "q quit"


def test_no_runs_says_so():
    text = text_of([])
    assert "0 runs" in text.splitlines()[0]
    assert "no runs" in text
    assert "RUN" not in text  # no empty table
    assert text.splitlines()[-1].strip() == "q quit"


def test_the_error_line_is_shown_with_the_runs_last_seen():
    error = f"no answer from daemon at {ADDRESS} — retrying"
    text = text_of([], error)
    assert text.splitlines()[1] == error
    assert "no runs" not in text  # we do not know: the daemon did not answer
    text = text_of([summary()], error)
    assert text.splitlines()[1] == error
    assert row_of(text, "exp-1")


def test_a_long_reason_is_cut_and_keeps_one_line_per_run():
    reason = "operator note " * 40
    last = {"version": 9, "step": 5, "lrs": [0.1], "reason": reason, "actor": "ann@box"}
    text = text_of([summary(last_change=last)], width=120)
    row = row_of(text, "exp-1")
    assert "v9 @5 ann@box: operator note" in row and row.rstrip().endswith("0")
    assert "…" in row
    assert len(text.splitlines()) == 5  # header, column names, rule, the row, footer


def test_names_with_markup_or_control_characters_are_drawn_as_escaped_text():
    """A client chose these: rich markup is shown as typed (an unbalanced
    "[/]" would make rich raise), control characters as their escapes."""
    last = {"version": 1, "step": 2, "lrs": [0.1], "reason": "why\x1b[2J", "actor": "a\nb"}
    run = summary("[bold]x[/] \x1b[31mred", groups=["[/]", "\u202eh"], last_change=last)
    text = text_of([run])
    row = row_of(text, "[bold]x[/]")
    assert "[bold]x[/] \\x1b[31mred" in row
    assert "[/]=0.1 \\u202eh=0.01" in row
    assert "v1 @2 a\\x0ab: why\\x1b[2J" in row
    assert "\x1b" not in text and "\u202e" not in text


# --- in a real terminal ---------------------------------------------------------


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def runs_of(daemon: DaemonProcess) -> list[RunSummary]:
    try:
        with ControlClient(daemon.control, timeout=1.0) as client:
            return client.runs()
    except ControlClientError:
        return []


@pytest.fixture(scope="module")
def live_run(lrpilot_exe, tmp_path_factory) -> Iterator[tuple[DaemonProcess, str]]:
    """A daemon and a real training attached to it; (daemon, run id)."""
    where = tmp_path_factory.mktemp("top-live")
    daemon = DaemonProcess(lrpilot_exe, where / "state", where / "daemon.log")
    run = f"top-{uuid.uuid4().hex[:8]}"
    training = None
    try:
        daemon.wait_ready()
        with open(where / "train.out", "w") as out:
            training = subprocess.Popen(
                [sys.executable, str(TRAIN), daemon.address, run, "90"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

        def attached() -> bool:
            assert training.poll() is None, (where / "train.out").read_text()
            return any(r.run == run and r.step > 0 for r in runs_of(daemon))

        wait_for(attached, STARTUP_S, "the training to attach", lambda: daemon.log())
        yield daemon, run
    finally:
        if training is not None:
            stop(training)
        stop(daemon.proc)


class Tmux:
    """A private tmux server (its own socket) with one 200x50 session whose
    pane stays after its command exits, so the exit status can be read."""

    def __init__(self, where: Path) -> None:
        tmux = shutil.which("tmux")
        assert tmux, (
            "tmux is not installed: `lrpilot top` is tested in a real terminal; "
            "scripts/test installs it (apt-get install tmux)"
        )
        self.conf = where / "tmux.conf"
        self.conf.write_text("set -g remain-on-exit on\n")
        self.base = [tmux, "-L", f"lrpilot-top-{uuid.uuid4().hex[:8]}", "-f", str(self.conf)]
        self.session = "top"
        # The server's environment is the panes'. pytest exports COLUMNS=80 and
        # LINES=24, which rich would take over the terminal's real size.
        self.env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.started = False
        self.socket: Path | None = None

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=10, env=self.env
        )
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    def start(self, command: str) -> None:
        self.tmux("new-session", "-d", "-s", self.session, "-x", "200", "-y", "50", command)
        self.started = True
        self.socket = Path(self.pane("#{socket_path}"))

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def everything(self) -> str:
        """The screen and the lines scrolled off it (tmux's "Pane is dead"
        line at the bottom can push the first one off)."""
        return self.tmux("capture-pane", "-p", "-S", "-", "-t", self.session)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def pane(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", self.session, fmt).strip()

    def wait_dead(self) -> None:
        """Until the pane's command has exited and tmux has closed its terminal."""
        wait_for(lambda: self.pane("#{pane_dead}") == "1", VIEW_S, "top to exit", self.everything)

    def close(self) -> None:
        if self.started:
            subprocess.run(
                [*self.base, "kill-server"], capture_output=True, timeout=10, env=self.env
            )
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)  # kill-server leaves it behind


@pytest.fixture
def tmux(tmp_path) -> Iterator[Tmux]:
    term = Tmux(tmp_path)
    try:
        yield term
    finally:
        term.close()


def top_command(exe: str, control: str) -> str:
    """`lrpilot top`, then what the terminal looks like after it: `stty`'s
    icanon and echo flags (`-icanon` would mean cbreak mode was left on), and
    top's exit status. (tmux's own #{pane_dead_status} is not used: tmux 3.3a
    sometimes marks the pane dead without ever filling it in.) `trap : INT`
    keeps the shell itself alive through a Ctrl-C."""
    top = shlex.join([exe, "top", "--control", control, "--interval", "0.2", "--timeout", "0.5"])
    after = "stty -a | tr ' ;' '\\n\\n' | grep -E '^-?(icanon|echo)$'"
    script = f'trap : INT; {top}; rc=$?; {after}; echo "top exited: $rc"; exit $rc'
    return f"sh -c {shlex.quote(script)}"


def step_on_screen(screen: str, run: str) -> int | None:
    rows = [line.split() for line in screen.splitlines() if line.split()[:1] == [run]]
    if len(rows) != 1 or len(rows[0]) < 3 or not rows[0][2].isdigit():
        return None
    return int(rows[0][2])


def assert_clean_exit(term: Tmux) -> None:
    term.wait_dead()
    # The shell's last lines; the pane can be dead before tmux has read them.
    status = wait_for(
        lambda: re.findall(r"^top exited: (\d+)$", term.everything(), re.M),
        VIEW_S,
        "top's exit status",
        term.everything,
    )
    assert status == ["0"], term.everything()
    assert term.pane("#{alternate_on}") == "0", term.everything()  # the alternate screen was left
    flags = re.findall(r"^(-?icanon|-?echo)$", term.everything(), re.M)
    assert sorted(flags) == ["echo", "icanon"], term.everything()  # cbreak mode undone
    assert "Traceback" not in term.everything()


def test_top_shows_a_live_run_refreshing_in_place_and_quits_on_q(lrpilot_exe, live_run, tmux):
    daemon, run = live_run
    tmux.start(top_command(lrpilot_exe, daemon.control))
    first = wait_for(lambda: step_on_screen(tmux.screen(), run), VIEW_S, run, tmux.screen)
    wait_for(lambda: (step_on_screen(tmux.screen(), run) or 0) > first, VIEW_S, "the step to move")
    screen = tmux.screen()
    assert screen.count("lrpilot top") == 1, screen  # redrawn in place, not scrolled
    assert f"daemon {daemon.control}" in screen
    assert re.search(r"\b1 run\b", screen), screen
    row = next(line for line in screen.splitlines() if line.split()[:1] == [run])
    assert "active" in row and "plateau" in row and "weight=" in row and "bias=" in row, row
    ranks, lag = row.split()[-2:]
    assert ranks == "1/1" and lag.isdigit(), row  # one rank of one; lag in steps
    # The daemon samples the loss once a second: the sparkline fills in.
    wait_for(
        lambda: re.search(f"{re.escape(run)} .*[{BLOCKS}]{{2,}} ", tmux.screen()),
        VIEW_S,
        "a sparkline of two samples",
        tmux.screen,
    )
    assert tmux.screen().rstrip().endswith("q quit")
    tmux.keys("q")
    assert_clean_exit(tmux)


def test_top_quits_on_ctrl_c(lrpilot_exe, live_run, tmux):
    daemon, run = live_run
    tmux.start(top_command(lrpilot_exe, daemon.control))
    wait_for(lambda: step_on_screen(tmux.screen(), run), VIEW_S, run, tmux.screen)
    tmux.keys("C-c")
    assert_clean_exit(tmux)


def test_top_says_when_the_daemon_does_not_answer_and_picks_it_up(lrpilot_exe, tmux, tmp_path):
    control = free_address()
    tmux.start(top_command(lrpilot_exe, control))
    no_answer = f"no answer from daemon at {control} — retrying"
    wait_for(lambda: no_answer in tmux.screen(), VIEW_S, "the no-answer line", tmux.screen)
    assert tmux.pane("#{pane_dead}") == "0"  # still running, still asking
    daemon = DaemonProcess(
        lrpilot_exe, tmp_path / "state", tmp_path / "daemon.log", control=control
    )
    try:
        daemon.wait_ready()
        wait_for(
            lambda: "no runs" in tmux.screen() and no_answer not in tmux.screen(),
            VIEW_S,
            "the view to pick the daemon up",
            tmux.screen,
        )
    finally:
        stop(daemon.proc)
    tmux.keys("q")
    assert_clean_exit(tmux)


def test_a_run_with_a_silent_rank_says_how_many():
    row = row_of(text_of([summary(ranks=[0, 1, 2], world_size=3, silent=[2])]), "exp-1")
    assert "3/3 1 silent" in row, row
    assert "silent" not in row_of(text_of([summary(ranks=[0, 1], world_size=2)]), "exp-1")
