"""Hostile input to the operator's commands and to the daemon's control plane.

Every field that comes over a socket or a command line is hostile until
checked. Here each bad value gets what the CLI promises: a non-zero exit and
exactly one line on stderr naming the flag or field, and the daemon keeps
serving (`lrpilot runs` answers after every batch):

- numbers a flag cannot mean (nan, inf, 1e308, 0 s, -1 s, '²', 10**30),
  refused by the argparse types in daemon/cli/main.py (exit 2);
- values only the daemon can judge (a param group, a run id), and policies
  too large or with numbers too large, refused before anything changes
  (exit 1);
- the same values sent raw to the control socket, and to
  ``ControlPlane.handle`` directly: ``{"ok": false, "error": one line}``,
  never "internal error";
- text a client chose (run and group names, hosts, reasons, a daemon's
  error) with ANSI escapes, newlines, bidi overrides and rich markup: every
  printer (`runs`, `show`, `history`, `set-lr`, `top`, the error line) shows
  it escaped. A fake control plane sends such text, since a real daemon
  refuses control characters in names at hello (checked too).

One real `lrpilot daemon` and one run (attached in-process to a plain
param-group optimizer) serve the whole module.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq
from procs import (
    DaemonProcess,
    FakeOptimizer,
    control,
    daemon_process,
    lrpilot,
    ok,
    ok_json,
    one_line_error,
    wait_for,
)

from lrpilot import attach
from lrpilot.daemon.cli.control_client import ControlClientError, printable
from lrpilot.daemon.cli.main import build_parser
from lrpilot.daemon.control_protocol import (
    LR_MAX,
    MAX_CONTROL_BYTES,
    MAX_ERROR_CHARS,
    MAX_HISTORY_LIMIT,
    MAX_POLICY_BYTES,
)
from lrpilot.daemon.service.config import DaemonConfig
from lrpilot.daemon.service.control import ControlPlane
from lrpilot.daemon.service.dataplane import DataPlane
from lrpilot.protocol import GroupInfo, Hello, decode, encode

RUN = "input-[bold]run[/]"  # rich markup in a name: shown as typed, never styled
GROUPS = ["body", "head"]
BASE_LRS = [0.1, 0.05]
# A name as a hostile client would choose it: an ANSI colour, a newline, rich
# markup and a right-to-left override; and how every printer must show it.
EVIL = "evil\x1b[31m\n[bold]x\u202e"
EVIL_SHOWN = "evil\\x1b[31m\\x0a[bold]x\\u202e"
TOO_BIG_POLICY = {"kind": "multistep", "milestones": list(range(1, 15_000))}  # ~90 KiB


@pytest.fixture(scope="module")
def daemon(lrpilot_exe, tmp_path_factory) -> Iterator[DaemonProcess]:
    where = tmp_path_factory.mktemp("input-daemon")
    with daemon_process(lrpilot_exe, where / "state", where / "daemon.log") as running:
        pilot = attach(
            FakeOptimizer(
                [{"params": [], "lr": lr, "name": name} for name, lr in zip(GROUPS, BASE_LRS)]
            ),
            run=RUN,
            daemon=running.address,
            sync=True,
            sync_timeout=10,
        )
        try:
            for _ in range(3):
                pilot.step(loss=1.0)
            wait_for(lambda: [r for r in runs(running) if r["run"] == RUN], 10, "the run")
            yield running
        finally:
            pilot.close()


def runs(daemon: DaemonProcess) -> list[dict]:
    return daemon.ask({"op": "runs"})["runs"]


def cli(exe: str, daemon: DaemonProcess, *args: str, stdin: str | None = None):
    return lrpilot(exe, *args, "--control", daemon.control, stdin=stdin)


def state_of(daemon: DaemonProcess) -> tuple:
    """What a refused change must leave as it was."""
    shown = daemon.ask({"op": "show", "run": RUN})["run"]
    return shown["lrs"], shown["version"], shown["held"], shown["policy"]


def serves(daemon: DaemonProcess) -> None:
    """The daemon still answers `lrpilot runs`, and still has the run."""
    assert any(r["run"] == RUN for r in daemon.cli("runs"))


# --- the command line's flags ----------------------------------------------------

BIG_INT = "9" * 31
# The inputs of the issue, through the real console script, against the daemon.
FLAG_CASES = [
    # (argv, command, words the one line must hold)
    (("set-lr", RUN, "1e308"), "set-lr", ["argument LR", "1e-12 to 1000", "1e308"]),
    (("set-lr", RUN, "5e-324"), "set-lr", ["argument LR", "1e-12 to 1000"]),
    (("set-lr", RUN, "nan"), "set-lr", ["argument LR", "nan"]),
    (("runs", "--timeout", "-1"), "runs", ["argument --timeout", "seconds", "-1"]),
    (("runs", "--timeout", "nan"), "runs", ["argument --timeout", "finite"]),
    (("runs", "--timeout", "1e300"), "runs", ["argument --timeout", "3600"]),
    (("top", "--interval", "0"), "top", ["argument --interval", "0.05 to 3600"]),
    (("history", RUN, "--limit", "1e30"), "history", ["argument --limit", "1e30"]),
    (("history", RUN, "--limit", BIG_INT), "history", ["argument --limit", "1 to 1000000"]),
    (("history", RUN, "--limit", "²"), "history", ["argument --limit", "'²'"]),
    (
        ("simulate", "--policy", '{"kind": "step", "step_size": 1}', "--base-lr", "1e308"),
        "simulate",
        ["argument --base-lr", "1e-12 to 1000"],
    ),
]
# Every other number flag, through the CLI's parser in this process (the
# same parser, without a process start per case).
MORE_FLAG_CASES = [
    (("set-lr", RUN, "inf"), "set-lr", ["argument LR", "inf"]),
    (("set-lr", RUN, "1001"), "set-lr", ["argument LR"]),
    (("runs", "--timeout", "0"), "runs", ["argument --timeout"]),
    (("runs", "--timeout", "inf"), "runs", ["argument --timeout"]),
    (("show", RUN, "--timeout", "soon"), "show", ["argument --timeout", "not a number"]),
    (("pause", RUN, "--timeout", "-0.5"), "pause", ["argument --timeout"]),
    (("top", "--interval", "nan"), "top", ["argument --interval"]),
    (("top", "--timeout", "-5"), "top", ["argument --timeout"]),
    (("history", RUN, "--limit", "-3"), "history", ["argument --limit", "from 1"]),
    (("history", RUN, "--limit", "١٢"), "history", ["argument --limit", "not a whole number"]),
    (("history", RUN, "--limit", str(MAX_HISTORY_LIMIT + 1)), "history", ["argument --limit"]),
    (("simulate", "--timeout", "nan", "--from-run", RUN), "simulate", ["argument --timeout"]),
    (("demo", "--steps", BIG_INT), "demo", ["argument --steps", "1000000"]),
    (("demo", "--steps", "0"), "demo", ["argument --steps"]),
    (("daemon", "--silence-timeout", "nan"), "daemon", ["argument --silence-timeout", "finite"]),
    (("daemon", "--metrics-ttl", "inf"), "daemon", ["argument --metrics-ttl"]),
    (("daemon", "--max-message-bytes", "1e400"), "daemon", ["argument --max-message-bytes"]),
    (("daemon", "--command-lead-steps", BIG_INT), "daemon", ["argument --command-lead-steps"]),
    (
        ("dashboards", "push", "--grafana-url", "http://127.0.0.1:9", "--timeout", "-1"),
        "dashboards push",
        ["argument --timeout"],
    ),
]


def test_flags_refuse_numbers_they_cannot_mean_in_one_line(lrpilot_exe, daemon):
    before = state_of(daemon)

    def attempt(case):
        args, command, says = case
        return cli(lrpilot_exe, daemon, *args), command, says

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(attempt, FLAG_CASES))
    for result, command, says in done:
        one_line_error(result, command, *says, status=2)
    assert state_of(daemon) == before
    serves(daemon)


@pytest.mark.parametrize(
    ("args", "command", "says"), MORE_FLAG_CASES, ids=[" ".join(c[0]) for c in MORE_FLAG_CASES]
)
def test_every_number_flag_refuses_what_it_cannot_mean(args, command, says, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(args)  # only parsed: a daemon or a demo never starts
    out, err = capsys.readouterr()
    result = subprocess.CompletedProcess(args, exited.value.code, out, err)
    one_line_error(result, command, *says, status=2)


def test_the_largest_values_the_flags_allow_are_taken(lrpilot_exe, daemon):
    limit = str(MAX_HISTORY_LIMIT)
    assert isinstance(
        ok_json(cli(lrpilot_exe, daemon, "history", RUN, "--limit", limit, "--json")), list
    )
    ok(cli(lrpilot_exe, daemon, "runs", "--timeout", "3600"))


# --- what only the daemon can judge --------------------------------------------------


def test_values_the_daemon_refuses_are_one_line_and_change_nothing(lrpilot_exe, daemon, tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps(TOO_BIG_POLICY))
    assert len(big.read_bytes()) > MAX_POLICY_BYTES
    huge = tmp_path / "huge.json"  # 200 MB (sparse): read no further than 1 MiB
    with open(huge, "wb") as sink:
        sink.truncate(200 << 20)
    before = state_of(daemon)
    cases = [
        (("set-lr", RUN, "0.1", "--group", "²"), "set-lr", ["no param group '²'", "body, head"]),
        (("set-lr", RUN, "0.1", "--group", BIG_INT), "set-lr", ["no param group", BIG_INT]),
        (("set-lr", RUN, "0.1", "--group", "1\x1b[2J"), "set-lr", ["no param group '1\\x1b[2J'"]),
        (("show", "x" * 300), "show", ["bad request: run", "200"]),
        (("policy", RUN, str(big)), "policy", [f"policy {big}", "64 KiB", "bytes"]),
        (("policy", RUN, str(huge)), "policy", [f"policy {huge}", "over 1 MiB"]),
        (("policy", RUN, '{"kind": "cosine", "T_max": 1e30}'), "policy", ["2**53", "1e+30"]),
        (("policy", RUN, '{"kind": "step", "step_size": 1, "gamma": NaN}'), "policy", ["finite"]),
        (("simulate", "--policy", str(big), "--base-lr", "0.1"), "simulate", ["64 KiB"]),
    ]

    def attempt(case):
        args, command, says = case
        return cli(lrpilot_exe, daemon, *args), command, says

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(attempt, cases))
    # Standard input is read no further than 1 MiB either.
    flood = "{" + " " * (2 * MAX_CONTROL_BYTES) + "}"
    done.append((cli(lrpilot_exe, daemon, "policy", RUN, "-", stdin=flood), "policy", ["1 MiB"]))
    nowhere = lrpilot(lrpilot_exe, "runs", "--control", "nonsense")
    done.append((nowhere, "runs", ["--control", "cannot connect", "'nonsense'"]))
    for result, command, says in done:
        one_line_error(result, command, *says, status=1)
    assert state_of(daemon) == before
    serves(daemon)


def test_a_request_over_the_daemons_limit_is_refused_before_it_is_sent(daemon):
    with pytest.raises(ControlClientError, match=f"over the {MAX_CONTROL_BYTES}"):
        control(daemon.control, {"op": "show", "run": "x" * MAX_CONTROL_BYTES})


def with_literal(fields: dict, member: str) -> str:
    """A JSON request with one member as written (NaN, 1e999: json.dumps cannot)."""
    return json.dumps(fields)[:-1] + ", " + member + "}"


HOSTILE: list[tuple[str | bytes, list[str]]] = [
    # (raw request, words its one-line error must hold)
    (json.dumps({"op": "history", "run": RUN, "limit": 10**30}), ["limit", "1000000"]),
    (with_literal({"op": "history", "run": RUN}, '"limit": 1e30'), ["limit"]),
    (json.dumps({"op": "history", "run": RUN, "limit": 0}), ["limit"]),
    (json.dumps({"op": "set_lr", "run": RUN, "lr": 1e308}), ["lr", "1e-12 to 1000"]),
    (json.dumps({"op": "set_lr", "run": RUN, "lr": 5e-324}), ["lr", "1e-12 to 1000"]),
    (with_literal({"op": "set_lr", "run": RUN}, '"lr": NaN'), ["lr", "nan"]),
    (with_literal({"op": "set_lr", "run": RUN}, '"lr": 1e999'), ["lr", "inf"]),
    (json.dumps({"op": "set_lr", "run": RUN, "lr": 0.1, "group": "²"}), ["param group"]),
    (json.dumps({"op": "set_lr", "run": RUN, "lr": 0.1, "group": "9" * 5000}), ["group"]),
    (json.dumps({"op": "set_lr", "run": RUN, "lr": "fast"}), ["lr"]),
    (json.dumps({"op": "policy", "run": RUN, "policy": TOO_BIG_POLICY}), ["policy", "64 KiB"]),
    (
        json.dumps({"op": "policy", "run": RUN, "policy": {"kind": "cosine", "T_max": 10**30}}),
        ["2**53"],
    ),
    # The policy code itself fails on this one (an IndexError in a validator).
    (
        json.dumps(
            {"op": "policy", "run": RUN, "policy": {"kind": "cyclic", "base_lr": [], "max_lr": 0.1}}
        ),
        ["policy"],
    ),
    (json.dumps({"op": "policy", "run": RUN, "policy": [1]}), ["policy"]),
    (json.dumps({"op": "show", "run": "x" * 10_000}), ["run", "200"]),
    (json.dumps({"op": "show", "run": RUN, "actor": "me\x1b[31m"}), ["actor", "control"]),
    (json.dumps({"op": "x" * 10_000}), ["unknown op"]),
    (json.dumps({"op": "runs", "extra": 1}), ["extra", "unknown field"]),
    (json.dumps({"run": RUN}), ["op"]),
    ("[1, 2]", ["JSON object"]),
    (b"\xff not json", ["not JSON"]),
    ("{" * 10_000, ["not JSON"]),
]


def as_bytes(raw: str | bytes) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()


def assert_one_line_refusal(answer: dict, says: list[str]) -> None:
    assert answer["ok"] is False, answer
    error = answer["error"]
    assert isinstance(error, str) and error, answer
    assert "\n" not in error and len(error) <= MAX_ERROR_CHARS, error
    assert "internal error" not in error, error
    for words in says:
        assert words in error, (words, error)


def test_hostile_requests_on_the_socket_get_one_line_and_the_daemon_serves_on(lrpilot_exe, daemon):
    before = state_of(daemon)
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(daemon.control)
        for raw, says in HOSTILE:
            sock.send(as_bytes(raw))
            assert sock.poll(5000), f"no answer to {raw[:80]!r}"
            assert_one_line_refusal(json.loads(sock.recv()), says)
    finally:
        sock.close()
        context.term()
    assert state_of(daemon) == before
    serves(daemon)
    assert "internal error" not in daemon.log()


@pytest.fixture(scope="module")
def plane(tmp_path_factory) -> Iterator[ControlPlane]:
    """A ControlPlane on a DataPlane of its own, with RUN said hello to."""
    data = DataPlane(DaemonConfig(state_dir=tmp_path_factory.mktemp("input-plane")))
    groups = [GroupInfo(name=name, lr=lr) for name, lr in zip(GROUPS, BASE_LRS)]
    data.handle(b"rank0", [encode(Hello(run=RUN, groups=groups))], 0.0)
    assert RUN in data.registry.runs
    yield ControlPlane(data)
    data.close()


@pytest.mark.parametrize(("raw", "says"), HOSTILE, ids=lambda v: str(v)[:40])
def test_control_plane_handle_refuses_hostile_requests_in_one_line(plane, raw, says):
    answer, outgoing = plane.handle(as_bytes(raw))
    assert_one_line_refusal(answer, says)
    assert outgoing == []
    json.dumps(answer)  # what the server sends back


def test_control_plane_handle_refuses_a_request_over_the_limit_unread(plane):
    answer, _ = plane.handle(b" " * (MAX_CONTROL_BYTES + 1))
    assert_one_line_refusal(answer, ["bad request", str(MAX_CONTROL_BYTES)])


def test_control_plane_takes_the_bounds_themselves(plane):
    def ask(**request):
        answer, _ = plane.handle(json.dumps(request).encode())
        assert answer["ok"], answer
        return answer

    ask(op="history", run=RUN, limit=MAX_HISTORY_LIMIT)
    held = ask(op="set_lr", run=RUN, lr=LR_MAX, group="1")["command"]
    assert held["lrs"] == [BASE_LRS[0], LR_MAX]
    ask(op="resume", run=RUN)


# --- printing what a client chose --------------------------------------------------


def test_printable_escapes_what_a_terminal_would_act_on():
    assert printable("run-1 ² é 日本 [bold] ok") == "run-1 ² é 日本 [bold] ok"
    assert printable(EVIL) == EVIL_SHOWN
    assert printable("\x00\t\r\x7f\x9b\u2028\U000e0001") == (
        "\\x00\\x09\\x0d\\x7f\\x9b\\u2028\\U000e0001"
    )
    assert printable("\ud800") == "\\ud800"  # a lone surrogate (JSON allows one)
    assert printable(printable(EVIL)) == EVIL_SHOWN  # escapes are printable
    assert printable(3) == "3"


def evil_answers(daemon: DaemonProcess) -> dict[str, dict]:
    """The real daemon's answers for RUN, after a real change, with every
    name, host, reason and actor replaced by EVIL: what a hostile peer (or a
    store written before names were checked) could make the CLI print."""
    held = daemon.ask({"op": "set_lr", "run": RUN, "lr": 0.01, "actor": "test"})["command"]
    daemon.ask({"op": "resume", "run": RUN, "actor": "test"})
    [summary] = [r for r in runs(daemon) if r["run"] == RUN]
    shown = daemon.ask({"op": "show", "run": RUN})["run"]
    history = daemon.ask({"op": "history", "run": RUN})["history"]
    assert history and shown["sessions"] and summary["last_change"]
    for run in (summary, shown):
        run.update(run=EVIL, groups=[EVIL, "head"])
        run["last_change"].update(reason=EVIL, actor=EVIL)
    for session in shown["sessions"]:
        session["host"] = EVIL
    for entry in [*history, *shown["history"]]:
        entry.update(reason=EVIL, actor=EVIL)
    command = {**held, "run": EVIL, "reason": EVIL, "actor": EVIL}
    return {
        "runs": {"ok": True, "runs": [summary, {**summary, "run": "plain"}]},
        "show": {"ok": True, "run": shown},
        "history": {"ok": True, "history": history},
        "set_lr": {"ok": True, "command": command},
        "pause": {"ok": False, "error": f"refused: {EVIL}"},
    }


class FakeControlPlane:
    """A control socket that answers each op with a canned answer."""

    def __init__(self, answers: dict[str, dict]) -> None:
        self.answers = answers
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.REP)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            if self.sock.poll(50):
                op = json.loads(self.sock.recv()).get("op")
                self.sock.send(json.dumps(self.answers[op]).encode())
        self.sock.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.context.term()


@pytest.fixture(scope="module")
def fake(daemon) -> Iterator[FakeControlPlane]:
    plane = FakeControlPlane(evil_answers(daemon))
    try:
        yield plane
    finally:
        plane.close()


def shown_escaped(text: str) -> None:
    assert EVIL_SHOWN in text, text
    assert not any(c in text for c in "\x1b\u202e"), repr(text)


def test_every_printer_escapes_the_names_a_client_chose(lrpilot_exe, fake):
    def run(*args: str):
        return lrpilot(lrpilot_exe, *args, "--control", fake.address)

    table = ok(run("runs")).splitlines()
    shown_escaped("\n".join(table))
    assert len(table) == 3  # the header, then one line per run: the newline did not split one
    assert table[1].startswith(EVIL_SHOWN + " ")
    show = ok(run("show", "any"))
    shown_escaped(show)
    assert f"groups     {EVIL_SHOWN}, head" in show
    sessions = [line for line in show.splitlines() if line.startswith("0 ")]
    assert len(sessions) == 1 and EVIL_SHOWN in sessions[0]  # the host, on its row
    history = ok(run("history", "any")).splitlines()
    shown_escaped("\n".join(history))
    assert len(history) == 1 + len(fake.answers["history"]["history"])
    report = ok(run("set-lr", "any", "0.01"))
    shown_escaped(report)
    assert report.count("\n") == 1
    frame = ok(run("top"))  # not a terminal: one frame
    shown_escaped(frame)
    assert "[bold]x" in frame  # markup shown as typed
    error = one_line_error(run("pause", "any"), "pause", status=1)
    assert error == f"lrpilot pause: refused: {EVIL_SHOWN}"


def test_a_name_with_markup_from_a_real_hook_is_shown_as_typed(lrpilot_exe, daemon):
    [row] = [
        line
        for line in ok(cli(lrpilot_exe, daemon, "runs")).splitlines()[1:]
        if line.startswith(RUN + " ")
    ]
    assert row.split()[1] == "active"
    frame = ok(cli(lrpilot_exe, daemon, "top"))
    assert RUN in frame


def test_a_hello_with_control_characters_in_its_name_is_refused_or_shown_escaped(
    lrpilot_exe, daemon
):
    """Sent raw, past the hook's own checks: the daemon either refuses the
    name (then no run has it) or takes it, and then `runs` escapes it."""
    hello = {"v": 1, "t": "hello", "run": "evil\x1b[31m", "groups": [{"name": "0", "lr": 0.1}]}
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(daemon.address)
        sock.send(json.dumps(hello).encode())
        assert sock.poll(5000), "no answer to the hello"
        answer = decode(sock.recv_multipart())
    finally:
        sock.close()
        context.term()
    table = ok(cli(lrpilot_exe, daemon, "runs"))
    assert "\x1b" not in table
    if answer.t == "error":
        assert "evil" not in table
    else:
        assert "evil\\x1b[31m" in table
    serves(daemon)
