"""``lrpilot top``: a live terminal view of every run the daemon knows.

Every ``--interval`` seconds the view asks the control plane for ``runs`` and
redraws in place (rich's alternate screen): step, steps/s, the loss with a
sparkline of its last samples, the LR of each param group, the policy (and
HELD while an operator holds the LRs), the last change with its reason and
who made it, ranks connected out of the world size, and how many steps late
the last command landed. ``q`` or Ctrl-C quits (exit 0, terminal restored).
When the daemon does not answer within ``--timeout``, the view says so and
keeps asking.

The drawing is one pure function, :func:`render`, so it is tested without a
terminal; :func:`main` only asks, reads keys and hands ``render`` the answer.
Everything it draws from an answer goes through ``printable`` (control
characters as escapes) into a rich ``Text``, which rich never reads as markup:
a run named ``[bold]`` or ``\x1b[2J`` is shown as those characters.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import zmq
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lrpilot.keys import ClientKeys, find_client_keys

from ..control_protocol import LastChange, RunsAnswer, RunSummary
from .control_client import ControlClient, ControlClientError, control_address, printable

BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 24  # loss samples shown (the daemon samples once a second)
REASON_WIDTH = 60  # characters of a change's reason before it is cut
COLUMNS = (
    "RUN",
    "STATUS",
    "STEP",
    "STEPS/S",
    "LOSS",
    "LR",
    "POLICY",
    "LAST CHANGE",
    "RANKS",
    "LAG",
)
MAX_GROUPS_SHOWN = 4  # LR column: groups named before "+N more"
QUIT_KEYS = b"qQ"
QUIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RUNS = {"op": "runs"}


# --- drawing -----------------------------------------------------------------


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """The last ``width`` values as block characters, lowest ▁ to highest █
    (a flat series is all ▄); a value that is not a finite number is a space."""
    tail = list(values)[-width:]
    finite = [v for v in tail if _finite(v)]
    if not finite:
        return " " * len(tail)
    lo, hi = min(finite), max(finite)
    top = len(BLOCKS) - 1
    out = []
    for v in tail:
        if not _finite(v):
            out.append(" ")
        elif hi == lo:
            out.append(BLOCKS[top // 2])
        else:
            out.append(BLOCKS[round((v - lo) / (hi - lo) * top)])
    return "".join(out)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, spec: str = ".4g") -> str:
    return format(value, spec) if _finite(value) else "-"


def lrs_cell(groups: Sequence[Any] | None, lrs: Sequence[Any] | None) -> str:
    """``body=0.1 head=0.01``; a single group shows its value alone."""
    lrs = list(lrs or [])
    names = [printable(g) for g in (groups or [])]
    if not lrs:
        return "-"
    if len(lrs) == 1:
        return _num(lrs[0])
    names += [str(i) for i in range(len(names), len(lrs))]
    shown = [f"{n}={_num(lr)}" for n, lr in zip(names, lrs)][:MAX_GROUPS_SHOWN]
    more = len(lrs) - len(shown)
    return " ".join(shown) + (f" +{more} more" if more > 0 else "")


def change_cell(change: LastChange | None) -> str:
    """``v3 @120 policy: plateau ...``: version, step, actor, reason."""
    if change is None:
        return "-"
    reason = printable(change.reason)
    if len(reason) > REASON_WIDTH:
        reason = reason[: REASON_WIDTH - 1] + "…"
    return f"v{change.version} @{change.step} {printable(change.actor)}: {reason}"


def loss_cell(history: Sequence[Any] | None) -> Text:
    history = list(history or [])
    if not history:
        return Text("-", style="dim")
    return Text.assemble((sparkline(history), "cyan"), " ", _num(history[-1]))


def ranks_cell(run: RunSummary) -> Text:
    """``2/2``, and how many of them are silent (killed, hung) in red."""
    cell = Text(f"{len(run.ranks)}/{run.world_size}")
    if run.silent:
        cell.append(f" {len(run.silent)} silent", style="bold red")
    return cell


def run_row(run: RunSummary) -> list[RenderableType]:
    """One row; every cell a Text (a str cell would be read as rich markup)."""
    policy = Text(printable(run.policy_kind or "-"))
    if run.held:
        policy.append(" HELD", style="bold yellow")
    return [
        Text(printable(run.run), style="bold"),
        Text(run.status, style="green" if run.status == "active" else "dim"),
        Text(str(run.step)),
        Text(_num(run.steps_per_s, ".1f")),
        loss_cell(run.loss_history),
        Text(lrs_cell(run.groups, run.lrs)),
        policy,
        Text(change_cell(run.last_change), no_wrap=True, overflow="ellipsis"),
        ranks_cell(run),
        Text(str(run.lag_steps)),
    ]


def render(runs: list[RunSummary], address: str, error: str | None, now: float) -> RenderableType:
    """The whole view for one moment: header, the error line (when the daemon
    did not answer), one row per run (or "no runs"), footer. ``runs`` are the
    control plane's ``runs`` summaries; ``now`` is wall-clock seconds."""
    count = f"{len(runs)} run" + ("" if len(runs) == 1 else "s")
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    parts: list[RenderableType] = [
        Text.assemble(("lrpilot top", "bold"), f"  daemon {printable(address)}  {clock}  {count}")
    ]
    if error:
        parts.append(Text(printable(error), style="bold red"))
    if runs:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
        right = {"STEP", "STEPS/S", "RANKS", "LAG"}
        for name in COLUMNS:
            # One line per run. When the terminal is too narrow, LAST CHANGE
            # (the only column rich may shrink first) ends in "…".
            table.add_column(
                name,
                justify="right" if name in right else "left",
                no_wrap=name != "LAST CHANGE",
                overflow="ellipsis",
            )
        for run in runs:
            table.add_row(*run_row(run))
        parts.append(table)
    elif not error:
        parts.append(Text("no runs (none has attached to this daemon yet)", style="dim"))
    parts.append(Text("q quit", style="dim"))
    return Group(*parts)


