"""The operator's commands (``lrpilot runs``, ``show``, ``set-lr``, ``policy``,
``pause``, ``resume``, ``history``; ``range-test`` is in range_test.py) and
how their answers read on a terminal.
Each takes the parsed arguments, asks the control plane, and prints either a
table for people or, with ``--json``, the answer for scripts.

Run and group names, hosts, reasons and actors were chosen by whoever talked
to the daemon: every one is printed through ``printable`` (escapes, not
control characters), in tables by ``table`` itself, elsewhere where it is
put in a line. JSON output escapes them already."""

from __future__ import annotations

import argparse
import getpass
import itertools
import json
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lrpilot.keys import find_client_keys
from lrpilot.policies import SpecError, parse_policy
from lrpilot.protocol import REPORT, STEP, LRCommand

from ..control_protocol import MAX_NAME, JournalEntry
from ..service.engine import PolicyEngine, StepGapTooLarge
from ..service.records import read_records
from ..service.schema import DB_NAME, open_readonly
from ..service.sharding import store_dir_of
from .control_client import ControlClient, control_address, printable
from .main import CommandError

# Missing steps a replay steps through (up to ~1 us each): a stream that jumps
# further is one where the daemon took a client's state, not a gap to fill.
REPLAY_MAX_GAP = 10_000_000
PREVIEW_ROWS = 20  # rows of the human-readable preview; --json prints every step
# `show`: journal entries searched for the newest finished range test.
RANGE_TEST_LOOKBACK = 200


