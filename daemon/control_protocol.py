"""The control plane's protocol: every request an operator's tool sends to
the daemon and every answer it gets, as typed models, with the bounds on each
field. The daemon (daemon/service/control.py) and the tools
(daemon/cli/control_client.py, used by the ``lrpilot`` commands and ``top``)
both build and read messages only through this module, as the data plane's
messages go only through lrpilot.protocol.

On the wire: one JSON object each way over a ZeroMQ REQ/ROUTER pair.
A request is ``{"op": ..., "actor": ..., ...fields}``; an answer is
``{"ok": true, ...fields}`` or ``{"ok": false, "error": "one line"}``.
Requests forbid unknown fields (a typo is refused, not ignored); answers are
read ignoring fields a client does not know, so that a daemon may add some.

Every field of a request is hostile until checked: each is bounded here, and
whatever a request gets wrong is answered with one line, never an internal
error. The command line refuses the same values before sending them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lrpilot.errors import LRPilotError
from lrpilot.protocol import MAX_COUNT, LRCommand

# The largest request the control socket takes (server.py sets it as the
# socket's ZMQ_MAXMSGSIZE, so a larger one is dropped before it is buffered
# whole). The largest real request is a policy switch: MAX_POLICY_BYTES of
# policy and a few names, sixteen times under this.
MAX_CONTROL_BYTES = 1 << 20
# A policy an operator may send. A command carries the policy's spec and its
# state to every rank, and the hook refuses a message over
# lrpilot.protocol.MAX_MESSAGE_BYTES (4 MiB); 64 KiB of spec (thousands of
# milestones, far more than any schedule lists) keeps the command far under it.
MAX_POLICY_BYTES = 64 << 10
POLICY_RULE = f"a policy must be at most {MAX_POLICY_BYTES // 1024} KiB of JSON"
# Every number in a policy: as every count on the wire (lrpilot.protocol), so
# that no step count or size overflows the float the policy code makes of it.
MAX_POLICY_NUMBER = MAX_COUNT
# The LRs an operator may set. Below 1e-12 an update moves no float32 weight
# (it is under the weight's rounding for any gradient a training survives):
# a typo, not a choice; `pause` is how to stop the LR moving. Above 1e3 is
# beyond any optimizer's working range (LARS/LAMB base LRs reach tens) and
# near what overflows the first update in half precision.
LR_MIN, LR_MAX = 1e-12, 1e3
LR_RULE = f"an LR must be a positive number from {LR_MIN:g} to {LR_MAX:g}"
# `history --limit`: more entries than a journal of a million steps holds.
MAX_HISTORY_LIMIT = 1_000_000
MAX_NAME = 200  # characters of a run or group name, as the protocol's hello allows
MAX_ERROR_CHARS = 500  # an answer's error line is cut there (it quotes what it refuses)
# Text a client chooses and the daemon journals (who made a change): no control
# characters (C0, DEL, C1), which would act on the terminal that prints it.
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]*$"

RunId = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actor: str = Field("operator", min_length=1, max_length=MAX_NAME, pattern=PRINTABLE)


class RunsRequest(Request):
    op: Literal["runs"]


class ShowRequest(Request):
    op: Literal["show"]
    run: RunId


class SetLRRequest(Request):
    op: Literal["set_lr"]
    run: RunId
    lr: float  # checked in op_set_lr, against LR_RULE
    group: str | None = Field(None, min_length=1, max_length=MAX_NAME)


class PolicyRequest(Request):
    op: Literal["policy"]
    run: RunId
    policy: dict[str, Any] | None  # None: give back the policy the script asked for


# The fields of a range_test policy an operator may give (client/policies/
# range_test.py); the daemon sets kind, suggest_only and, for a suggestion
# only, then, then_base_lrs and then_state itself.
SWEEP_FIELDS = (
    "min_lr",
    "max_lr",
    "steps",
    "mode",
    "metric",
    "smoothing",
    "diverge",
    "suggest",
    "skip_begin",
    "skip_end",
    "restore",
    "then",
)


class RangeTestRequest(Request):
    """An LR range test on a live run (``lrpilot range-test``): the run
    switches to a ``range_test`` policy built from ``sweep`` (any of
    SWEEP_FIELDS; the rest are the kind's defaults). Without ``then`` the
    run's current policy follows the sweep, from the sweep's end; with
    ``suggest_only`` the current policy comes back where it stood when the
    sweep began, and the sweep only suggests an LR."""

    op: Literal["range_test"]
    run: RunId
    sweep: dict[str, Any] = Field(default_factory=dict)  # checked in op_range_test
    suggest_only: bool = False


class PauseRequest(Request):
    op: Literal["pause"]
    run: RunId


class ResumeRequest(Request):
    op: Literal["resume"]
    run: RunId


class HistoryRequest(Request):
    op: Literal["history"]
    run: RunId
    limit: int | None = Field(None, ge=1, le=MAX_HISTORY_LIMIT)


class StoreRequest(Request):
    op: Literal["store"]
    # The run whose store (a daemon of several shards has one per shard).
    run: RunId | None = None


ControlRequest = Annotated[
    RunsRequest
    | ShowRequest
    | SetLRRequest
    | PolicyRequest
    | RangeTestRequest
    | PauseRequest
    | ResumeRequest
    | HistoryRequest
    | StoreRequest,
    Field(discriminator="op"),
]
_REQUEST: TypeAdapter[Any] = TypeAdapter(ControlRequest)


class ControlError(LRPilotError, ValueError):
    """A request the daemon refuses; the message is the one line the CLI prints."""


def parse_request(raw: bytes) -> ControlRequest:
    """The request in ``raw``, or ControlError with the one line that says
    what is wrong with it."""
    if len(raw) > MAX_CONTROL_BYTES:
        raise ControlError(f"bad request: {len(raw)} bytes, over the {MAX_CONTROL_BYTES} allowed")
    try:
        return _REQUEST.validate_json(raw)
    except ValidationError as exc:
        raise ControlError(f"bad request: {describe_request(exc)}") from None


# --- answers -------------------------------------------------------------------


class Answer(BaseModel):
    # A client reads what it knows of an answer: a newer daemon may add fields.
    model_config = ConfigDict(extra="ignore")
    ok: Literal[True] = True


class Refusal(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ok: Literal[False] = False
    error: str


class LastChange(BaseModel):
    model_config = ConfigDict(extra="ignore")
    version: int
    step: int  # the step it took effect from
    lrs: list[float]
    reason: str
    actor: str


class RunSummary(BaseModel):
    """A run as ``lrpilot runs`` and ``top`` show it."""

    model_config = ConfigDict(extra="ignore")
    run: str
    status: Literal["active", "ended"]
    step: int
    steps_per_s: float
    groups: list[str]
    lrs: list[float]
    policy_kind: str | None
    held: bool
    ranks: list[int]
    world_size: int
    # How far the slowest rank is behind the leading one, as in /metrics.
    lag_steps: int
    # Ranks not heard from for longer than --rank-wait-timeout (killed,
    # hung), and ranks a decision stopped waiting for (reduction.py).
    silent: list[int] = []
    left_out: list[int] = []
    loss_history: list[float]  # the loss once a second, the last minute
    last_change: LastChange | None
    created: float
    ended: float | None


class SessionInfo(BaseModel):
    """One connected rank."""

    model_config = ConfigDict(extra="ignore")
    rank: int
    host: str
    pid: int
    sync: bool
    step: int
    steps_per_s: float
    applied_version: int
    applied_step: int
    late_by: int  # steps its last command landed after its effective step
    silent_s: float = 0.0  # seconds since its last message
    left_out: bool = False  # a decision stopped waiting for it (until it sends again)
    stats: dict[str, int]


class JournalEntry(BaseModel):
    """One LR change, as the journal keeps it."""

    model_config = ConfigDict(extra="ignore")
    run_id: str
    version: int
    effective_step: int
    state_step: int
    old_lrs: list[float]
    new_lrs: list[float]
    reason: str
    actor: str
    time: float
    policy: dict[str, Any] | None = None
    hold: bool
    applied_step: int | None = None  # where the driver applied it, once it says
    late: int | None = None  # steps after effective_step it was applied
    # The policy's whole state as of the change (a range test's curve, a
    # guard's trip); None in entries from before the journal kept it.
    policy_state: dict[str, Any] | None = None


class RunDetail(RunSummary):
    """A run as ``lrpilot show`` shows it."""

    policy: dict[str, Any] | None
    requested_policy: dict[str, Any] | None
    policy_base_lrs: list[float]
    policy_state: dict[str, Any] | None
    base_lrs: list[float]
    version: int
    last_metrics: dict[str, float]
    sessions: list[SessionInfo]
    history: list[JournalEntry]  # the last few changes
    store: str


class RunsAnswer(Answer):
    runs: list[RunSummary]


class ShowAnswer(Answer):
    run: RunDetail


class HistoryAnswer(Answer):
    history: list[JournalEntry]


class CommandAnswer(Answer):
    """The answer to a change (set_lr, pause, resume, policy, range_test): the command
    journaled and sent to every rank."""

    command: LRCommand


class StoreAnswer(Answer):
    path: str  # the daemon's store, committed up to the request


ANSWERS: dict[str, type[Answer]] = {
    "runs": RunsAnswer,
    "show": ShowAnswer,
    "history": HistoryAnswer,
    "set_lr": CommandAnswer,
    "pause": CommandAnswer,
    "resume": CommandAnswer,
    "policy": CommandAnswer,
    "range_test": CommandAnswer,
    "store": StoreAnswer,
}


def encode_answer(answer: Answer | Refusal) -> bytes:
    """JSON as the wire carries it: NaN and infinities as JavaScript's
    literals (a diverged loss is data), which Python's json reads back."""
    return json.dumps(answer.model_dump(mode="python")).encode()


def refusal(error: str) -> Refusal:
    """The answer to a refused request: its error on one line, cut to a length
    a terminal shows (it may quote what a client sent)."""
    line = " ".join(error.split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 1] + "…"
    return Refusal(error=line)


def describe_request(exc: ValidationError) -> str:
    """One line for what is wrong with a request: ``field: rule (got value)``."""
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        kind, loc = err["type"], [str(p) for p in err["loc"][1:]]  # [0] is the op
        if kind == "union_tag_invalid":
            ctx = err["ctx"]
            parts.append(f"op: unknown op {ctx['tag']!r} (ops: {ctx['expected_tags']})")
        elif kind == "union_tag_not_found":
            parts.append("op: missing (a request is a JSON object with an op)")
        elif kind in ("dict_type", "model_type", "model_attributes_type") and not loc:
            parts.append("a request is a JSON object with an op")
        elif kind == "json_invalid":
            parts.append(f"not JSON: {err['ctx']['error']}")
        elif kind == "extra_forbidden":
            parts.append(f"{'.'.join(loc)}: unknown field")
        elif kind == "missing":
            parts.append(f"{'.'.join(loc)}: required field is missing")
        elif kind == "string_pattern_mismatch":
            parts.append(f"{'.'.join(loc)}: must not hold control characters")
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 40 else got[:39] + "…"
            parts.append(f"{'.'.join(loc) or 'request'}: {err['msg']} (got {got})")
    return "; ".join(parts)


def lr_allowed(lr: float) -> bool:
    return math.isfinite(lr) and LR_MIN <= lr <= LR_MAX


def policy_problem(policy: Any) -> str | None:
    """Why ``policy`` (JSON from a client) is refused before its spec is read,
    or None: it is too large for a command, or it holds a number the policy
    code would overflow on (a step count of 1e30 fits no float)."""
    size = len(json.dumps(policy, separators=(",", ":")).encode())
    if size > MAX_POLICY_BYTES:
        return f"{POLICY_RULE}, got {size} bytes"
    for number in numbers(policy):
        if not (math.isfinite(number) and abs(number) <= MAX_POLICY_NUMBER):
            return f"a number in a policy must be finite and within ±2**53, got {number:g}"
    return None


def numbers(value: Any) -> Iterator[int | float]:
    """Every number in a JSON value."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        yield from numbers(item)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def ascii_decimal(text: str, max_digits: int = 18) -> int | None:
    """``text`` as a non-negative int when it is only ASCII digits (``str.isdigit``
    also takes '²' and other digits ``int()`` refuses or reads otherwise), and
    short enough to be an index or a count (18 digits fit an int64)."""
    if len(text) <= max_digits and re.fullmatch(r"[0-9]+", text):
        return int(text)
    return None
