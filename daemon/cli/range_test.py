"""``lrpilot range-test``: an LR range test on a live run, its suggestion and
its plot.

The command asks the daemon (control op ``range_test``) to switch the run to a
``range_test`` policy (client/policies/range_test.py): the LR climbs from
``--min-lr`` to ``--max-lr`` over ``--steps`` optimizer steps of the real
training, the daemon records the smoothed loss of each step, and the sweep's
end is a decision journaled with the whole curve and the suggested LR. Then
the run's policy follows (from the suggestion, or with ``--suggest-only``
where it stood), or the ``--then`` policy. ``--wait`` polls the journal
until that decision is there and prints it; ``--plot`` draws the curve
(matplotlib, the ``plot`` extra); ``--last`` reads the newest finished range
test of a run's journal without starting one.

Everything printed that a client chose (the run, reasons) goes through
``printable``; ``--json`` prints one JSON document."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrpilot.policies.range_test import MAX_SWEEP_STEPS

from ..control_protocol import MAX_NAME, PRINTABLE, JournalEntry
from .control_client import ControlClient, printable
from .main import (
    TIMEOUT_S,
    CommandError,
    finite_float,
    load_policy_arg,
    lr_value,
    seconds_in,
    whole_number_in,
)

# The wait for the sweep's end: a sweep of the default 100 steps takes
# seconds on most trainings, and minutes on a slow one.
DEFAULT_WAIT_S = 600.0
POLL_S = 0.2  # between two reads of the journal while waiting
# Each request of the command waits at most this for the daemon's answer
# (--timeout is the whole wait; a live daemon answers in milliseconds).
REQUEST_S = 10.0
HISTORY_WINDOW = 64  # journal entries read a poll; more when the window misses the start
CURVE_ROWS = 12  # rows of the curve's summary
PLOT_FORMATS = (".png", ".svg", ".pdf")
PLOT_EXTRA = "pip install 'lrpilot[plot]'"
# The flags that give a field of the sweep, and its name in the policy.
SWEEP_FLAGS = {
    "min_lr": "--min-lr",
    "max_lr": "--max-lr",
    "steps": "--steps",
    "mode": "--mode",
    "metric": "--metric",
    "smoothing": "--smoothing",
    "diverge": "--diverge",
    "suggest": "--suggest",
    "skip_begin": "--skip-begin",
    "skip_end": "--skip-end",
}
NOT_GIVEN = object()  # a flag left out: the kind's default (the daemon's)

DESCRIPTION = """\
Run an LR range test on a live run (Lightning's lr_find, fastai's lr_find),
inside its real training. The daemon switches the run to a range_test policy:
the LR of param group 0 climbs from --min-lr to --max-lr over --steps optimizer
steps (the other groups keep their ratios to it), and the daemon smooths the
loss of each step (--metric, --smoothing) into a curve. The sweep ends after
--steps steps, or early at a step whose smoothed loss is above --diverge times
the best so far, or whose loss is not a finite number. Its end is a decision
journaled with the whole curve and the suggested LR (--suggest: the steepest
fall of the smoothed loss, or the lowest smoothed loss / 10).

After the sweep: without --then, the run's policy follows, started from the
suggestion (a policy switch to it); with --then, that policy, from the
suggestion; with --suggest-only, the run's policy goes back to where it stood
when the sweep began (its base LRs and state) and the suggestion is only
journaled. The training's parameters, its optimizer's state and, with
attach(model=...), the model's buffers are copied when the sweep starts and
put back when it ends (--no-restore keeps the sweep's updates): the sweep
costs its steps and, while it runs, one more copy of those tensors.

This command starts the sweep and prints its command, as `lrpilot policy`
does. --wait then reads the run's journal until the sweep's decision is there
and prints the suggestion and the curve; --plot PATH also draws it (the
smoothed loss against the LR, a red point at the suggestion); --last starts
nothing and reads the newest finished range test in the run's journal (a run
that has ended too). `lrpilot show RUN` says where a sweep is. A run held by
set-lr or pause is refused (resume first), and so is a run in a sweep."""

EPILOG = """\
examples:
  lrpilot range-test digits-mlp --wait
  lrpilot range-test digits-mlp --min-lr 1e-6 --max-lr 1 --steps 200 --plot lr.png
  lrpilot range-test digits-mlp --suggest-only --wait
  lrpilot range-test digits-mlp --then '{"kind": "cosine", "T_max": 5000}' --wait
  lrpilot range-test digits-mlp --last --plot lr.png
