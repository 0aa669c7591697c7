"""The control plane: what the daemon does with an operator's request
(``lrpilot runs``, ``show``, ``set-lr``, ``policy``, ``pause``, ``resume``,
``history``). The requests, answers and their bounds are the control
protocol's (daemon/control_protocol.py); this module answers them.

Each change is validated before anything moves, journaled, and sent to every
rank of the run as a command scheduled a little ahead (about 200 ms of the
run's steps), so all ranks apply it at the same step.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from lrpilot.policies import ScheduleExhausted, SpecError, parse_policy

from ..control_protocol import (
    LR_RULE,
    Answer,
    CommandAnswer,
    ControlError,
    HistoryAnswer,
    HistoryRequest,
    JournalEntry,
    LastChange,
    PauseRequest,
    PolicyRequest,
    Refusal,
    ResumeRequest,
    RunDetail,
    RunsAnswer,
    RunsRequest,
    RunSummary,
    SessionInfo,
    SetLRRequest,
    ShowAnswer,
    ShowRequest,
    StoreAnswer,
    StoreRequest,
    ascii_decimal,
    lr_allowed,
    parse_request,
    policy_problem,
    refusal,
)
from .auth import Key
from .dataplane import DataPlane, Outgoing
from .engine import Change
from .registry import Run, Session

log = logging.getLogger("lrpilot.daemon")


class ControlPlane:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def handle(self, raw: bytes) -> tuple[dict[str, Any], Outgoing]:
        """Answer one request (as the wire's JSON object); the commands it
        caused, for the data plane to send."""
        answer, outgoing = self.answer(raw)
        return answer.model_dump(), outgoing

    def answer(self, raw: bytes, key: Key | None = None) -> tuple[Answer | Refusal, Outgoing]:
        """The answer to one request. ``key``: the allowed key it came with
        when the daemon has keys: its role says which requests it may make,
        and a change is journaled as made by the key's name, whatever actor
        the request claims."""
        try:
            request = parse_request(raw)
            if key is not None:
                if not key.may_ask(request.op):
                    self.plane.auth_refused["forbidden_control"] += 1
                    raise ControlError(
                        f"forbidden: key {key.name!r} ({key.role}) may not {request.op} "
                        "(changes need an operator key; docs/security.md)"
                    )
                request.actor = key.name
            return getattr(self, "op_" + request.op)(request)
        except ControlError as exc:
            return refusal(str(exc)), []

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

    def op_runs(self, request: RunsRequest) -> tuple[RunsAnswer, Outgoing]:
        runs = sorted(self.plane.registry.runs.values(), key=lambda r: r.created)
        now, silent_after = time.monotonic(), self.plane.config.rank_wait_timeout
        return RunsAnswer(runs=[summary(run, now, silent_after) for run in runs]), []

    def op_show(self, request: ShowRequest) -> tuple[ShowAnswer, Outgoing]:
        run = self._run(request.run)
        engine = run.engine
        now = time.monotonic()
        detail = RunDetail(
            **summary(run, now, self.plane.config.rank_wait_timeout).model_dump(),
            policy=engine.spec.model_dump() if engine.spec else None,
            requested_policy=run.requested_policy,
            policy_base_lrs=engine.base_lrs,
            policy_state=engine.policy.state_dict() if engine.policy else None,
            base_lrs=run.base_lrs,
            version=engine.version,
            last_metrics=run.last_metrics,
            sessions=[
                session_info(s, run, now)
                for s in sorted(run.sessions.values(), key=lambda s: s.rank)
            ],
            history=self._history(run.run_id, limit=5),
            store=str(self.plane.store.path),
        )
        return ShowAnswer(run=detail), []

    def op_history(self, request: HistoryRequest) -> tuple[HistoryAnswer, Outgoing]:
        run = self._run(request.run)
        return HistoryAnswer(history=self._history(run.run_id, request.limit)), []

    def _history(self, run_id: str, limit: int | None) -> list[JournalEntry]:
        return [JournalEntry.model_validate(e) for e in self.plane.store.history(run_id, limit)]

    def op_store(self, request: StoreRequest) -> tuple[StoreAnswer, Outgoing]:
        self.plane.flush()  # so a reader sees every record received so far
        return StoreAnswer(path=str(self.plane.store.path)), []

    # --- changes ----------------------------------------------------------

    def op_set_lr(self, request: SetLRRequest) -> tuple[CommandAnswer, Outgoing]:
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
        return CommandAnswer(command=change.command), self._send(run, change)

    def op_pause(self, request: PauseRequest) -> tuple[CommandAnswer, Outgoing]:
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
        return CommandAnswer(command=change.command), self._send(run, change)

    def op_resume(self, request: ResumeRequest) -> tuple[CommandAnswer, Outgoing]:
        run = self._run(request.run)
        if run.engine.held is None:
            raise ControlError(f"run {run.run_id!r} is not held (nothing to resume)")
        self._require_live(run)
        change = run.engine.release(request.actor, self._lead(run))
        return CommandAnswer(command=change.command), self._send(run, change)

    def op_policy(self, request: PolicyRequest) -> tuple[CommandAnswer, Outgoing]:
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
        return CommandAnswer(command=change.command), self._send(run, change)


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


def summary(run: Run, now: float | None = None, silent_after: float = math.inf) -> RunSummary:
    """``now`` (the data plane's clock): ranks silent for more than
    ``silent_after`` seconds are listed as such."""
    engine = run.engine
    last = engine.last_change
    sessions = run.sessions.values()
    return RunSummary(
        run=run.run_id,
        status="active" if run.sessions else "ended",
        step=run.step,
        steps_per_s=round(sum(s.steps_per_s for s in sessions) / max(1, len(sessions)), 2),
        groups=run.group_names,
        lrs=engine.lrs,
        policy_kind=engine.spec.kind if engine.spec else None,
        held=engine.held is not None,
        ranks=sorted(run.sessions),
        world_size=run.world_size,
        lag_steps=run.step - min((s.step for s in sessions), default=run.step),
        silent=sorted(
            s.rank for s in sessions if now is not None and now - s.last_seen > silent_after
        ),
        left_out=run.reduction.left_out() if run.reduction is not None else [],
        loss_history=list(run.loss_history),
        last_change=None
        if last is None
        else LastChange(
            version=last.version,
            step=last.effective_step,
            lrs=last.lrs,
            reason=last.reason,
            actor=last.actor,
        ),
        created=run.created,
        ended=run.ended,
    )


def session_info(session: Session, run: Run | None = None, now: float | None = None) -> SessionInfo:
    reduction = run.reduction if run is not None else None
    return SessionInfo(
        rank=session.rank,
        host=session.host,
        pid=session.pid,
        sync=session.sync,
        step=session.step,
        steps_per_s=round(session.steps_per_s, 2),
        applied_version=session.applied_version,
        applied_step=session.applied_step,
        late_by=session.late_by,
        silent_s=round(max(0.0, now - session.last_seen), 3) if now is not None else 0.0,
        left_out=reduction is not None and session.rank in reduction.left_out(),
        stats={k: getattr(session.stats, k) for k in session.stats.__dataclass_fields__},
    )
