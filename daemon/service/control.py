"""The control plane: what an operator asks of the daemon (``lrpilot runs``,
``show``, ``set-lr``, ``policy``, ``pause``, ``resume``, ``history``).

Requests and answers are JSON objects over a ZeroMQ REQ/ROUTER pair on
loopback: ``{"op": ..., ...}`` in, ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}`` out. Each change is validated before
anything moves, journaled, and sent to every rank of the run as a command
scheduled a little ahead (about 100 ms of the run's steps), so all ranks
apply it at the same step.

Every field of a request is hostile until checked: each is bounded here, and
whatever a request gets wrong is answered with one line, never an internal
error. The bounds below are shared with the command line (daemon/cli/main.py),
which refuses the same values before sending them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lrpilot.errors import LRPilotError
from lrpilot.policies import ScheduleExhausted, SpecError, parse_policy
from lrpilot.protocol import MAX_COUNT

from .dataplane import DataPlane, Outgoing
from .engine import Change
from .registry import Run

log = logging.getLogger("lrpilot.daemon")

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


ControlRequest = Annotated[
    RunsRequest
    | ShowRequest
    | SetLRRequest
    | PolicyRequest
    | PauseRequest
    | ResumeRequest
    | HistoryRequest
    | StoreRequest,
    Field(discriminator="op"),
]
_REQUEST: TypeAdapter[Any] = TypeAdapter(ControlRequest)


class ControlError(LRPilotError, ValueError):
    """A request the daemon refuses; the message is the one line the CLI prints."""


class ControlPlane:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def handle(self, raw: bytes) -> tuple[dict[str, Any], Outgoing]:
        """Answer one request; the commands it caused, for the data plane to send."""
        if len(raw) > MAX_CONTROL_BYTES:
            return refusal(f"bad request: {len(raw)} bytes, over the {MAX_CONTROL_BYTES} allowed")
        try:
            request = _REQUEST.validate_json(raw)
        except ValidationError as exc:
            return refusal(f"bad request: {describe_request(exc)}")
        try:
            answer, outgoing = getattr(self, "op_" + request.op)(request)
        except ControlError as exc:
            return refusal(str(exc))
        return {"ok": True, **answer}, outgoing

    def _run(self, run_id: str) -> Run:
        run = self.plane.registry.runs.get(run_id)
        if run is None:
            known = ", ".join(sorted(self.plane.registry.runs)[:10]) or "none"
            raise ControlError(f"unknown run {run_id!r} (runs: {known})")
        return run

    @staticmethod
    def _require_live(run: Run) -> None:
        """A change must reach a run with a connected rank. A change to a
        run that has ended would apply to nothing; kept for later, it would
        land on the next script that reuses the run id (a fresh start), which
        runs its own policy. So it is refused (after the request's own
        checks, which say more about a mistyped one)."""
        if not run.sessions:
            raise ControlError(
                f"run {run.run_id!r} has no connected rank (it ended, or its training is between "
                "restarts): a change would apply to nothing, so it is refused; try again when "
                "its training is back"
            )

    def _send(self, run: Run, change: Change) -> Outgoing:
        return self.plane.send_command(run, change)

    def _lead(self, run: Run) -> int:
        return run.command_lead(self.plane.config.command_lead_steps)

    # --- reads ------------------------------------------------------------

    def op_runs(self, request: RunsRequest) -> tuple[dict, Outgoing]:
        runs = sorted(self.plane.registry.runs.values(), key=lambda r: r.created)
        return {"runs": [summary(run) for run in runs]}, []

    def op_show(self, request: ShowRequest) -> tuple[dict, Outgoing]:
        run = self._run(request.run)
        engine = run.engine
        detail = summary(run)
        detail.update(
            policy=engine.spec.model_dump() if engine.spec else None,
            requested_policy=run.requested_policy,
            policy_base_lrs=engine.base_lrs,
            policy_state=engine.policy.state_dict() if engine.policy else None,
            base_lrs=run.base_lrs,
            version=engine.version,
            last_metrics=run.last_metrics,
            sessions=[session_info(s) for s in sorted(run.sessions.values(), key=lambda s: s.rank)],
            history=self.plane.store.history(run.run_id, limit=5),
            store=str(self.plane.store.path),
        )
        return {"run": detail}, []

    def op_history(self, request: HistoryRequest) -> tuple[dict, Outgoing]:
        run = self._run(request.run)
        return {"history": self.plane.store.history(run.run_id, request.limit)}, []

    def op_store(self, request: StoreRequest) -> tuple[dict, Outgoing]:
        self.plane.flush()  # so a reader sees every record received so far
        return {"path": str(self.plane.store.path)}, []

    # --- changes ----------------------------------------------------------

    def op_set_lr(self, request: SetLRRequest) -> tuple[dict, Outgoing]:
        if not lr_allowed(request.lr):
            raise ControlError(f"lr: {LR_RULE}, got {request.lr:g}")
        run = self._run(request.run)
        lrs = run.engine.lrs
        groups = group_indices(run, request.group)
        self._require_live(run)
        for i in groups:
            lrs[i] = request.lr
        where = "all groups" if request.group is None else f"group {request.group}"
        change = run.engine.hold(
            lrs, f"set-lr {request.lr} ({where}); held until resume", request.actor, self._lead(run)
        )
        return {"command": change.command.model_dump()}, self._send(run, change)

    def op_pause(self, request: PauseRequest) -> tuple[dict, Outgoing]:
        run = self._run(request.run)
        if run.engine.held is not None:
            raise ControlError(f"run {run.run_id!r} is already held at {run.engine.held}")
        self._require_live(run)
        change = run.engine.hold(
            run.engine.lrs,
            "pause: LRs held until resume",
            request.actor,
            self._lead(run),
            cause="pause",
        )
        return {"command": change.command.model_dump()}, self._send(run, change)

    def op_resume(self, request: ResumeRequest) -> tuple[dict, Outgoing]:
        run = self._run(request.run)
        if run.engine.held is None:
            raise ControlError(f"run {run.run_id!r} is not held (nothing to resume)")
        self._require_live(run)
        change = run.engine.release(request.actor, self._lead(run))
        return {"command": change.command.model_dump()}, self._send(run, change)

    def op_policy(self, request: PolicyRequest) -> tuple[dict, Outgoing]:
        problem = None if request.policy is None else policy_problem(request.policy)
        if problem:
            raise ControlError(f"policy: {problem}")
        run = self._run(request.run)
        wanted = request.policy if request.policy is not None else run.requested_policy
        if wanted is None:
            raise ControlError(f"run {run.run_id!r} asked for no policy; `pause` holds its LRs")
        spec = try_policy(wanted, run.engine.lrs)
        self._require_live(run)
        what = spec.kind
        reason = (
            f"policy switched to {what}"
            if request.policy is not None
            else f"policy given back to the script's ({what})"
        )
        change = run.engine.switch(spec, reason, request.actor, self._lead(run))
        return {"command": change.command.model_dump()}, self._send(run, change)


def refusal(error: str) -> tuple[dict[str, Any], Outgoing]:
    """The answer to a refused request: its error on one line, cut to a length
    a terminal shows (it may quote what a client sent)."""
    line = " ".join(error.split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 1] + "…"
    return {"ok": False, "error": line}, []


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


def try_policy(wanted: dict[str, Any], lrs: list[float]) -> Any:
    """The spec of ``wanted``, once it has been built for the run's LRs and has
    taken a first step, or a ControlError. The policy is a client's JSON: any
    way it fails (a spec error, or a value the policy code chokes on: a huge
    int, a list too short) refuses this request, and the run keeps its own."""
    try:
        spec = parse_policy(wanted)
        trial = spec.build(lrs)  # per-group lists must fit the run's groups
        trial.step()  # what every rank does with it next
    except ScheduleExhausted:
        return spec
    except SpecError as exc:
        raise ControlError(str(exc)) from None  # it names the field
    except (ValueError, ArithmeticError, LookupError, TypeError) as exc:
        log.warning("policy refused: the policy code failed on it", exc_info=True)
        raise ControlError(f"policy: {exc}") from None
    return spec


def group_indices(run: Run, group: str | None) -> list[int]:
    """All groups, or the one named (by name, else by index)."""
    if group is None:
        return list(range(len(run.group_names)))
    if group in run.group_names:
        return [run.group_names.index(group)]
    index = ascii_decimal(group)
    if index is not None and index < len(run.group_names):
        return [index]
    raise ControlError(
        f"run {run.run_id!r} has no param group {group!r} (groups: {', '.join(run.group_names)})"
    )


def summary(run: Run) -> dict[str, Any]:
    engine = run.engine
    last = engine.last_change
    return {
        "run": run.run_id,
        "status": "active" if run.sessions else "ended",
        "step": run.step,
        "steps_per_s": round(
            sum(s.steps_per_s for s in run.sessions.values()) / max(1, len(run.sessions)), 2
        ),
        "groups": run.group_names,
        "lrs": engine.lrs,
        "policy_kind": engine.spec.kind if engine.spec else None,
        "held": engine.held is not None,
        "ranks": sorted(run.sessions),
        "world_size": run.world_size,
        # How far the slowest rank is behind the leading one, as in /metrics
        # (lrpilot_rank_lag_steps); how late commands landed is per rank in show.
        "lag_steps": run.step - min((s.step for s in run.sessions.values()), default=run.step),
        "loss_history": list(run.loss_history),
        "last_change": None
        if last is None
        else {
            "version": last.version,
            "step": last.effective_step,
            "lrs": last.lrs,
            "reason": last.reason,
            "actor": last.actor,
        },
        "created": run.created,
        "ended": run.ended,
    }


def session_info(session: Any) -> dict[str, Any]:
    return {
        "rank": session.rank,
        "host": session.host,
        "pid": session.pid,
        "sync": session.sync,
        "step": session.step,
        "steps_per_s": round(session.steps_per_s, 2),
        "applied_version": session.applied_version,
        "applied_step": session.applied_step,
        "late_by": session.late_by,
        "stats": {k: getattr(session.stats, k) for k in session.stats.__dataclass_fields__},
    }