(docs/operations.md, "An LR range test on a live run")"""


# --- the command line ---------------------------------------------------------


def metric_name(text: str) -> str:
    if not text or len(text) > MAX_NAME or not re.fullmatch(PRINTABLE, text):
        raise argparse.ArgumentTypeError(
            f"a metric name is 1 to {MAX_NAME} characters with no control characters, "
            f"got {printable(text)!r}"
        )
    return text


def smoothing(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to below 1, got {text}")
    return value


def diverge_factor(text: str) -> float:
    value = finite_float(text)
    if not 1 < value <= 1e6:
        raise argparse.ArgumentTypeError(f"must be a number above 1 (at most 1e6), got {text}")
    return value


def add_range_test_command(commands: argparse._SubParsersAction) -> None:
    """`lrpilot range-test`: register the command and its flags."""
    from .main import add_control_flags

    sub = commands.add_parser(
        "range-test",
        help="run an LR range test on a live run and suggest an LR (--wait, --plot, --last)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("run", metavar="RUN", help="the run id")
    sweep = sub.add_argument_group("the sweep (each defaults to the range_test kind's default)")
    sweep.add_argument(
        "--min-lr",
        type=lr_value,
        default=NOT_GIVEN,
        metavar="LR",
        help="the LR of param group 0 at the sweep's first step, 1e-12 to 1000 (default: 1e-8)",
    )
    sweep.add_argument(
        "--max-lr",
        type=lr_value,
        default=NOT_GIVEN,
        metavar="LR",
        help="the LR at the sweep's last step, above --min-lr, up to 1000 (default: 1)",
    )
    sweep.add_argument(
        "--steps",
        type=whole_number_in(1, MAX_SWEEP_STEPS),
        default=NOT_GIVEN,
        metavar="N",
        help=f"optimizer steps of the sweep, 1 to {MAX_SWEEP_STEPS}: the curve has one point "
        "a step (default: 100)",
    )
    sweep.add_argument(
        "--mode",
        choices=("exponential", "linear"),
        default=NOT_GIVEN,
        help="how the LR climbs: by a constant factor a step (a log scale; default) or by a "
        "constant amount",
    )
    sweep.add_argument(
        "--metric",
        type=metric_name,
        default=NOT_GIVEN,
        metavar="NAME",
        help="the metric of each step (pilot.step(NAME=...)) the curve is made of (default: loss)",
    )
    sweep.add_argument(
        "--smoothing",
        type=smoothing,
        default=NOT_GIVEN,
        metavar="BETA",
        help="the exponential moving average's beta for the loss, 0 (none) to below 1 "
        "(default: 0.98)",
    )
    ends = sweep.add_mutually_exclusive_group()
    ends.add_argument(
        "--diverge",
        type=diverge_factor,
        default=NOT_GIVEN,
        metavar="K",
        help="end the sweep early at a step whose smoothed loss is above K times the best so "
        "far, K above 1 (default: 4)",
    )
    ends.add_argument(
        "--no-diverge",
        dest="diverge",
        action="store_const",
        const=None,
        help="never end early on the loss (a loss that is not a finite number still ends it)",
    )
    sweep.add_argument(
        "--suggest",
        choices=("steepest", "minimum"),
        default=NOT_GIVEN,
        help="steepest: the LR where the smoothed loss falls fastest (Lightning's suggestion; "
        "default); minimum: the LR of the lowest smoothed loss / 10 (fastai's)",
    )
    sweep.add_argument(
        "--skip-begin",
        type=whole_number_in(0, MAX_SWEEP_STEPS),
        default=NOT_GIVEN,
        metavar="N",
        help="steepest: points left out at the curve's start (default: 10)",
    )
    sweep.add_argument(
        "--skip-end",
        type=whole_number_in(0, MAX_SWEEP_STEPS),
        default=NOT_GIVEN,
        metavar="N",
        help="steepest: points left out at the curve's end (default: 1)",
    )
    after = sub.add_argument_group("after the sweep")
    after.add_argument(
        "--then",
        default=None,
        metavar="JSON|@FILE",
        help="the policy that follows the sweep, from the suggested LR: inline JSON, @FILE "
        "(or - for standard input), or null to hold the LRs at the suggestion (default: the "
        "run's policy now)",
    )
    after.add_argument(
        "--suggest-only",
        action="store_true",
        help="only suggest: after the sweep the run's policy goes on from where it stood when "
        "the sweep began (its base LRs and state), not from the suggestion",
    )
    after.add_argument(
        "--no-restore",
        dest="restore",
        action="store_false",
        default=True,
        help="keep what the sweep's steps did to the parameters (default: the hook puts the "
        "parameters, the optimizer's state and attach(model=...)'s buffers back when the "
        "sweep ends)",
    )
    out = sub.add_argument_group("waiting and reading")
    out.add_argument(
        "--wait",
        action="store_true",
        help="after starting the sweep, read the run's journal until its decision is there "
        "(at most --timeout seconds); print the suggestion and the curve",
    )
    out.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help="draw the curve (smoothed loss against LR, log LR axis for an exponential sweep, "
        "a red point at the suggestion) into PATH (.png, .svg or .pdf); implies --wait; "
        f"needs matplotlib: {PLOT_EXTRA}",
    )
    out.add_argument(
        "--last",
        action="store_true",
        help="start nothing: print (and --plot) the newest finished range test in the run's "
        "journal; works on a run that has ended",
    )
    add_control_flags(sub, timeout=False)
    out.add_argument(
        "--timeout",
        type=seconds_in(*TIMEOUT_S),
        metavar="SECONDS",
        default=DEFAULT_WAIT_S,
        help=f"seconds to wait, {TIMEOUT_S[0]:g} to {TIMEOUT_S[1]:g}: for the sweep's end with "
        f"--wait, and at most {REQUEST_S:g} of them for each answer of the daemon "
        f"(default: {DEFAULT_WAIT_S:g})",
    )
    sub.set_defaults(func=cmd_range_test, check=lambda args: check_args(sub, args))


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep's fields the flags gave."""
    return {
        field: getattr(args, field)
        for field in SWEEP_FLAGS
        if getattr(args, field) is not NOT_GIVEN
    }


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What no single flag can check: flags that go together or do not
    (exit 2, one line, before anything is sent)."""
    sweep = given(args)
    if args.last:
        starting = [SWEEP_FLAGS[field] for field in sweep] + [
            flag
            for flag, on in (
                ("--then", args.then is not None),
                ("--suggest-only", args.suggest_only),
                ("--no-restore", not args.restore),
                ("--wait", args.wait),
            )
            if on
        ]
        if starting:
            parser.error(
                f"--last starts nothing and reads a finished range test; {starting[0]} is for "
                "a range test to start"
            )
    if args.suggest_only and args.then is not None:
        parser.error(
            "--suggest-only goes back to the run's policy where it stood; --then switches to "
            "another: give one"
        )
    low, high = sweep.get("min_lr", 1e-8), sweep.get("max_lr", 1.0)
    if high <= low:
        parser.error(f"--max-lr ({high:g}) must be above --min-lr ({low:g})")
    if args.plot is not None:
        if args.plot.suffix.lower() not in PLOT_FORMATS:
            parser.error(
                f"--plot: PATH must end in {', '.join(PLOT_FORMATS)}, got {printable(args.plot)}"
            )
        if not args.plot.parent.is_dir():
            parser.error(f"--plot: no directory {printable(args.plot.parent)} to write into")
        try:
            import matplotlib  # noqa: F401 - only whether it is there
        except ImportError:  # before the sweep starts, not once it has ended
            parser.error(
                f"--plot needs matplotlib, which comes with lrpilot's plot extra: {PLOT_EXTRA}"
            )


def then_arg(text: str) -> dict[str, Any] | None:
    """--then: inline JSON, @FILE, - or null."""
    if text.strip() == "null":
        return None
    if text.startswith("@"):
        return load_policy_arg(text[1:], "--then")
    return load_policy_arg(text, "--then")


# --- the command ----------------------------------------------------------------


@dataclass
class Finished:
    """A finished range test as the journal has it: the decision that ended
    the sweep (its policy_state holds the curve) and the spec it ran."""

    run: str
    decision: JournalEntry
    spec: dict[str, Any] | None

    @property
    def state(self) -> dict[str, Any]:
        return self.decision.policy_state or {}

    @property
    def lrs(self) -> list[float]:
        return list(self.state.get("curve_lrs") or [])

    @property
    def losses(self) -> list[float]:
        return list(self.state.get("curve_losses") or [])

    @property
    def suggested(self) -> float | None:
        value = self.state.get("suggested_lr")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def rule(self) -> str:
        """How the suggestion was made, from the decision's reason."""
        found = re.search(r" by (.+?) after \d+ step", self.decision.reason)
        if found:
            return found.group(1).removeprefix("the ")
        if self.spec is not None and self.spec.get("suggest") == "minimum":
            return "lowest smoothed loss / 10"
        return "steepest fall of the smoothed loss"

    @property
    def early(self) -> str | None:
        """Why the sweep ended early, or None when it ran its steps."""
        if not self.state.get("stopped_early"):
            return None
        found = re.search(r"\(ended early: (.+?)\)(;|$)", self.decision.reason)
        return found.group(1) if found else "yes"

    @property
    def log_scale(self) -> bool:
        if self.spec is not None:
            return self.spec.get("mode", "exponential") == "exponential"
        lrs = [lr for lr in self.lrs if lr > 0]
        return bool(lrs) and max(lrs) / min(lrs) > 100

    def as_json(self, command: Any = None, plot: Path | None = None) -> dict[str, Any]:
        return {
            "run": self.run,
            "command": command.model_dump() if command is not None else None,
            "decision": self.decision.model_dump(),
            "spec": self.spec,
            "suggested_lr": self.suggested,
            "rule": self.rule if self.suggested is not None else None,
            "points": len(self.lrs),
            "ended_early": self.early is not None,
            "early": self.early,
            "curve": {"lrs": self.lrs, "losses": self.losses},
            "plot": str(plot) if plot is not None else None,
        }


