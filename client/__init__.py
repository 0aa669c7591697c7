"""lrpilot: adaptive learning-rate control and telemetry for PyTorch training loops.

This package is what a training process imports. It never imports torch,
prometheus_client or grafana_client at import time.
"""

from __future__ import annotations

from .policies import Policy, PolicySpec, ScheduleExhausted, SpecError, parse_policy

__version__ = "0.1.0"

__all__ = ["Policy", "PolicySpec", "ScheduleExhausted", "SpecError", "__version__", "parse_policy"]
