"""The control plane: what the daemon does with an operator's request
(``lrpilot runs``, ``show``, ``set-lr``, ``policy``, ``range-test``,
``pause``, ``resume``, ``history``). The requests, answers and their bounds are the control
protocol's (daemon/control_protocol.py); this module answers them.

Each change is validated before anything moves, journaled, and sent to every
rank of the run as a command scheduled a little ahead (about 200 ms of the
run's steps), so all ranks apply it at the same step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from lrpilot.policies import (
    PolicySpec,
    RangeTestPolicy,
    ScheduleExhausted,
    SpecError,
    parse_policy,
)

from ..control_protocol import (
    LR_RULE,
    MAX_POLICY_BYTES,
    POLICY_RULE,
    SWEEP_FIELDS,
    Answer,
    CommandAnswer,
    ControlError,
    HistoryAnswer,
    HistoryRequest,
    JournalEntry,
    LastChange,
    PauseRequest,
    PolicyRequest,
    RangeTestRequest,
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
from .engine import Change, PolicyEngine
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

    @staticmethod
    def _refuse_during_sweep(run: Run, what: str) -> None:
        """A hold during a range test's sweep would keep its end (the
        suggestion, with the curve) from being sent and journaled, and the
        parameters from being put back until a resume: refused. A switch
        (`lrpilot policy`) is how to stop a sweep."""
        sweeping = range_test_sweeping(run.engine)
        if sweeping:
            raise ControlError(
                f"{what}: run {run.run_id!r} is in a range test ({sweeping}); a hold would keep "
                "its end and its curve from the journal: wait for it to end, or stop it with "
                "`lrpilot policy` (the parameters are put back)"
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
        self._refuse_during_sweep(run, "set-lr")
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
        self._refuse_during_sweep(run, "pause")
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

    def op_range_test(self, request: RangeTestRequest) -> tuple[CommandAnswer, Outgoing]:
        """Switch the run to a ``range_test`` built from the operator's
        fields; what follows the sweep is ``then`` when given, else the
        run's policy: from the suggestion, or with ``suggest_only`` where it
        stood (its base LRs and state as of now)."""
        sweep = request.sweep
        unknown = [name for name in sweep if name not in SWEEP_FIELDS]
        if unknown:
            raise ControlError(
                f"sweep: unknown field {unknown[0][:40]!r} (fields: {', '.join(SWEEP_FIELDS)})"
            )
        problem = policy_problem(sweep)
        if problem:
            raise ControlError(f"sweep: {problem}")
        if request.suggest_only and "then" in sweep:
            raise ControlError(
                "sweep: then and suggest_only are two ends: suggest_only goes back to the "
                "run's policy where it stood, then switches to another"
            )
        run = self._run(request.run)
        engine = run.engine
        if engine.held is not None:
            raise ControlError(
                f"run {run.run_id!r} is held by an operator at {engine.held} (set-lr or pause): "
                "resume first, then start the range test"
            )
        sweeping = range_test_sweeping(engine)
        if sweeping:
            raise ControlError(
                f"run {run.run_id!r} is already in a range test, sweeping ({sweeping}); "
                "wait for its end"
            )
        then, then_base_lrs, then_state = policy_after(engine)
        spec: dict[str, Any] = {"kind": "range_test", **sweep}
        if request.suggest_only:
            spec.update(
                suggest_only=True,
                then=then.model_dump() if then is not None else None,
                then_base_lrs=then_base_lrs,
                then_state=then_state,
            )
        elif "then" not in sweep:
            spec["then"] = then.model_dump() if then is not None else None
        size = len(json.dumps(spec, separators=(",", ":")).encode())
        if size > MAX_POLICY_BYTES:
            raise ControlError(
                f"range test: {POLICY_RULE} (with the policy that follows), got {size} bytes"
            )
        built = try_policy(spec, engine.lrs)
        self._require_live(run)
        change = engine.switch(built, range_test_reason(built), request.actor, self._lead(run))
        return CommandAnswer(command=change.command), self._send(run, change)


def range_test_sweeping(engine: PolicyEngine) -> str:
    """Where the run's range test is (``step 37 of 100``) while it sweeps;
    empty when the run's policy is not a range test that has not ended."""
    policy = engine.policy
    if not isinstance(policy, RangeTestPolicy) or policy.phase != "sweep":
        return ""  # read off the policy: its state_dict() would copy the curve
    return f"step {policy.sweep_step} of {policy.spec.steps}"


def policy_after(
    engine: PolicyEngine,
) -> tuple[PolicySpec | None, list[float], dict[str, Any] | None]:
    """The run's policy as a range test's ``then``: its spec (None: constant
    LRs), the base LRs it was built from and its state now. A run whose
    policy is a range test that has ended gives the policy that followed it."""
    spec, policy = engine.spec, engine.policy
    if spec is None or policy is None:
        return None, engine.lrs, None
    if isinstance(policy, RangeTestPolicy):
        if policy.then is None or policy.spec.then is None:
            return None, engine.lrs, None
        _, base, _ = policy.then_at(policy.suggested_lr)
        return policy.spec.then, list(base), policy.then.state_dict()
    return spec, list(engine.base_lrs), policy.state_dict()


def range_test_reason(spec: Any) -> str:
    """``range test: lr 1e-07 -> 1 over 100 steps (exponential), then cosine``."""
    then = spec.then.kind if spec.then is not None else None
    if spec.suggest_only:
        after = (
            f"then back to {then} where it stood" if then else "then back to the LRs of now"
        ) + " (suggest only)"
    else:
        after = (
            f"then {then} from the suggestion" if then else "then the LRs held at the suggestion"
        )
    restore = "" if spec.restore else "; the sweep's updates are kept (no restore)"
    return (
        f"range test: lr {spec.min_lr:g} -> {spec.max_lr:g} over {spec.steps} steps "
        f"({spec.mode}), {after}{restore}"
    )


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
