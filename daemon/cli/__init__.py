"""The ``lrpilot`` command line: the argument parser and entry point (main),
the operator's commands over the control plane (operations), the live view
(top), the demo, and the offline replay (simulate)."""

from .main import main

__all__ = ["main"]