# --- asking the daemon ---------------------------------------------------------


def runs_from(client: ControlClient) -> tuple[list[RunSummary] | None, str | None]:
    """The runs of the answer the client's socket has, or why there are none."""
    try:
        return client.read(RunsAnswer, client.receive()).runs, None
    except ControlClientError as exc:
        return None, f"daemon at {client.address}: {exc} — retrying"


# --- the terminal ----------------------------------------------------------------


@contextlib.contextmanager
def keys_mode(stdin: Any) -> Iterator[int | None]:
    """Cbreak mode on a terminal (keys arrive one by one, unechoed; Ctrl-C
    still interrupts), restored on the way out. Yields the fd to read keys
    from, or None when stdin is not a terminal (then only Ctrl-C quits)."""
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):
        yield None
        return
    if not os.isatty(fd):
        yield None
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def interrupt_pipe() -> Iterator[int]:
    """SIGINT (Ctrl-C) and SIGTERM wake the loop through a pipe instead of
    raising anywhere: the loop reads the signal's number from the pipe and
    ends the normal way, so the terminal is always put back (and a second
    Ctrl-C changes nothing)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in QUIT_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_end)
    try:
        yield read_end
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(read_end)
        os.close(write_end)


def run_view(
    console: Console,
    address: str,
    interval: float,
    timeout: float,
    key_fd: int | None,
    wake_fd: int,
    keys: ClientKeys | None = None,
) -> None:
    asker = ControlClient(address, timeout, keys=keys)
    runs: list[RunSummary] = []
    error: str | None = None
    sent_at: float | None = None  # monotonic time of the request in flight
    next_ask = time.monotonic()
    try:
        with Live(
            render(runs, address, error, time.time()),
            console=console,
            screen=True,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        ) as live:
            while True:
                now = time.monotonic()
                if sent_at is None and now >= next_ask:
                    asker.send(RUNS)
                    sent_at = now
                wait = (sent_at + timeout if sent_at is not None else next_ask) - now
                poller = zmq.Poller()
                poller.register(wake_fd, zmq.POLLIN)
                if key_fd is not None:
                    poller.register(key_fd, zmq.POLLIN)
                if sent_at is not None and asker.socket is not None:
                    poller.register(asker.socket, zmq.POLLIN)
                # Wake at least once a second so the clock in the header moves.
                ready = dict(poller.poll(int(max(0, min(wait, 1.0)) * 1000)))
                if wake_fd in ready and any(n in QUIT_SIGNALS for n in os.read(wake_fd, 64)):
                    return  # Ctrl-C or SIGTERM
                if key_fd is not None and key_fd in ready:
                    typed = os.read(key_fd, 1024)
                    if not typed:
                        key_fd = None  # end of input: Ctrl-C still quits
                    elif any(k in QUIT_KEYS for k in typed):
                        return
                now = time.monotonic()
                if asker.socket is not None and asker.socket in ready:
                    got, error = runs_from(asker)
                    if got is not None:
                        runs = got
                    assert sent_at is not None  # the socket is polled only while an ask is out
                    next_ask = sent_at + interval
                    sent_at = None
                elif sent_at is not None and now >= sent_at + timeout:
                    error = f"no answer from daemon at {address} — retrying"
                    asker.reset()
                    sent_at, next_ask = None, now + min(interval, 1.0)
                live.update(render(runs, address, error, time.time()), refresh=True)
    finally:
        asker.close()


def main(args: argparse.Namespace) -> None:
    """``lrpilot top``: runs until q or Ctrl-C, then returns (exit 0)."""
    address = control_address(args.control)
    keys = find_client_keys(getattr(args, "keys", None))
    interval = max(0.05, float(args.interval))
    timeout = max(0.05, float(args.timeout))
    if not sys.stdout.isatty():
        # Piped (`lrpilot top | less`, a cron job): one frame, no live view.
        with ControlClient(address, timeout, keys=keys) as client:
            runs = client.runs()
        Console(width=160).print(render(runs, address, None, time.time()))
        return
    try:
        with interrupt_pipe() as wake_fd, keys_mode(sys.stdin) as key_fd:
            run_view(Console(), address, interval, timeout, key_fd, wake_fd, keys)
    except KeyboardInterrupt:  # Ctrl-C before the pipe was in place
        pass
