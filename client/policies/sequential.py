"""``sequential``: run policies one after another, switching at milestone
steps (torch's ``SequentialLR``); the usual "warmup, then a schedule".

Stage ``i`` runs from ``milestones[i - 1]`` (or 0) until ``milestones[i]``.
At milestone ``m`` the next stage starts from the original base LRs at its own
step 0, so global step ``t`` is its local step ``t - m``; until then the
earlier stage's last LRs hold.

Beyond torch, a stage may be ``plateau`` (torch's SequentialLR refuses
ReduceLROnPlateau): the plateau stage starts at its milestone from the
original base LRs with a fresh state (no best value, no bad steps, no
cooldown), and watches its metric from the record after the milestone on
(the milestone record is its step 0, like every other stage's). A plateau
stage that is not the last one is left at the next milestone like any stage.

Where torch differs: a ``cyclic`` first stage or any ``onecycle`` stage
overwrites torch's ``initial_lr``, so there other stages start from that LR
rather than the original base LRs. lrpilot always uses the original base LRs.

    spec = SequentialSpec(
        policies=[{"kind": "linear", "start_factor": 0.01, "total_iters": 500},
                  {"kind": "cosine", "T_max": 9500}],
        milestones=[500])
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from .base import (
    BadValue,
    Decision,
    Gauge,
    Policy,
    PolicySpec,
    PositiveInt,
    SpecError,
    an_object,
    check_base_lrs,
    count,
    fields,
    group_floats,
    optional,
)
from .cosine import CosineSpec
from .cosine_restarts import CosineRestartsSpec
from .cyclic import CyclicSpec
from .exponential import ExponentialSpec
from .linear import LinearSpec
from .multistep import MultiStepSpec
from .onecycle import OneCycleSpec
from .plateau import PlateauSpec
from .step import StepSpec

# Every kind but sequential itself, in the order docs and errors list them.
STAGE_SPECS: tuple[type[PolicySpec], ...] = (
    PlateauSpec,
    CyclicSpec,
    CosineRestartsSpec,
    CosineSpec,
    StepSpec,
    MultiStepSpec,
    ExponentialSpec,
    LinearSpec,
    OneCycleSpec,
)
if TYPE_CHECKING:  # mypy cannot read a Union built from a tuple at runtime
    StageSpec = PolicySpec
else:
    StageSpec = Annotated[Union[STAGE_SPECS], Field(discriminator="kind")]  # noqa: UP007


class SequentialSpec(PolicySpec):
    kind: Literal["sequential"] = "sequential"
    policies: list[StageSpec] = Field(min_length=1)
    milestones: list[PositiveInt]

    @model_validator(mode="after")
    def _milestones_fit(self) -> SequentialSpec:
        if len(self.milestones) != len(self.policies) - 1:
            raise ValueError(
                f"milestones: expected {len(self.policies) - 1} (one fewer than policies), "
                f"got {len(self.milestones)}"
            )
        for before, after in zip(self.milestones, self.milestones[1:]):
            if after <= before:
                raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
        return self

    def build(self, base_lrs: Sequence[float]) -> SequentialPolicy:
        return SequentialPolicy(self, base_lrs)

    def reduced_metrics(self) -> dict[str, str]:
        # Every stage's: the records a later stage decides on are reduced
        # from the start (a stage's first records count too).
        reduced: dict[str, str] = {}
        for stage in self.policies:
            for name, how in stage.reduced_metrics().items():
                reduced.setdefault(name, how)
        return reduced


class SequentialPolicy(Policy):
    # Its own, and whatever its stages export (the one in effect fills them).
    GAUGES = (Gauge("stage", "gauge", "the index of the stage in effect"),)

    def gauges(self) -> dict[str, float]:
        return {"stage": self.index, **self.stage.gauges()}

    spec: SequentialSpec
    STATE = fields(
        last_epoch=count(),
        index=count(high=lambda policy: len(policy.spec.policies) - 1),
        held_momenta=optional(group_floats()),
        stage=an_object,  # the stage's own policy checks it, in load_state_dict
    )

    def __init__(self, spec: SequentialSpec, base_lrs: Sequence[float]) -> None:
        self.spec = spec
        self.base_lrs = check_base_lrs(base_lrs)
        # Building every stage now checks each against the group count up
        # front, as torch does by constructing every scheduler.
        stages = [stage.build(self.base_lrs) for stage in spec.policies]
        self.last_epoch = 0
        self.index = 0
        self.stage = stages[0]
        # Momentum, when a stage cycles it, holds between such stages. Before
        # the first one runs, it is what torch leaves in the groups: the
        # first stage's, else that of the last momentum stage constructed.
        with_momenta = [s.momenta for s in stages if s.momenta is not None]
        self.held_momenta = stages[0].momenta or (with_momenta[-1] if with_momenta else None)
        self.cycles_momentum = bool(with_momenta)

    @property
    def lrs(self) -> list[float]:  # type: ignore[override]
        return self.stage.lrs

    @property
    def decided(self) -> Decision | None:  # type: ignore[override]
        return self.stage.decided

    @property
    def momenta(self) -> list[float] | None:  # type: ignore[override]
        return self.stage.momenta if self.stage.momenta is not None else self.held_momenta

    def _advance(self, metrics: Mapping[str, float]) -> None:
        self.last_epoch += 1
        index = self.stage_at(self.last_epoch)
        if index != self.index:
            self.held_momenta = self.momenta
            self.index = index
            self.stage = self.spec.policies[index].build(self.base_lrs)
        else:
            self.stage.step(metrics)

    def stage_at(self, step: int) -> int:
        return bisect.bisect_right(self.spec.milestones, step)

    def observe(self, metrics: Mapping[str, float]) -> list[float]:
        # A report belongs to the record of its step. At a milestone that
        # record is the new stage's step 0, which sees no metrics.
        if self.index and self.spec.milestones[self.index - 1] == self.last_epoch:
            return list(self.stage.lrs)
        return self.stage.observe(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_epoch": self.last_epoch,
            "index": self.index,
            "held_momenta": None if self.held_momenta is None else list(self.held_momenta),
            "stage": self.stage.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        checked = self.checked_state(state)
        index = checked["index"]
        stage = self.spec.policies[index].build(self.base_lrs)
        try:
            stage.load_state_dict(checked["stage"])
        except SpecError as exc:
            raise SpecError(f"sequential state: stage {index}: {exc}") from None
        self.last_epoch, self.index, self.stage = checked["last_epoch"], index, stage
        self.held_momenta = checked["held_momenta"]

    def check_state(self, state: Mapping[str, Any]) -> None:
        index, last_epoch = state["index"], state["last_epoch"]
        if index != self.stage_at(last_epoch):
            raise BadValue(
                f"index must be {self.stage_at(last_epoch)}, the stage at last_epoch "
                f"{last_epoch}, got {index}"
            )
        # Momentum, where a stage has it, is held from the start (see __init__).
        if self.cycles_momentum and state["held_momenta"] is None:
            raise BadValue("held_momenta must be a list, one per param group: a stage cycles it")
        if not self.cycles_momentum and state["held_momenta"] is not None:
            raise BadValue("held_momenta must be null: no stage cycles momentum")
