"""The ``lrpilot`` command line: flags map onto functions, nothing more.

Exit status: 0 on success, 1 when the input is bad (one line on stderr naming
the line or field), 2 when the command line itself is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lrpilot import __version__
from lrpilot.errors import LRPilotError

from ..control_protocol import (
    LR_RULE,
    MAX_CONTROL_BYTES,
    MAX_HISTORY_LIMIT,
    MAX_POLICY_BYTES,
    ascii_decimal,
    lr_allowed,
    policy_problem,
)
from .control_client import printable

# A training node's `pip install lrpilot` gets the hook's dependencies only
# (pyzmq, pydantic); the daemon's and the demo's come with an extra, named
# when a command needs one that is missing.
EXTRA_OF = {
    "prometheus_client": "daemon",
    "grafana_client": "daemon",
    "rich": "daemon",
    "torch": "demo",
    "sklearn": "demo",
    "matplotlib": "plot",
}


class CommandError(LRPilotError):
    """A user-facing error: printed as one line, exit status 1."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we promise one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {printable(message)} (see --help)\n")


# --- what a flag may be ---------------------------------------------------------
# Every number typed on the command line goes through one of these: float()
# alone takes nan, inf and 1e308, int() takes '١٢' and 10**4000, and each of
# those hung, crashed or flooded something downstream.

# Seconds to wait for the daemon: ZeroMQ waits in whole milliseconds, and a
# daemon that is alive answers in far less than an hour.
TIMEOUT_S = (0.001, 3600.0)
# Seconds between two frames of `lrpilot top`: more than 20 a second only burns CPU.
INTERVAL_S = (0.05, 3600.0)
MAX_DEMO_STEPS = 1_000_000  # `demo --steps`: hours of the demo's MLP (1500 by default)


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def finite_float(text: str) -> float:
    """A number, as float() reads it, but never nan or infinite."""
    value = number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def whole_number(text: str, rule: str = "must have at most 18 digits") -> int:
    """A whole number in ASCII digits (int() also reads '١٢'), with an
    optional minus, of at most 18 digits (an int64); ``rule`` says what a
    longer one breaks."""
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    value = ascii_decimal(digits)
    if value is None:
        raise argparse.ArgumentTypeError(f"{rule}, got {text}")
    return -value if text.startswith("-") else value


def whole_number_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        rule = f"must be from {low} to {high}"
        value = whole_number(text, rule)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    return parse


def seconds_in(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = finite_float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be a number of seconds from {low:g} to {high:g}, got {text}"
            )
        return value

    return parse


def lr_value(text: str) -> float:
    """An LR a user may give, in the bounds the daemon takes (daemon/service/control.py)."""
    value = number(text)
    if not lr_allowed(value):
        raise argparse.ArgumentTypeError(f"{LR_RULE}, got {text}")
    return value


def load_policy_arg(text: str, source: str = "--policy") -> dict:
    """A policy is a JSON file, ``-`` for standard input, or the JSON itself
    when it starts with ``{``; refused here when the daemon would refuse it
    for its size or its numbers (MAX_POLICY_BYTES, 2**53)."""
    if text.lstrip().startswith("{"):
        raw = text
    elif text == "-":
        raw = sys.stdin.read(MAX_CONTROL_BYTES + 1)
    else:
        source = f"{source} {text}"
        raw = read_policy_file(text, source)
    if len(raw) > MAX_CONTROL_BYTES:
        raise CommandError(
            f"{source}: over {MAX_CONTROL_BYTES >> 20} MiB of text (a policy "
            f"must be at most {MAX_POLICY_BYTES >> 10} KiB of JSON)"
        )
    try:
        policy = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{source}: invalid JSON: {exc.msg} (line {exc.lineno})") from None
    except RecursionError:
        raise CommandError(f"{source}: invalid JSON: nested too deeply") from None
    if not isinstance(policy, dict):
        raise CommandError(
            f"{source}: a policy is a JSON object with a 'kind', got {raw.strip()[:20]!r}"
        )
    problem = policy_problem(policy)
    if problem:
        raise CommandError(f"{source}: {problem}")
    return policy


