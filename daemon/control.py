"""The control plane: what an operator asks of the daemon (``lrpilot runs``,
``show``, ``set-lr``, ``policy``, ``pause``, ``resume``, ``history``).

Requests and answers are JSON objects over a ZeroMQ REQ/ROUTER pair on
loopback: ``{"op": ..., ...}`` in, ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}`` out. Each change is validated before
anything moves, journaled, and sent to every rank of the run as a command
scheduled a little ahead (about 100 ms of the run's steps), so all ranks
apply it at the same step.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lrpilot.policies import SpecError, describe, parse_policy

from .dataplane import DataPlane, Outgoing
from .registry import Run


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actor: str = "operator"


class RunsRequest(Request):
    op: Literal["runs"]


class ShowRequest(Request):
    op: Literal["show"]
    run: str


class SetLRRequest(Request):
    op: Literal["set_lr"]
    run: str
    lr: float
    group: str | None = None


class PolicyRequest(Request):
    op: Literal["policy"]
    run: str
    policy: dict[str, Any] | None  # None: give back the policy the script asked for


class PauseRequest(Request):
    op: Literal["pause"]
    run: str


class ResumeRequest(Request):
    op: Literal["resume"]
    run: str


class HistoryRequest(Request):
    op: Literal["history"]
    run: str
    limit: int | None = Field(None, ge=1)


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


class ControlError(ValueError):
    """A request the daemon refuses; the message is the one line the CLI prints."""


class ControlPlane:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def handle(self, raw: bytes) -> tuple[dict[str, Any], Outgoing]:
        """Answer one request; the commands it caused, for the data plane to send."""
        try:
            request = _REQUEST.validate_json(raw)
        except ValidationError as exc:
            return {"ok": False, "error": f"bad request: {describe(exc)}"}, []
        try:
            answer, outgoing = getattr(self, "op_" + request.op)(request)
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}, []
        return {"ok": True, **answer}, outgoing

    def _run(self, run_id: str) -> Run:
        run = self.plane.registry.runs.get(run_id)
        if run is None:
            known = ", ".join(sorted(self.plane.registry.runs)[:10]) or "none"
            raise ControlError(f"unknown run {run_id!r} (runs: {known})")
        return run

    def _send(self, run: Run, command: Any) -> Outgoing:
        return self.plane.send_command(run, command)

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
        run = self._run(request.run)
        if not (math.isfinite(request.lr) and request.lr > 0):
            raise ControlError(f"an LR must be a positive number, got {request.lr}")
        lrs = run.engine.lrs
        groups = group_indices(run, request.group)
        for i in groups:
            lrs[i] = request.lr
        where = "all groups" if request.group is None else f"group {request.group}"
        command = run.engine.hold(
            lrs, f"set-lr {request.lr} ({where}); held until resume", request.actor, self._lead(run)
        )
        return {"command": command.model_dump()}, self._send(run, command)

    def op_pause(self, request: PauseRequest) -> tuple[dict, Outgoing]:
        run = self._run(request.run)
        if run.engine.held is not None:
            raise ControlError(f"run {run.run_id!r} is already held at {run.engine.held}")
        command = run.engine.hold(
            run.engine.lrs,
            "pause: LRs held until resume",
            request.actor,
            self._lead(run),
            cause="pause",
        )
        return {"command": command.model_dump()}, self._send(run, command)

    def op_resume(self, request: ResumeRequest) -> tuple[dict, Outgoing]:
        run = self._run(request.run)
        if run.engine.held is None:
            raise ControlError(f"run {run.run_id!r} is not held (nothing to resume)")
        command = run.engine.release(request.actor, self._lead(run))
        return {"command": command.model_dump()}, self._send(run, command)

    def op_policy(self, request: PolicyRequest) -> tuple[dict, Outgoing]:
        run = self._run(request.run)
        wanted = request.policy if request.policy is not None else run.requested_policy
        if wanted is None:
            raise ControlError(f"run {run.run_id!r} asked for no policy; `pause` holds its LRs")
        try:
            spec = parse_policy(wanted) if wanted is not None else None
            if spec is not None:
                spec.build(run.engine.lrs)  # per-group lists must fit the run's groups
        except SpecError as exc:
            raise ControlError(str(exc)) from None
        what = spec.kind if spec else "none"
        reason = (
            f"policy switched to {what}"
            if request.policy is not None
            else f"policy given back to the script's ({what})"
        )
        command = run.engine.switch(spec, reason, request.actor, self._lead(run))
        return {"command": command.model_dump()}, self._send(run, command)


def group_indices(run: Run, group: str | None) -> list[int]:
    """All groups, or the one named (by name, else by index)."""
    if group is None:
        return list(range(len(run.group_names)))
    if group in run.group_names:
        return [run.group_names.index(group)]
    if group.isdigit() and int(group) < len(run.group_names):
        return [int(group)]
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
