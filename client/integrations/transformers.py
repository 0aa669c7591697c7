"""Hugging Face transformers: one callback puts a ``Trainer`` under lrpilot.

    from lrpilot.integrations.transformers import LRPilotCallback

    trainer = Trainer(
        model=model,
        args=TrainingArguments(..., eval_strategy="steps", eval_steps=200),
        train_dataset=train,
        eval_dataset=val,
        callbacks=[LRPilotCallback(policy={"kind": "plateau", "metric": "eval_loss"})],
    )
    trainer.train()

At train begin the callback attaches to the Trainer's optimizer and takes the
LR over from the Trainer's scheduler: that scheduler's ``step()`` does
nothing from then on and its ``get_last_lr()`` gives the LRs lrpilot set for
the optimizer's last step, so the ``learning_rate`` the Trainer logs (and
``report_to`` sends to W&B or TensorBoard) is the LR the optimizer used. The
base LRs are the ones the optimizer was built with (``args.learning_rate``),
not the 0 a warmup leaves: ``warmup_steps`` and ``lr_scheduler_type`` no
longer act; a warmup belongs in the policy (``sequential``: ``linear`` then
``plateau``). Evaluation results feed the policy (``metric``), the logged
training loss goes to the daemon as ``loss``, and the pilot's state goes in
every checkpoint's ``trainer_state.json``, so ``resume_from_checkpoint``
carries the LR schedule on where it was (docs/integrations.md).

Importing this module imports transformers; ``import lrpilot`` does not.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers import optimization as transformers_optimization
from transformers.trainer_callback import ExportableState

from ..hook import Pilot, attach, caller_stacklevel, innermost
from ..policies import PolicySpec, parse_policy

# attach()'s keyword-only arguments, which the callback passes through.
ATTACH_KWARGS = frozenset(
    name
    for name, parameter in inspect.signature(attach).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


class LRPilotCallback(TrainerCallback, ExportableState):
    """Steer a ``transformers.Trainer``'s LR with lrpilot.

    - ``policy``: a policy spec (dict or model, docs/policies.md); ``None``
      holds the optimizer's LRs until the daemon or an operator says otherwise.
    - ``metric``: the evaluation result reported to the policy after every
      evaluation, under this name (a plateau on ``"eval_loss"`` watches
      ``"eval_loss"``); ``"accuracy"`` finds the Trainer's ``eval_accuracy``.
    - ``run``: the run id; default ``$LRPILOT_RUN``, else the run a resumed
      checkpoint was part of, else what ``lrpilot.attach`` picks.
    - ``daemon``, ``sync`` and any other keyword (``on_change``,
      ``sync_timeout``, ...): as for ``lrpilot.attach``. The rank and world
      size are the Trainer's (``args.process_index``, ``args.world_size``).

    ``callback.pilot`` is the :class:`lrpilot.Pilot` of the last ``train()``
    (closed at its end; its ``stats`` stay readable).
    """

    def __init__(
        self,
        policy: Mapping[str, Any] | PolicySpec | None = None,
        metric: str = "eval_loss",
        run: str | None = None,
        daemon: str | None = None,
        sync: bool = False,
        **attach_kwargs: Any,
    ) -> None:
        unknown = sorted(set(attach_kwargs) - ATTACH_KWARGS)
        if unknown:
            raise TypeError(
                f"LRPilotCallback: unknown argument(s) {', '.join(unknown)}; "
                f"lrpilot.attach takes {', '.join(sorted(ATTACH_KWARGS))}"
            )
        if not isinstance(metric, str) or not metric:
            raise TypeError(f"LRPilotCallback: metric must be a metric's name, got {metric!r}")
        # A wrong spec fails here, where the Trainer is built, not at train begin.
        self.policy = parse_policy(policy) if policy is not None else None
        self.metric, self.run, self.daemon, self.sync = metric, run, daemon, sync
        self.attach_kwargs = attach_kwargs
        self.pilot: Pilot | None = None
        self._active = False  # between train begin and train end
        # The pilot's state as ExportableState hands it over: the last one
        # known once the pilot is closed (a checkpoint saved at the end).
        self.pilot_state: dict[str, Any] | None = None
        self._scheduler: Any = None
        self._scheduler_class: type | None = None
        self._used: list[Any] | None = None  # the LRs of the optimizer's last step
        self._recorder: Any = None
        self._warned: set[str] = set()
        unwatched = sorted(plateau_metrics(self.policy) - {metric, "loss"})
        if unwatched:
            self._warn(
                "unwatched",
                f"the policy's plateau watches {', '.join(unwatched)}, but the callback "
                f"reports {metric!r} (metric=) and the training 'loss' only",
            )

    # --- the Trainer's events ---------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The Trainer has its optimizer and scheduler (the scheduler has
        already set the first LRs: 0 for a warmup), and, when resuming, the
        checkpoint's optimizer state and TrainerState."""
        self._finish()  # a second train() on the same Trainer
        optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if optimizer is None:
            self._warn("no-optimizer", "the Trainer has no optimizer at train begin: not attached")
            return
        saved = self._saved_state(state) if state.global_step > 0 else None
        if state.global_step > 0 and saved is None:
            self._warn(
                "no-state",
                f"resuming at step {state.global_step} from a checkpoint without lrpilot's "
                "state: the policy starts from its step 0",
            )
        if scheduler is not None:
            # Undo what the scheduler wrote at its construction (a warmup's
            # 0): the groups hold the LRs they were built with, which are
            # then lrpilot's base LRs, with or without a policy.
            for group in innermost(optimizer).param_groups:
                if "initial_lr" in group:
                    group["lr"] = group["initial_lr"]
        kwargs_ = {
            "rank": args.process_index,
            "world_size": args.world_size,
            **self.attach_kwargs,
        }
        run = self.run or os.environ.get("LRPILOT_RUN") or (saved or {}).get("run") or None
        pilot = attach(
            optimizer, run=run, policy=self.policy, daemon=self.daemon, sync=self.sync, **kwargs_
        )
        self.pilot, self._active = pilot, True
        if saved is not None:
            pilot.load_state_dict(saved)
        self._used = None
        # Registered after the pilot's own pre-hook, so it sees what the step
        # uses: the pilot's LRs, commands due at that step applied.
        inner = innermost(optimizer)
        register = getattr(inner, "register_step_pre_hook", None)
        self._recorder = register(self._record_used) if callable(register) else None
        if scheduler is not None:
            self._take_over(scheduler, inner)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer passes callbacks no loss: the step record carries none;
        # the logged loss follows in on_log.
        if self._active and self.pilot is not None:
            self.pilot.step()

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A micro-batch the optimizer did not step on (gradient accumulation):
        # not a step for the pilot, but a look at the daemon, as a loop that
        # calls pilot.step() every batch gives it, so a command (the one a
        # resumed run's hello gets back) is in before the next real step.
        if self._active and self.pilot is not None:
            self.pilot.step()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # The training loss as the Trainer logs it (the mean since the last
        # log, every logging_steps): the daemon shows it next to the LR, and
        # a plateau on "loss" can act on it. Evaluation logs say eval_loss,
        # the summary at the end train_loss: neither is this.
        loss = (logs or {}).get("loss")
        if self._active and self.pilot is not None and is_number(loss):
            self.pilot.report(loss=loss)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._active or self.pilot is None:  # trainer.evaluate() outside train()
            return
        metrics = metrics or {}
        value = metrics.get(self.metric, metrics.get(f"eval_{self.metric}"))
        if is_number(value):
            self.pilot.report(**{self.metric: value})
        else:
            self._warn(
                "no-metric",
                f"the evaluation gave no number for {self.metric!r} (it has "
                f"{', '.join(sorted(metrics)) or 'nothing'}): nothing is reported to the policy",
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._finish()

    # --- ExportableState: the pilot in every checkpoint ---------------------

    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` holds of this callback: its arguments
        (a checkpoint holds JSON: not ``on_change``, and a ``keys`` path as
        text) and the pilot's state, which a resume loads."""
        if self._active and self.pilot is not None:
            self.pilot_state = self.pilot.state_dict()
        return {
            "args": {
                "policy": self.policy.model_dump() if self.policy is not None else None,
                "metric": self.metric,
                "run": self.run,
                "daemon": self.daemon,
                "sync": self.sync,
                **{k: as_json(v) for k, v in self.attach_kwargs.items() if not callable(v)},
            },
            "attributes": {"pilot_state": self.pilot_state},
        }

    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        """The pilot's state in the checkpoint being resumed: the Trainer
        loads ``trainer_state.json`` whether or not it restores callbacks
        (``restore_callback_states_from_checkpoint``), so it is read from
        there either way."""
        # Annotated as a list of callbacks; after __post_init__ and in a
        # loaded checkpoint it is a dict by class name.
        callbacks: Any = state.stateful_callbacks
        stored = callbacks.get(type(self).__name__) if isinstance(callbacks, dict) else None
        entries = stored if isinstance(stored, list) else [stored]
        found = [
            e["attributes"]["pilot_state"]
            for e in entries
            if isinstance(e, dict)
            and isinstance((e.get("attributes") or {}).get("pilot_state"), dict)
        ]
        if self.run is not None:
            # Several LRPilotCallbacks on one Trainer: this one's run.
            found = [s for s in found if s.get("run") == self.run] or found
        return found[-1] if found else None

    # --- the Trainer's scheduler ------------------------------------------

    def _take_over(self, scheduler: Any, optimizer: Any) -> None:
        """The Trainer steps its scheduler after every optimizer step and
        logs its ``get_last_lr()``: from now on the step does nothing (it
        would fight lrpilot for the LR) and ``get_last_lr()`` gives the LRs
        of the optimizer's last step, as a torch scheduler does."""
        original = type(scheduler)
        callback = self

        def step(self: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def get_last_lr(self: Any) -> list[Any]:
            used = callback._used
            return list(used) if used is not None else [g["lr"] for g in optimizer.param_groups]

        namespace: dict[str, Any] = {
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "step": step,
            "get_last_lr": get_last_lr,
        }
        # A class of this one object's own: no attribute is added to the
        # scheduler (its state_dict(), saved in every checkpoint as
        # scheduler.pt, is its __dict__). A subclass of its class, so that
        # isinstance checks still see what it is; except for the schedulers
        # the Trainer steps after an evaluation and whose LR it logs from
        # the param groups (where lrpilot has already put the next step's):
        # those become a sibling, which it treats as any other scheduler.
        metric_driven = next((c for c in original.__mro__ if c in metric_driven_classes()), None)
        if metric_driven is None:
            bases: tuple[type, ...] = (original,)
        else:
            bases = metric_driven.__bases__
            for name in ("state_dict", "load_state_dict"):  # scheduler.pt as before
                if hasattr(original, name):
                    namespace[name] = getattr(original, name)
        if any(getattr(base, "__dictoffset__", 0) for base in bases):
            # The same layout as the scheduler's class: __class__ can change.
            namespace["__slots__"] = ()
        try:
            scheduler.__class__ = type(original.__name__, bases, namespace)
        except TypeError as exc:
            self._warn(
                "scheduler",
                f"could not take the LR over from the Trainer's {original.__name__} ({exc}): "
                "it goes on setting the LR, lrpilot puts its own back before every step "
                "(pilot.stats.foreign_lr_writes), and the logged learning_rate is the scheduler's",
            )
            return
        self._scheduler, self._scheduler_class = scheduler, original

    def _record_used(self, optimizer: Any, *_: Any) -> None:
        # A tensor LR (capturable optimizers) is one the pilot later fills
        # in place: keep this step's value (a copy on the device, no wait).
        self._used = [
            g["lr"].clone() if hasattr(g["lr"], "clone") else g["lr"]
            for g in optimizer.param_groups
        ]

    def _finish(self) -> None:
        """Close the pilot and give the scheduler its own class back."""
        if self._scheduler is not None and self._scheduler_class is not None:
            self._scheduler.__class__ = self._scheduler_class
        self._scheduler = self._scheduler_class = None
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        if self._active and self.pilot is not None:
            self.pilot_state = self.pilot.state_dict()
            self.pilot.close()
        self._active = False

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"lrpilot: LRPilotCallback: {message}",
                RuntimeWarning,
                stacklevel=caller_stacklevel(),
            )


def as_json(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def is_number(value: Any) -> bool:
    """A metric value the pilot takes (NaN included: a training event)."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def metric_driven_classes() -> tuple[type, ...]:
    """The schedulers the Trainer steps on an evaluation's metric and reads
    the logged LR of from the param groups (``Trainer._get_learning_rate``)."""
    # torch is never imported by lrpilot: transformers has loaded it.
    torch_schedulers = sys.modules.get("torch.optim.lr_scheduler")
    found = (
        getattr(torch_schedulers, "ReduceLROnPlateau", None),
        getattr(transformers_optimization, "GreedyLR", None),  # transformers >= 5
    )
    return tuple(c for c in found if isinstance(c, type))


def plateau_metrics(spec: PolicySpec | None) -> set[str]:
    """The metrics a policy's plateau stages watch."""
    if spec is None:
        return set()
    found = {getattr(spec, "metric", "")} if spec.kind == "plateau" else set()
    for stage in getattr(spec, "policies", ()):
        found |= plateau_metrics(stage)
    return found


__all__ = ["LRPilotCallback"]