def read_policy_file(path: str, source: str) -> str:
    """The file's text, read no further than what a policy can be (a FIFO or
    /dev/zero would otherwise be read for ever)."""
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read(MAX_CONTROL_BYTES + 1)
    except OSError as exc:
        raise CommandError(f"{source}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise CommandError(f"{source}: not UTF-8 text: {exc.reason}") from None


def cmd_simulate(args: argparse.Namespace) -> None:
    from lrpilot.policies import SpecError, parse_policy

    from .simulate import ReplayError, run

    spec = load_policy_arg(args.policy)
    if args.from_run:
        if args.input != "-":
            raise CommandError("--input and --from-run are two sources; give one")
        from .operations import replay_run

        for line in replay_run(args, args.from_run, spec, args.base_lr):
            if line["step"]:
                print(json.dumps(line))
        return
    try:
        policy = parse_policy(spec).build(args.base_lr)
    except SpecError as exc:
        raise CommandError(f"--policy: {exc}") from None
    if args.input == "-":
        stream, flush_each = sys.stdin, True
    else:
        try:
            stream, flush_each = open(args.input), False  # noqa: SIM115
        except OSError as exc:
            raise CommandError(f"--input {args.input}: cannot read: {exc.strerror}") from None
    with stream:
        try:
            run(policy, stream, sys.stdout, flush_each=flush_each)
        except ReplayError as exc:
            raise CommandError(str(exc)) from None
        except UnicodeDecodeError as exc:
            raise CommandError(f"--input: not UTF-8 text: {exc.reason}") from None


def cmd_daemon(args: argparse.Namespace) -> None:
    import logging

    from pydantic import ValidationError

    from lrpilot.policies import describe

    from ..service.config import DaemonConfig
    from ..service.server import Daemon, DaemonError

    fields = DaemonConfig.model_fields
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    try:
        config = DaemonConfig(**given)
    except ValidationError as exc:
        raise CommandError(describe(exc, whole="")) from None
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if config.shards > 1:
            from ..service.front import ShardFront

            ShardFront(config).run()
        else:
            Daemon(config).run()
    except DaemonError as exc:
        raise CommandError(str(exc)) from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per DaemonConfig field (--silence-timeout for silence_timeout),
    with the field's type, default and description: the config is the source."""
    from ..service.config import DaemonConfig

    for name, field in DaemonConfig.model_fields.items():
        # A dict here (config.SECRET, a shown_default), never a callable.
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = extra.get("shown_default", field.get_default(call_default_factory=True))
        if extra.get("secret", False):
            default = "hidden"  # a secret's default (from the environment) is never printed
        elif default is None:
            default = "none"
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action="store_true", default=None, help=field.description
            )
            continue
        kinds: dict[Any, Callable[[str], Any]] = {int: whole_number, float: finite_float}
        kind = kinds.get(field.annotation, str)
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            default=None,
            help=f"{field.description} (default: {default})",
        )


