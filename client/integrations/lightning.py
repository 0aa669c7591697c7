"""Lightning: ``Trainer(callbacks=[LRPilotCallback(policy=..., monitor="val_loss")])``.

The callback attaches lrpilot to the trainer's optimizer when fitting starts,
gives the pilot each batch's training loss and, after each validation, the
monitored metric; its state rides in Lightning's checkpoints, so a resumed fit
goes on with the LRs of the uninterrupted one. See docs/integrations.md.

Importing this module imports ``lightning``; ``import lrpilot`` does not.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from types import FrameType
from typing import Any

import lightning.pytorch as pl

from ..errors import UsageError
from ..hook import Pilot, attach, check_run_id, default_run_id
from ..policies import PolicySpec, parse_policy

__all__ = ["LRPilotCallback"]


class LRPilotCallback(pl.Callback):
    """lrpilot for a Lightning fit, in one line.

    - ``policy``: a policy spec (dict or model, docs/policies.md); ``None``
      holds the LRs configure_optimizers gave until the daemon or an operator
      says otherwise.
    - ``monitor``: the logged metric (``trainer.callback_metrics``) reported
      after each validation, what metric-driven policies decide on; ``None``
      reports nothing.
    - ``run``: the run id; default: the one in the checkpoint a fit resumes
      from, else ``$LRPILOT_RUN``, else rank 0's host-pid-time (every rank
      gets rank 0's).
    - ``daemon``, ``sync`` and ``**attach_kwargs`` (``sync_timeout``,
      ``max_queue``, ``on_change``, ``steps``) go to :func:`lrpilot.attach`;
      rank and world size are the trainer's.
    """

    def __init__(
        self,
        policy: Mapping[str, Any] | PolicySpec | None = None,
        monitor: str | None = "val_loss",
        run: str | None = None,
        daemon: str | None = None,
        sync: bool = False,
        **attach_kwargs: Any,
    ) -> None:
        # A ValueError here beats one at fit start: no data loaded, no model built.
        taken = sorted({"rank", "world_size"} & attach_kwargs.keys())
        if taken:
            raise UsageError(
                f"LRPilotCallback: {', '.join(taken)} come from the trainer "
                "(trainer.global_rank, trainer.world_size); do not pass them"
            )
        if run is not None:
            check_run_id(run)
        self.spec = parse_policy(policy) if policy is not None else None
        self.monitor = monitor
        self.run = run
        self.daemon = daemon
        self.sync = sync
        self.attach_kwargs = attach_kwargs
        # The last pilot this callback attached (closed after the fit, its
        # stats still readable); None before the first fit starts.
        self.pilot: Pilot | None = None
        self._attached = False
        # A checkpoint's state that came before the pilot could take it.
        self._restored: dict[str, Any] | None = None
        self._final: dict[str, Any] | None = None  # the state at the last close
        self._warned: set[str] = set()

    # --- fitting starts -----------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup(): the strategy has just built the optimizers
        # (strategy.setup), and the checkpoint's optimizer state is loaded
        # only later (restore_training_state), so the groups still hold
        # configure_optimizers' LRs, the base LRs a policy starts from.
        self._close()  # a fit before this one that ended unseen: its rank is this one's
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise UsageError(
                f"LRPilotCallback steers one optimizer; configure_optimizers gave "
                f"{len(optimizers)}. Attach lrpilot yourself with lrpilot.attach(optimizer, "
                "run=...) per optimizer, each its own run (docs/hook.md)"
            )
        schedulers = trainer.lr_scheduler_configs
        if schedulers:
            # Refused rather than warned: lrpilot puts its own LR back over
            # every write the scheduler makes, so the scheduler would only
            # look as if it ran (its state saved in checkpoints, its LRs in
            # no step). Refused at fit start, nothing is lost but the start.
            names = ", ".join(type(config.scheduler).__name__ for config in schedulers)
            raise UsageError(
                f"LRPilotCallback: configure_optimizers also returns an LR scheduler ({names}); "
                "lrpilot sets the LR and would override it at every step. Return only the "
                "optimizer and give the scheduler's settings to the policy: ReduceLROnPlateau("
                "factor=0.5, patience=3) is {'kind': 'plateau', 'metric': 'val_loss', "
                "'factor': 0.5, 'patience': 3} (docs/policies.md)"
            )
        self._check_monitor()
        self.pilot = attach(
            optimizers[0],
            run=self._run_id(trainer),
            policy=self.spec,
            daemon=self.daemon,
            sync=self.sync,
            # Lightning's DDP launcher sets no $RANK; the trainer knows, and
            # two ranks that both said 0 would be refused as one (rank_taken).
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            **self.attach_kwargs,
        )
        self._attached = True
        self._final = None

    def _run_id(self, trainer: pl.Trainer) -> str:
        if self.run is not None:
            return self.run
        restored = (self._restored or {}).get("run")
        if isinstance(restored, str):
            return restored  # every rank loaded the same checkpoint
        # Each rank would make its own host-pid-time id: rank 0's for all.
        return trainer.strategy.broadcast(default_run_id(), src=0)

    def _check_monitor(self) -> None:
        watched = plateau_metrics(self.spec)
        # "loss" is in every step's record; anything else must be reported.
        missing = sorted(watched - {"loss", self.monitor})
        if missing:
            self._warn_once(
                "monitor",
                f"the policy decides on {', '.join(map(repr, missing))} but the callback "
                f"reports {self.monitor!r} after validation: set monitor= to the policy's metric",
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After restore_training_state: the optimizer's param groups are the
        # checkpoint's now, and load_state_dict writes lrpilot's LRs into
        # them before anything (LearningRateMonitor at batch start) reads them.
        if not self._attached or self.pilot is None:
            return
        if self._restored is not None:
            self.pilot.load_state_dict(self._restored)
            self._restored = None
        elif trainer.ckpt_path is not None:
            self._warn_once(
                "no-state",
                f"resuming from {trainer.ckpt_path}, which holds no LRPilotCallback state: "
                "the policy starts again from step 0 and the base LRs",
            )

    # --- training -------------------------------------------------------------

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._attached or self.pilot is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is None or isinstance(loss, (str, bytes)):
            self.pilot.step()  # training_step returned None: Lightning skipped the step
            return
        accumulate = trainer.accumulate_grad_batches
        if pl_module.automatic_optimization and accumulate > 1:
            # Lightning hands callbacks the loss it backpropagated, divided by
            # accumulate_grad_batches; the batch's own loss is what the pilot
            # averages over the batches of one optimizer step.
            loss = loss * accumulate
        self.pilot.step(loss=loss)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Sanity-check metrics come from an untrained model on two batches:
        # a plateau policy must not count them as its first "best".
        if not self._attached or self.pilot is None or trainer.sanity_checking:
            return
        if self.monitor is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            known = ", ".join(sorted(trainer.callback_metrics)) or "none"
            self._warn_once(
                "no-metric",
                f"monitor {self.monitor!r} is not among the logged metrics after validation "
                f"(logged: {known}); nothing is reported. Log it with self.log({self.monitor!r}, "
                "...) in validation_step, or set monitor=",
            )
            return
        self.pilot.report(**{self.monitor: value})

    # --- the end --------------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def _close(self) -> None:
        if not self._attached or self.pilot is None:
            return
        self._attached = False
        if self._restored is not None:
            # A resume that never trained (its checkpoint already at
            # max_epochs: Lightning skips on_train_start). Loaded now, the
            # pilot's goodbye is at the checkpoint's step; otherwise the
            # daemon would hear the run start again from step 0.
            self.pilot.load_state_dict(self._restored)
            self._restored = None
        # A checkpoint written after the fit (trainer.save_checkpoint) still
        # carries where the LR schedule stood.
        self._final = self.pilot.state_dict()
        self.pilot.close()

    # --- checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._attached and self.pilot is not None:
            return {"pilot": self.pilot.state_dict()}
        state = self._final or self._restored
        return {"pilot": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("pilot")
        if not isinstance(state, Mapping):
            raise UsageError("LRPilotCallback: the checkpoint's callback state has no pilot state")
        # Lightning restores callbacks before on_fit_start for most
        # strategies (after it for FSDP, DeepSpeed, ModelParallel): either
        # way the pilot takes it in on_train_start, once the optimizer's own
        # state is back.
        self._restored = dict(state)
        pilot = self.pilot
        if (
            self._attached
            and pilot is not None
            and self.run is None
            and state.get("run") not in (None, pilot.run)
        ):
            self._warn_once(
                "run-id",
                f"the checkpoint is of run {state.get('run')!r}, but this strategy restores "
                f"callbacks after the optimizer is set up: the fit goes on as run {pilot.run!r}. "
                "Pass run= to keep one run id across resumes",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"lrpilot: {message}", RuntimeWarning, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The stacklevel of the first frame outside lrpilot and Lightning (the
    user's ``trainer.fit(...)``): callbacks run deep inside the trainer."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("lrpilot", "lightning")
    ):
        frame = frame.f_back
        level += 1
    return level


def plateau_metrics(spec: PolicySpec | None) -> set[str]:
    """The metrics a policy's plateau stages decide on."""
    if spec is None:
        return set()
    found = {getattr(spec, "metric", "loss")} if spec.kind == "plateau" else set()
    for stage in getattr(spec, "policies", ()):
        found |= plateau_metrics(stage)
    return found