def cmd_range_test(args: argparse.Namespace) -> None:
    from .operations import client, report_change

    args.wait = args.wait or args.plot is not None
    then = then_arg(args.then) if args.then is not None else NOT_GIVEN
    deadline = time.monotonic() + args.timeout
    args.timeout = min(args.timeout, REQUEST_S)  # each request's (client() reads it)
    with client(args) as control:
        if args.last:
            found = last_range_test(control, args.run)
            show_finished(args, found)
            return
        sweep = given(args)
        if then is not NOT_GIVEN:
            sweep["then"] = then
        if not args.restore:
            sweep["restore"] = False
        command = control.range_test(args.run, sweep, args.suggest_only)
        if not args.wait:
            report_change(args, command)
            return
        if not args.json:
            report_change(args, command)
            sys.stdout.flush()
        found = wait_for_decision(control, args.run, command, deadline)
    show_finished(args, found, command)


def is_decision(entry: JournalEntry) -> bool:
    """Whether a journal entry is the decision that ended a range test's sweep."""
    state = entry.policy_state
    return (
        isinstance(state, dict)
        and state.get("phase") == "done"
        and "curve_lrs" in state
        and entry.reason.startswith("range_test:")
    )


def wait_for_decision(control: ControlClient, run: str, command: Any, deadline: float) -> Finished:
    """The decision that ends the sweep ``command`` started, from the run's
    journal, polled until ``deadline``."""
    spec = command.policy
    window, checked = HISTORY_WINDOW, 0.0
    while True:
        entries = control.history(run, window)
        after = [e for e in entries if e.version > command.version]
        for entry in after:
            if is_decision(entry):
                return Finished(run, entry, spec)
            if entry.policy is not None or entry.actor == "daemon":
                raise CommandError(
                    f"run {run}'s range test (v{command.version}) was replaced before its "
                    f"sweep ended: v{entry.version} ({entry.reason})"
                )
        if len(entries) >= window and entries[0].version > command.version + 1:
            window *= 4  # the window does not reach back to the start: read more
            continue
        now = time.monotonic()
        if now - checked > 2.0:
            checked = now
            detail = control.show(run)
            if detail.status == "ended":
                raise CommandError(
                    f"run {run} ended (no connected rank) before its range test's sweep did; "
                    f"`lrpilot range-test {run} --last` reads it if it finished"
                )
        if now > deadline:
            raise CommandError(
                f"run {run}: no range test decision in the journal after {command.version} "
                f"within the wait ({where_it_is(control, run)}); `lrpilot range-test {run} "
                "--last` reads it once it ends"
            )
        time.sleep(POLL_S)