def add_control_flags(
    parser: argparse.ArgumentParser, json_flag: bool = True, timeout: bool = True
) -> None:
    """--control, --timeout (unless the command has its own), --keys and --json."""
    parser.add_argument(
        "--control",
        default=None,
        metavar="ADDR",
        help="the daemon's control address (default: $LRPILOT_CONTROL, else tcp://127.0.0.1:7313)",
    )
    if timeout:
        parser.add_argument(
            "--timeout",
            type=seconds_in(*TIMEOUT_S),
            metavar="SECONDS",
            default=5.0,
            help=f"seconds to wait for the daemon, {TIMEOUT_S[0]:g} to {TIMEOUT_S[1]:g} "
            "(default: 5)",
        )
    parser.add_argument(
        "--keys",
        default=None,
        metavar="DIR",
        help="this client's key directory, for a daemon with keys (client.key_secret and "
        "daemon.key, as `lrpilot keys add` makes it; docs/security.md); default: $LRPILOT_KEYS, "
        "else ~/.config/lrpilot/keys when it exists",
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def cmd_operation(args: argparse.Namespace) -> None:
    from . import operations

    if args.command == "policy":
        policy = None if args.requested else load_policy_arg(args.file, "policy")
        operations.cmd_policy(args, policy)
        return
    getattr(operations, "cmd_" + args.command.replace("-", "_"))(args)


def cmd_top(args: argparse.Namespace) -> None:
    from .top import main as top_main

    top_main(args)


def cmd_demo(args: argparse.Namespace) -> None:
    from lrpilot.policies import SpecError, parse_policy

    from .demo import main as demo_main

    policy = load_policy_arg(args.policy) if args.policy else None
    if policy is not None:
        try:
            parse_policy(policy)
        except SpecError as exc:
            raise CommandError(f"--policy: {exc}") from None
    demo_main(steps=args.steps, policy=policy, sync=args.sync)


def cmd_dashboards(args: argparse.Namespace) -> None:
    from ..observability.dashboards import cmd_export, cmd_push

    (cmd_push if args.action == "push" else cmd_export)(args)


def add_dashboards_command(commands: argparse._SubParsersAction) -> None:
    dashboards = commands.add_parser(
        "dashboards",
        help="push the Grafana dashboards (and their Prometheus datasource) to a Grafana",
        description="The Grafana dashboards that ship with lrpilot (dashboards/*.json): push "
        "them to a running Grafana over its HTTP API, or export the JSON for Grafana's file "
        "provisioning. See docs/grafana.md.",
    )
    actions = dashboards.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineParser)
    actions.required = True
    push = actions.add_parser(
        "push",
        help="create or update the datasource, the folder and the dashboards in a Grafana",
        description="Create or update, in the Grafana at --grafana-url: the Prometheus "
        "datasource (uid lrpilot-prometheus, which every panel queries), the folder (uid "
        "lrpilot) and every dashboard (by its uid). Idempotent: what Grafana already has is "
        "left alone, so a second push changes nothing; each object is reported as created, "
        "updated or unchanged. Credentials: --token (a service account token, sent as a "
        "bearer token) or --user and --password (basic auth), else $LRPILOT_GRAFANA_TOKEN, "
        "else $LRPILOT_GRAFANA_USER and $LRPILOT_GRAFANA_PASSWORD; flags win. Prefer the "
        "environment: a flag shows in `ps`.",
        epilog="example: LRPILOT_GRAFANA_TOKEN=glsa_... lrpilot dashboards push "
        "--grafana-url http://127.0.0.1:3000 --prometheus-url http://prometheus:9090",
    )
    push.add_argument(
        "--grafana-url", required=True, metavar="URL", help="the Grafana, e.g. http://HOST:3000"
    )
    push.add_argument(
        "--prometheus-url",
        default="http://127.0.0.1:9090",
        metavar="URL",
        help="the Prometheus that scrapes the daemon, as Grafana's server reaches it "
        "(default: http://127.0.0.1:9090)",
    )
    push.add_argument(
        "--folder", default="lrpilot", metavar="TITLE", help="folder title (default: lrpilot)"
    )
    push.add_argument(
        "--token", default=None, help="service account token ($LRPILOT_GRAFANA_TOKEN)"
    )
    push.add_argument("--user", default=None, help="basic auth user ($LRPILOT_GRAFANA_USER)")
    push.add_argument(
        "--password", default=None, help="basic auth password ($LRPILOT_GRAFANA_PASSWORD)"
    )
    push.add_argument(
        "--timeout",
        type=seconds_in(*TIMEOUT_S),
        metavar="SECONDS",
        default=10.0,
        help=f"seconds to wait for each answer, {TIMEOUT_S[0]:g} to {TIMEOUT_S[1]:g} (default: 10)",
    )
    export = actions.add_parser(
        "export",
        help="copy the dashboard JSON into DIR (for Grafana's file provisioning)",
        description="Copy every dashboard JSON file into DIR (created if missing), checked "
        "first, for a Grafana that provisions dashboards from files.",
    )
    export.add_argument("dest", type=Path, metavar="DIR", help="where to copy the JSON files")
    for action in (push, export):
        action.add_argument(
            "--dir",
            type=Path,
            default=None,
            help="read the dashboards from this directory (default: the ones lrpilot ships)",
        )
        action.add_argument("--json", action="store_true", help="print JSON for scripts")
        action.set_defaults(func=cmd_dashboards)


