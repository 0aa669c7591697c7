"""The copy of the training state an LR range test puts back when it ends.

A ``range_test`` sweeps the LR up until the loss blows up: the updates it
makes are not ones to keep. While a policy says it is ``sweeping`` the hook
holds one copy of what the updates change, taken before the sweep's first
update and put back, in place, before the first update after it. Every rank
applies the commands that start and end a sweep at the same step, so every
rank copies and restores at the same step.

What is copied: every parameter of the optimizer's param groups, the
optimizer's state (``state_dict()``: Adam's moments and step counts, SGD's
momentum buffers), and, when ``attach(model=...)`` was given, the model's
buffers (BatchNorm's running statistics), which no optimizer holds. The copy
lives on the tensors' own devices: a GPU run pays, in GPU memory, one more
set of parameters plus the optimizer's state (for Adam, about three times the
parameters' bytes) for as long as the sweep runs. ``nbytes`` says how much.

Not covered: optimizers whose ``state_dict()`` is not the whole state (ZeRO,
FSDP's sharded optimizers), and gradients (the next backward writes them).
"""

from __future__ import annotations

import copy
from typing import Any


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (nested dicts, lists, tuples)."""
    if hasattr(value, "element_size") and hasattr(value, "nelement"):
        return int(value.element_size() * value.nelement())
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class SweepCopy:
    """One copy of the parameters, the optimizer's state and the model's
    buffers, taken at construction; :meth:`restore` writes it back in place."""

    def __init__(self, optimizer: Any, model: Any = None) -> None:
        # Tensor methods only: lrpilot never imports torch (detach() keeps
        # autograd out of the copy and of the in-place write back).
        self._optimizer = optimizer
        self._params = [
            (p, p.detach().clone()) for group in optimizer.param_groups for p in group["params"]
        ]
        # state_dict() hands out the live state tensors: deepcopy clones them.
        self._state = copy.deepcopy(optimizer.state_dict())
        self._buffers = (
            [(b, b.detach().clone()) for b in model.buffers()] if model is not None else []
        )
        self.nbytes = (
            sum(tensor_bytes(saved) for _, saved in self._params)
            + tensor_bytes(self._state)
            + sum(tensor_bytes(saved) for _, saved in self._buffers)
        )

    def restore(self) -> None:
        """Parameters, buffers and optimizer state as they were when copied.
        The param groups' hyperparameters come back too; the hook writes its
        LRs over them right after."""
        for live, saved in (*self._params, *self._buffers):
            live.detach().copy_(saved)
        # load_state_dict keeps references to the tensors it is given: this
        # copy is not used again, so it may have them.
        self._optimizer.load_state_dict(self._state)
        self._params, self._buffers, self._state = [], [], {}