def where_it_is(control: ControlClient, run: str) -> str:
    detail = control.show(run)
    return sweep_line(detail.policy, detail.policy_state, detail.lrs) or "not sweeping"


def last_range_test(control: ControlClient, run: str) -> Finished:
    """The newest finished range test in the run's journal, and the spec of
    the switch that started it (the run's policy if the script started it)."""
    entries = control.history(run)
    for i in range(len(entries) - 1, -1, -1):
        if is_decision(entries[i]):
            spec = next(
                (
                    e.policy
                    for e in reversed(entries[:i])
                    if e.policy is not None and e.policy.get("kind") == "range_test"
                ),
                None,
            )
            if spec is None:
                policy = control.show(run).policy
                spec = policy if policy is not None and policy.get("kind") == "range_test" else None
            return Finished(run, entries[i], spec)
    raise CommandError(
        f"run {run}'s journal has no finished range test (`lrpilot range-test {run}` starts one)"
    )


# --- what it prints -----------------------------------------------------------


def suggestion_line(found: Finished) -> str:
    """``suggested lr 3.2e-03 (steepest fall of the smoothed loss), 100
    points, ended early: no``."""
    early = "no" if found.early is None else f"yes ({found.early})"
    points = f"{len(found.lrs)} point{'s' if len(found.lrs) != 1 else ''}"
    if found.suggested is None:
        return f"no suggestion, {points}, ended early: {early}"
    return f"suggested lr {found.suggested:.1e} ({found.rule}), {points}, ended early: {early}"