def add_simulate_command(commands: argparse._SubParsersAction) -> None:
    """`lrpilot simulate`: replay a metric stream, or a recorded run, through a policy."""
    sim = commands.add_parser(
        "simulate",
        help="replay a metric stream through a policy and print the LRs it gives",
        description=(
            "Replay a metric stream through an LR policy, exactly as torch's scheduler would "
            'step. Input: one JSON object a line, {"step": INT, "metrics": {NAME: FLOAT}}. '
            'Output: one line per input line, {"step": INT, "lrs": [...]} (and "momenta" '
            "for policies that cycle momentum). Kinds and fields: docs/policies.md."
        ),
        epilog=(
            'example: lrpilot simulate --policy \'{"kind": "step", "step_size": 2}\' '
            "--base-lr 0.1 --input metrics.jsonl"
        ),
    )
    sim.add_argument(
        "--policy",
        required=True,
        metavar="POLICY",
        help='policy JSON file, or the JSON itself, e.g. \'{"kind": "cosine", "T_max": 100}\'',
    )
    sim.add_argument(
        "--base-lr",
        action="append",
        type=lr_value,
        metavar="LR",
        help="the LR a param group starts with, 1e-12 to 1000; repeat once per group, in order",
    )
    sim.add_argument(
        "--input",
        default="-",
        metavar="METRICS.jsonl",
        help="metric stream to replay (default: standard input)",
    )
    sim.add_argument(
        "--from-run",
        default=None,
        metavar="RUN",
        help="replay a run's recorded metric stream (from the daemon's store) instead of "
        "--input; --base-lr defaults to the run's",
    )
    sim.add_argument(
        "--state-dir",
        default=None,
        help="with --from-run: read this store directly, no daemon needed",
    )
    add_control_flags(sim, json_flag=False)
    sim.set_defaults(func=cmd_simulate)


def add_operator_commands(commands: argparse._SubParsersAction) -> None:
    """The operator's commands to a running daemon, over its control plane."""
    ops = {
        "runs": ("list the runs the daemon knows", []),
        "show": ("show one run: LRs, policy, state, ranks, recent changes", ["run"]),
        "set-lr": (
            "hold a run's LR at a value (all groups, or --group) until resume",
            ["run", "lr"],
        ),
        "policy": (
            "switch a run's policy (validated first); --preview replays it instead",
            ["run", "file"],
        ),
        "pause": ("hold a run's LRs where they are until resume", ["run"]),
        "resume": ("give the LRs back to the run's policy", ["run"]),
        "history": ("the journal of a run's LR changes", ["run"]),
    }
    for name, (text, positional) in ops.items():
        op = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        for operand in positional:
            add_operand(op, operand)
        add_control_flags(op)
        op.set_defaults(func=cmd_operation)
        add_operator_options(op, name)


def add_operand(parser: argparse.ArgumentParser, operand: str) -> None:
    """One positional argument of an operator's command: the run, an LR or a policy."""
    if operand == "lr":
        parser.add_argument(
            "lr",
            type=lr_value,
            metavar="LR",
            help="the new LR, 1e-12 to 1000: below, no float32 weight moves; above, "
            "no optimizer trains (docs/operations.md)",
        )
    elif operand == "file":
        parser.add_argument(
            "file",
            nargs="?",
            default=None,
            metavar="FILE|-",
            help="policy JSON file, - for standard input, or inline JSON (at most "
            f"{MAX_POLICY_BYTES >> 10} KiB, what a command to the training can carry)",
        )
    else:
        parser.add_argument(operand, metavar=operand.upper(), help="the run id")


def add_operator_options(parser: argparse.ArgumentParser, name: str) -> None:
    """The options only one operator's command has (set-lr, history, policy)."""
    if name == "set-lr":
        parser.add_argument(
            "--group", default=None, help="only this param group (by name or index)"
        )
    if name == "history":
        parser.add_argument(
            "--limit",
            type=whole_number_in(1, MAX_HISTORY_LIMIT),
            metavar="N",
            default=None,
            help=f"only the last N changes (1 to {MAX_HISTORY_LIMIT})",
        )
    if name == "policy":
        parser.add_argument(
            "--preview",
            action="store_true",
            help="replay the run's recorded stream through the policy and print "
            "the LR curve it would have given; changes nothing",
        )
        parser.add_argument(
            "--requested",
            action="store_true",
            help="give back the policy the training script asked for",
        )
        parser.add_argument(
            "--state-dir", default=None, help="with --preview: read this store directly"
        )


