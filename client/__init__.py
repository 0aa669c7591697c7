"""lrpilot: adaptive learning-rate control and telemetry for PyTorch training loops.

    pilot = lrpilot.attach(optimizer, run="resnet-42", policy={"kind": "plateau"})
    for batch in loader:
        ...; optimizer.step()
        pilot.step(loss=loss.item())

This package is what a training process imports. It never imports torch,
prometheus_client or grafana_client (the hook duck-types ``param_groups``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .hook import Pilot, attach
from .policies import Policy, PolicySpec, ScheduleExhausted, SpecError, parse_policy

__all__ = [
    "Pilot",
    "Policy",
    "PolicySpec",
    "ScheduleExhausted",
    "SpecError",
    "__version__",
    "attach",
    "parse_policy",
]
