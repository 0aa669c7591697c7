"""The one base class of the errors a user sees.

An ``LRPilotError``'s message is one line that names what is wrong (a field,
a flag, a file, a run) and, where there is one, what to do. The command line
prints it as that line and exits 1; any other exception out of lrpilot is a
bug, and shows its traceback. Each subclass also derives from the builtin
that describes it (``ValueError`` for bad input), so ``except ValueError``
in existing code keeps working.
"""

from __future__ import annotations


class LRPilotError(Exception):
    """An error for the user: one line, naming what is wrong."""


class UsageError(LRPilotError, ValueError):
    """An argument lrpilot cannot use (``attach()``'s, a state dict's)."""