def add_range_test_command(commands: argparse._SubParsersAction) -> None:
    """`lrpilot range-test`: an LR range test on a live run (daemon/cli/range_test.py)."""
    from .range_test import add_range_test_command as add

    add(commands)


def add_top_command(commands: argparse._SubParsersAction) -> None:
    """`lrpilot top`: the live terminal view of every run."""
    top = commands.add_parser(
        "top",
        help="a live terminal view of every run",
        description="A live view of every run: step, steps/s, loss (sparkline), LR per group, "
        "policy, last change and its reason, ranks, lag. q or Ctrl-C quits. When standard output "
        "is not a terminal it prints one frame and exits.",
    )
    add_control_flags(top, json_flag=False)
    top.add_argument(
        "--interval",
        type=seconds_in(*INTERVAL_S),
        metavar="SECONDS",
        default=1.0,
        help=f"seconds between refreshes, {INTERVAL_S[0]:g} to {INTERVAL_S[1]:g} (default: 1)",
    )
    top.set_defaults(func=cmd_top)


def add_daemon_command(commands: argparse._SubParsersAction) -> None:
    """`lrpilot daemon`: the daemon itself, configured by its flags."""
    daemon = commands.add_parser(
        "daemon",
        help="run the daemon that training processes attach to",
        description="Run the lrpilot daemon: training processes that call lrpilot.attach() "
        "connect to it, stream their metrics, and get their LR decisions from it. "
        "Stops cleanly on SIGINT/SIGTERM.",
    )
    add_config_flags(daemon)
    daemon.set_defaults(func=cmd_daemon)


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    """`lrpilot demo`: a daemon and a real training under its control."""
    demo = commands.add_parser(
        "demo",
        help="start a daemon and train a real model under its control",
        description="Start an lrpilot daemon, train a small MLP on scikit-learn's digits "
        "under its control (linear warmup, then reduce-on-plateau on the validation loss), "
        "print each LR change as it lands with its reason, then compare with the same "
        "training at a constant LR. Needs the demo extra (torch, scikit-learn).",
    )
    demo.add_argument(
        "--steps",
        type=whole_number_in(1, MAX_DEMO_STEPS),
        metavar="N",
        default=None,
        help=f"optimizer steps to train, 1 to {MAX_DEMO_STEPS} (default: 1500)",
    )
    demo.add_argument(
        "--policy",
        default=None,
        metavar="POLICY",
        help="policy JSON file or inline JSON instead of warmup-then-plateau",
    )
    demo.add_argument(
        "--sync", action="store_true", help="lock-step mode: every step waits for the daemon"
    )
    demo.set_defaults(func=cmd_demo)