def curve_rows(found: Finished) -> list[int]:
    """The points the summary shows: evenly spread, the lowest loss and the
    one nearest the suggestion included."""
    lrs, losses = found.lrs, found.losses
    n = len(lrs)
    if n == 0:
        return []
    rows = {round(i * (n - 1) / (CURVE_ROWS - 1)) for i in range(CURVE_ROWS)} if n > 1 else {0}
    rows.add(min(range(n), key=lambda i: losses[i]))
    near = nearest(found)
    if near is not None:
        rows.add(near)
    return sorted(rows)


def nearest(found: Finished) -> int | None:
    """The curve's point nearest the suggestion (on a log scale)."""
    suggested, lrs = found.suggested, found.lrs
    if suggested is None or not lrs:
        return None
    return min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / suggested)))


def summary_text(found: Finished) -> str:
    from .operations import table, when

    d = found.decision
    spec = found.spec or {}
    head = (
        f"run {found.run}: range test ended at v{d.version} (from step {d.effective_step}, "
        f"{when(d.time)})"
    )
    lines = [printable(head), suggestion_line(found)]
    lrs, losses = found.lrs, found.losses
    if lrs:
        low = min(range(len(lrs)), key=lambda i: losses[i])
        mode = spec.get("mode", "exponential" if found.log_scale else "linear")
        metric = spec.get("metric", "loss")
        lines.append(
            f"curve: lr {lrs[0]:.3g} to {lrs[-1]:.3g} ({mode}); smoothed {metric}"
            f" {losses[0]:.4g} at the start, lowest {losses[low]:.4g} at lr {lrs[low]:.3g}, "
            f"{losses[-1]:.4g} at the end"
        )
        near = nearest(found)
        marks = (
            {near: "<- suggestion", low: "lowest"}
            if near != low
            else {low: "<- suggestion, lowest"}
        )
        lines.append(
            table(
                ("POINT", "LR", "SMOOTHED LOSS", ""),
                [
                    (i + 1, f"{lrs[i]:.3e}", f"{losses[i]:.5g}", marks.get(i, ""))
                    for i in curve_rows(found)
                ],
            )
        )
    lines.append(printable(f"after: {after_text(spec, d)}"))
    return "\n".join(lines)


