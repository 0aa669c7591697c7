"""The judge for the policy parity tests: torch's own schedulers, driven the way
``lrpilot simulate`` drives a policy (docs/policies.md, "The replay contract").

``TorchReference(config, base_lrs)`` builds an optimizer with one param group
per base LR (SGD with momentum 0.9, or Adam) and the torch scheduler that the
policy config mirrors, with the very same field values. ``lrs()`` and
``momenta()`` read what torch leaves in the optimizer; ``step(record)`` is one
record: ``scheduler.step()`` for the step-driven kinds, ``scheduler.step(value)``
for ``plateau`` when the record carries the watched metric, nothing otherwise.

torch warns that ``scheduler.step()`` runs before ``optimizer.step()``; there
is no training here, so those UserWarnings are silenced around every call.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import lr_scheduler

SCHEDULERS: dict[str, type] = {
    "plateau": lr_scheduler.ReduceLROnPlateau,
    "cyclic": lr_scheduler.CyclicLR,
    "cosine_restarts": lr_scheduler.CosineAnnealingWarmRestarts,
    "cosine": lr_scheduler.CosineAnnealingLR,
    "step": lr_scheduler.StepLR,
    "multistep": lr_scheduler.MultiStepLR,
    "exponential": lr_scheduler.ExponentialLR,
    "linear": lr_scheduler.LinearLR,
    "onecycle": lr_scheduler.OneCycleLR,
}

SGD_MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)


def make_optimizer(base_lrs: list[float], optimizer: str = "sgd") -> torch.optim.Optimizer:
    """One param group per base LR, each with its own ``lr``."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base_lrs]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=base_lrs[0], momentum=SGD_MOMENTUM)
    if optimizer == "adam":
        return torch.optim.Adam(groups, lr=base_lrs[0], betas=ADAM_BETAS)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def initial_momentum(optimizer: str) -> float:
    """The momentum (SGD) or beta1 (Adam) a group has before any scheduler touches it."""
    return SGD_MOMENTUM if optimizer == "sgd" else ADAM_BETAS[0]


def _kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The policy fields as torch keyword arguments (same names; lists copied)."""
    out = {}
    for name, value in config.items():
        if name in ("kind", "metric"):
            continue
        out[name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def make_scheduler(optimizer: torch.optim.Optimizer, config: Mapping[str, Any]) -> Any:
    kind = config["kind"]
    if kind == "sequential":
        stages = [make_scheduler(optimizer, stage) for stage in config["policies"]]
        return lr_scheduler.SequentialLR(
            optimizer, schedulers=stages, milestones=list(config["milestones"])
        )
    return SCHEDULERS[kind](optimizer, **_kwargs(config))


class TorchReference:
    """A torch optimizer plus scheduler, stepped one record at a time."""

    def __init__(
        self, config: Mapping[str, Any], base_lrs: list[float], optimizer: str = "sgd"
    ) -> None:
        if config["kind"] == "guard":
            config = config["inner"]  # a guard that does not trip is its inner policy
        self.config = config
        self.kind = config["kind"]
        self.metric = config.get("metric", "loss")
        self.optimizer_name = optimizer
        self.optimizer = make_optimizer(list(base_lrs), optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scheduler = make_scheduler(self.optimizer, config)

    def step(self, record: Mapping[str, float] | None = None) -> list[float]:
        """One record; returns ``get_last_lr()`` after it."""
        record = record or {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.kind == "plateau":
                if self.metric in record:
                    self.scheduler.step(record[self.metric])
            else:
                self.scheduler.step()
        return self.lrs()

    def lrs(self) -> list[float]:
        return [float(lr) for lr in self.scheduler.get_last_lr()]

    def momenta(self) -> list[float]:
        """Each group's ``momentum`` (SGD) or ``betas[0]`` (Adam), as torch left it."""
        groups = self.optimizer.param_groups
        if self.optimizer_name == "adam":
            return [float(group["betas"][0]) for group in groups]
        return [float(group["momentum"]) for group in groups]


def torch_trace(
    config: Mapping[str, Any],
    base_lrs: list[float],
    records: list[Mapping[str, float]],
    optimizer: str = "sgd",
) -> list[tuple[list[float], list[float]]]:
    """``(lrs, momenta)`` after construction and after each record."""
    ref = TorchReference(config, base_lrs, optimizer)
    out = [(ref.lrs(), ref.momenta())]
    for record in records:
        ref.step(record)
        out.append((ref.lrs(), ref.momenta()))
    return out