def add_keys_command(commands: argparse._SubParsersAction) -> None:
    """`lrpilot keys`: the CURVE keys of a daemon and of the clients it allows."""

    def cmd_keys(args: argparse.Namespace) -> None:
        from .keys import cmd_keys as run_keys

        run_keys(args)

    keys = commands.add_parser(
        "keys",
        help="make and manage the keys of the daemon and its clients (trainers, operators)",
        description="The ZeroMQ CURVE keys that authenticate and encrypt both planes. DIR is "
        "the daemon's key directory: daemon.key_secret (the daemon's key pair), daemon.key "
        "(its public key), allowed/NAME.key (each client's public key and role, which the "
        "daemon allows) and clients/NAME/ (the folder to give that client). Roles: trainer "
        "(the data plane for its runs, and the control plane's reads), operator (everything, "
        "set-lr, policy, range-test, pause and resume included), viewer (runs, show, history, "
        "top). A running daemon reads allowed/ again on SIGHUP. See docs/security.md.",
        epilog="example: lrpilot keys init /etc/lrpilot/keys && lrpilot keys add "
        "/etc/lrpilot/keys team-a --role trainer --runs 'team-a-*'",
    )
    actions = keys.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineParser)
    actions.required = True
    init = actions.add_parser(
        "init",
        help="make a daemon's key directory, with an operator's and a trainer's key",
        description="Make DIR (mode 0700; new or empty) with the daemon's key pair, allowed/, "
        "clients/, and two clients: 'operator' (role operator) and 'trainer' (role trainer, "
        "every run). Refuses a DIR that already holds a daemon's keys: to rotate them, init "
        "a new DIR, give every client its new folder and restart the daemon.",
    )
    add = actions.add_parser(
        "add",
        help="add a client key: its folder under clients/, its public key in allowed/",
        description="Make a key for one client: DIR/clients/NAME/ (client.key_secret, "
        "client.key and a copy of daemon.key: give that folder to the client) and "
        "DIR/allowed/NAME.key (its public key, role and runs, which the daemon allows). "
        "NAME is what the journal shows as the actor. A running daemon takes the key on "
        "SIGHUP.",
        epilog="example: lrpilot keys add /etc/lrpilot/keys alice --role operator",
    )
    remove = actions.add_parser(
        "remove",
        help="remove a client key (allowed/NAME.key and clients/NAME/)",
        description="Remove DIR/allowed/NAME.key and DIR/clients/NAME/. A running daemon "
        "refuses the key once it reads allowed/ again (SIGHUP) or restarts.",
    )
    listed = actions.add_parser(
        "list",
        help="the client keys the daemon allows: name, role, runs",
        description="Every key in DIR/allowed/ as the daemon reads it: its name, role and "
        "runs (the runs it may report for). A file the daemon cannot read is shown with "
        "the reason it would be left out.",
    )
    # DIR first: `lrpilot keys add DIR NAME`, as the daemon's directory is what each acts on.
    for action in (init, add, remove, listed):
        action.add_argument("dir", type=Path, metavar="DIR", help="the daemon's key directory")
        action.set_defaults(func=cmd_keys)
    add.add_argument(
        "name",
        metavar="NAME",
        help="the key's name: 1 to 64 letters, digits, '.', '_' or '-' (not 'daemon' or "
        "'policy', which the journal uses)",
    )
    add.add_argument(
        "--role",
        required=True,
        metavar="{trainer,operator,viewer}",
        help="trainer: the data plane for its runs, control reads; operator: everything; "
        "viewer: control reads only (runs, show, history, top)",
    )
    add.add_argument(
        "--runs",
        default=None,
        metavar="RUNS",
        help="a trainer's runs: a run id, a prefix ending in '*' (team-a-*), or '*' for every "
        "run (default: *)",
    )
    remove.add_argument("name", metavar="NAME", help="the key's name (lrpilot keys list DIR)")
    listed.add_argument("--json", action="store_true", help="print JSON for scripts")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lrpilot",
        description="Adaptive learning-rate control and telemetry for PyTorch training loops.",
    )
    parser.add_argument("--version", action="version", version=f"lrpilot {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True
    # The order here is the order `lrpilot --help` lists the commands in.
    add_simulate_command(commands)
    add_operator_commands(commands)
    add_range_test_command(commands)
    add_top_command(commands)
    add_daemon_command(commands)
    add_demo_command(commands)
    add_dashboards_command(commands)
    add_keys_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import sqlite3

    if getattr(args, "command", None) == "policy" and not args.requested and args.file is None:
        parser.error("policy: give a FILE (or -), or --requested")
    if getattr(args, "command", None) == "simulate" and not args.from_run and not args.base_lr:
        parser.error("simulate: --base-lr is required (one per param group) unless --from-run")
    check = getattr(args, "check", None)  # what a command's flags must be together
    if check is not None:
        check(args)
    try:
        args.func(args)
    except LRPilotError as exc:  # anything else is a bug: its traceback shows
        # One line, whatever the message quotes (a file name, a daemon's answer).
        print(f"lrpilot {args.command}: {printable(exc)}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"lrpilot {args.command}: cannot read the store: {printable(exc)}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise  # a module of our own missing is a bug: its traceback says where
        print(
            f"lrpilot {args.command}: needs {exc.name}, which comes with lrpilot's {extra} "
            f"extra: pip install 'lrpilot[{extra}]'",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:
        # `lrpilot simulate ... | head` closes our stdout early; not an error.
        sys.stderr.close()
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