def after_text(spec: dict[str, Any], decision: JournalEntry) -> str:
    """What followed the sweep, as the spec and the decision say."""
    then = spec.get("then")
    kind = then.get("kind") if isinstance(then, dict) else None
    lrs = ", ".join(f"{lr:.4g}" for lr in decision.new_lrs)
    if spec.get("suggest_only"):
        what = f"{kind} back where it stood" if kind else "the LRs of before the sweep"
        return f"{what} (suggest only); lrs {lrs}"
    start = "the base LRs" if "from the base LRs" in decision.reason else "the suggestion"
    what = f"{kind} from {start}" if kind else f"the LRs held at {start}"
    return f"{what}; lrs {lrs}"


def show_finished(args: argparse.Namespace, found: Finished, command: Any = None) -> None:
    if args.plot is not None:
        plot(found, args.plot)
    if args.json:
        print(json.dumps(found.as_json(command, args.plot), indent=2))
        return
    print(summary_text(found))
    if args.plot is not None:
        print(printable(f"plot: {args.plot}"))


def sweep_line(
    policy: dict[str, Any] | None, state: dict[str, Any] | None, lrs: Sequence[float]
) -> str:
    """Where a run's range test is, for `lrpilot show`: ``sweeping, step
    37/100, lr 2.1e-04`` or ``done, suggested lr 3.2e-03, then cosine``;
    empty when its policy is no range test."""
    if policy is None or policy.get("kind") != "range_test" or not isinstance(state, dict):
        return ""
    if state.get("phase") == "sweep":
        lr = f", lr {lrs[0]:.1e}" if lrs else ""
        return f"sweeping, step {state.get('sweep_step')}/{policy.get('steps')}{lr}"
    suggested = state.get("suggested_lr")
    said = (
        f"suggested lr {suggested:.1e}" if isinstance(suggested, (int, float)) else "no suggestion"
    )
    then = policy.get("then")
    kind = then.get("kind") if isinstance(then, dict) else None
    if policy.get("suggest_only"):
        after = f"{kind} back where it stood" if kind else "the LRs of before back"
    else:
        after = kind or "the LRs held"
    return f"done, {said}, then {after}"


def history_line(entries: Sequence[JournalEntry]) -> str:
    """The newest finished range test among ``entries``, for `lrpilot show`."""
    for entry in reversed(entries):
        if is_decision(entry):
            found = Finished("", entry, None)
            return f"v{entry.version} from step {entry.effective_step}: {suggestion_line(found)}"
    return ""


# --- the plot -------------------------------------------------------------------


def plot(found: Finished, path: Path) -> None:
    """The curve as Lightning's ``lr_finder.plot(suggest=True)`` draws it:
    the smoothed loss against the LR (a log axis for an exponential sweep),
    a red point at the suggestion; titled with the run."""
    lrs, losses = found.lrs, found.losses
    if not lrs:
        raise CommandError(f"run {found.run}'s range test has no point to plot (no suggestion)")
    try:
        import matplotlib
    except ModuleNotFoundError:  # checked before the sweep started; gone since?
        raise CommandError(f"--plot needs matplotlib: {PLOT_EXTRA}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        ax.plot(lrs, losses)
        if found.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        metric = (found.spec or {}).get("metric", "loss")
        ax.set_ylabel(f"Smoothed {metric}")
        near = nearest(found)
        if near is not None and found.suggested is not None:
            if math.isclose(lrs[near], found.suggested, rel_tol=1e-9):
                ax.plot(lrs[near], losses[near], markersize=10, marker="o", color="red")
            else:  # lowest / 10: no point of the curve
                ax.axvline(found.suggested, color="red", linestyle="--", linewidth=1)
            ax.legend(
                [f"smoothed {metric}", f"suggested lr {found.suggested:.2e}"], loc="upper left"
            )
        d = found.decision
        ax.set_title(
            printable(f"LR range test: {found.run} (v{d.version}, step {d.effective_step})")
        )
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        try:
            fig.savefig(path, format=path.suffix.lower().lstrip("."))
        except OSError as exc:
            raise CommandError(f"--plot {path}: cannot write: {exc.strerror}") from None
    finally:
        plt.close(fig)