def actor() -> str:
    """Who makes a change, as the journal shows it: user@host, within what the
    daemon takes (the user name comes from $LOGNAME or $USER when set)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid with no name, as in some containers
        user = "unknown"
    return printable(f"{user}@{socket.gethostname()}")[:MAX_NAME]


def client(args: argparse.Namespace) -> ControlClient:
    """The control client of a command's --control and --timeout; changes
    are journaled as made by :func:`actor`."""
    keys = find_client_keys(getattr(args, "keys", None))
    return ControlClient(control_address(args.control), args.timeout, actor(), keys)


def lrs_text(lrs: Sequence[float] | None) -> str:
    return "-" if lrs is None else ", ".join(f"{lr:.4g}" for lr in lrs)


def when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[printable(c) for c in headers], *[[printable(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells
    )


def emit(args: argparse.Namespace, answer: Any, text: str) -> None:
    """``text`` for people, or with --json the answer (a model, or a list of
    them) as the daemon sent it."""
    if args.json:
        print(json.dumps(as_json(answer), indent=2))
    else:
        print(text)


def as_json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, list):
        return [as_json(item) for item in value]
    return value


# --- reads -----------------------------------------------------------------


def cmd_runs(args: argparse.Namespace) -> None:
    with client(args) as control:
        runs = control.runs()
    rows = [
        (
            r.run,
            r.status,
            r.step,
            f"{r.steps_per_s:.1f}",
            lrs_text(r.lrs),
            r.policy_kind or "-",
            "held" if r.held else "",
            "-"
            if r.last_change is None
            else f"v{r.last_change.version} @{r.last_change.step}: {r.last_change.reason[:50]}",
        )
        for r in runs
    ]
    text = table(("RUN", "STATUS", "STEP", "STEPS/S", "LR", "POLICY", "", "LAST CHANGE"), rows)
    emit(args, runs, text if runs else "no runs yet")


def cmd_show(args: argparse.Namespace) -> None:
    from .range_test import history_line, sweep_line

    with client(args) as control:
        run = control.show(args.run)
        # A range test: where its sweep is, and the newest finished one's
        # suggestion (looked for further back than the recent changes).
        sweep = sweep_line(run.policy, run.policy_state, run.lrs)
        finished = history_line(run.history)
        if not finished and not args.json and (sweep or run.version > len(run.history)):
            finished = history_line(control.history(args.run, RANGE_TEST_LOOKBACK))
    lines = [
        f"run        {printable(run.run)} ({printable(run.status)}, "
        f"ranks {printable(run.ranks or '-')} of {printable(run.world_size)})",
        *(
            [
                f"attention  silent ranks {printable(run.silent or '-')}; "
                f"left out of decisions {printable(run.left_out or '-')}"
            ]
            if run.silent or run.left_out
            else []
        ),
        f"step       {printable(run.step)} ({run.steps_per_s:.1f} steps/s)",
        f"groups     {printable(', '.join(run.groups))}",
        f"lrs        {lrs_text(run.lrs)}" + ("   HELD by an operator" if run.held else ""),
        f"policy     {json.dumps(run.policy)}",
        *([f"range test {sweep}"] if sweep else []),
        *([f"last range test {finished}"] if finished else []),
        f"requested  {json.dumps(run.requested_policy)}",
        f"version    {printable(run.version)}",
        f"metrics    {json.dumps(run.last_metrics)}",
        f"started    {when(run.created)}",
    ]
    if run.sessions:
        lines += [
            "",
            table(
                (
                    "RANK",
                    "HOST",
                    "PID",
                    "MODE",
                    "STEP",
                    "STEPS/S",
                    "APPLIED",
                    "LATE BY",
                    "DROPPED",
                    "HEARD",
                ),
                [
                    (
                        s.rank,
                        s.host,
                        s.pid,
                        "sync" if s.sync else "async",
                        s.step,
                        f"{s.steps_per_s:.1f}",
                        f"v{s.applied_version}",
                        s.late_by,
                        s.stats.get("records_dropped", 0),
                        f"{s.silent_s:.1f}s ago" + (" LEFT OUT" if s.left_out else ""),
                    )
                    for s in run.sessions
                ],
            ),
        ]
    if run.history:
        lines += ["", "recent changes:", history_table(run.history)]
    emit(args, run, "\n".join(lines))


def history_table(entries: Sequence[JournalEntry]) -> str:
    return table(
        ("VER", "FROM STEP", "APPLIED", "TIME", "OLD -> NEW", "ACTOR", "REASON"),
        [
            (
                f"v{e.version}",
                e.effective_step,
                "-" if e.applied_step is None else e.applied_step,
                when(e.time),
                f"{lrs_text(e.old_lrs)} -> {lrs_text(e.new_lrs)}",
                e.actor,
                e.reason,
            )
            for e in entries
        ],
    )


def cmd_history(args: argparse.Namespace) -> None:
    with client(args) as control:
        entries = control.history(args.run, args.limit)
    nothing = f"no LR changes for {printable(args.run)}"
    emit(args, entries, history_table(entries) if entries else nothing)


# --- changes -----------------------------------------------------------------


def report_change(args: argparse.Namespace, c: LRCommand) -> None:
    emit(
        args,
        c,
        printable(
            f"run {c.run}: v{c.version} from step {c.effective_step}: "
            f"lrs {lrs_text(c.lrs)} ({c.reason})"
        ),
    )


def cmd_set_lr(args: argparse.Namespace) -> None:
    with client(args) as control:
        report_change(args, control.set_lr(args.run, args.lr, args.group))


def cmd_pause(args: argparse.Namespace) -> None:
    with client(args) as control:
        report_change(args, control.pause(args.run))


def cmd_resume(args: argparse.Namespace) -> None:
    with client(args) as control:
        report_change(args, control.resume(args.run))


def cmd_policy(args: argparse.Namespace, policy: dict[str, Any] | None) -> None:
    if args.preview:
        preview(args, policy)
        return
    with client(args) as control:
        report_change(args, control.policy(args.run, policy))


# --- what-if ------------------------------------------------------------------


def open_run_store(args: argparse.Namespace, run_id: str) -> tuple[Any, dict[str, Any]]:
    """The run's store, read-only, and its first base LRs: from --state-dir
    directly (no daemon needed), else where the daemon says its store is."""
    if args.state_dir:
        db = open_readonly(store_dir_of(Path(args.state_dir), run_id) / DB_NAME)
        row = db.execute("SELECT base_lrs FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise CommandError(f"unknown run {run_id!r} in {args.state_dir}")
        return db, {"base_lrs": json.loads(row[0])}
    with client(args) as control:
        path = control.store(run_id)  # also makes the daemon commit what it has
        run = control.show(run_id)
    return open_readonly(Path(path)), {"base_lrs": run.base_lrs}


def replay_run(
    args: argparse.Namespace,
    run_id: str,
    spec: dict[str, Any],
    base_lrs: Sequence[float] | None = None,
) -> Iterator[dict[str, Any]]:
    """What ``spec`` gives on the run's recorded stream, from its step 0: one
    line a step, the LRs after it and its reports. Replayed by the daemon's
    own engine (steps and reports as they came, missing steps stepped
    without metrics), so the preview is what the daemon would have done."""
    db, run = open_run_store(args, run_id)
    try:
        engine = PolicyEngine(
            run_id, parse_policy(spec), base_lrs or run["base_lrs"], max_gap=REPLAY_MAX_GAP
        )
    except SpecError as exc:
        raise CommandError(f"policy: {exc}") from None
    yield engine_line(engine, 0)
    step = 0
    for record_step, kind, values in read_records(db, run_id):
        if kind == STEP and record_step > step:
            if step:
                yield engine_line(engine, step)
            step = record_step
        try:
            (engine.on_report if kind == REPORT else engine.on_step)(record_step, values)
        except StepGapTooLarge:
            raise CommandError(
                f"run {run_id}'s recorded stream jumps from step {engine.step} to {record_step} "
                "(the daemon took the client's state there); a replay cannot step through it"
            ) from None
    if step:
        yield engine_line(engine, step)


def engine_line(engine: PolicyEngine, step: int) -> dict[str, Any]:
    """A replay's output line, as ``lrpilot simulate`` writes one."""
    line: dict[str, Any] = {"step": step, "lrs": engine.lrs}
    momenta = engine.policy.momenta if engine.policy is not None else None
    if momenta is not None:
        line["momenta"] = list(momenta)
    return line


def preview(args: argparse.Namespace, spec: dict[str, Any] | None) -> None:
    if spec is None:
        raise CommandError("--preview needs a policy to try (FILE or -)")
    lines = list(replay_run(args, args.run, spec))
    if args.json:
        for line in lines:
            print(json.dumps(line))
        return
    every = max(1, (len(lines) - 1) // PREVIEW_ROWS)
    changed = [b for a, b in itertools.pairwise(lines) if a["lrs"] != b["lrs"]]
    shown = [line for i, line in enumerate(lines) if i % every == 0 or i == len(lines) - 1]
    print(
        printable(
            f"preview: {spec.get('kind')} replayed on the {len(lines) - 1} recorded steps of "
            f"{args.run} (nothing changed)"
        )
    )
    print(table(("STEP", "LRS"), [(line["step"], lrs_text(line["lrs"])) for line in shown]))
    print(f"{len(changed)} steps change the LR; final lrs {lrs_text(lines[-1]['lrs'])}")
