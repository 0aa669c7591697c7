"""Metrics that live on an accelerator, read without waiting for it.

``float(loss)`` on a CUDA tensor waits until the device has computed it: the
CPU, which normally runs a few steps ahead of the GPU queuing kernels, stops
at every step. A :class:`DeviceRead` instead starts a non-blocking copy of a
record's device values into pinned host memory and records an event after
it; the hook sends the record once the event has passed (a few steps later),
with its own step number, in order with the others.

Readers are kept per device type (:data:`READERS`); ``cuda`` is the one torch
gives. A value on a device with no reader here is read with ``float()``.
torch is never imported by this module: a tensor on a device means torch is
loaded already.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol


class Readback(Protocol):
    """Values on their way from a device to the host."""

    def ready(self) -> bool: ...  # without waiting

    def wait(self) -> None: ...

    def values(self) -> list[float]: ...  # once ready


class CudaReadback:
    """One record's CUDA values: stacked on the device (one small kernel),
    copied to pinned host memory without blocking, an event recorded after."""

    # Pinned host buffers by length, reused: allocating pinned memory costs
    # more than the copy itself.
    _free: ClassVar[dict[int, list[Any]]] = {}

    def __init__(self, tensors: Sequence[Any]) -> None:
        torch = sys.modules["torch"]
        device = tensors[0].device
        with torch.no_grad():
            stacked = torch.stack(
                [t.detach().reshape(()).to(device=device, dtype=torch.float64) for t in tensors]
            )
        free = self._free.setdefault(len(tensors), [])
        host = free.pop() if free else torch.empty(len(tensors), dtype=torch.float64).pin_memory()
        host.copy_(stacked, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(stacked.device))
        self._host = host
        self._stacked = stacked  # alive until the copy is done

    def ready(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> None:
        self._event.synchronize()

    def values(self) -> list[float]:
        values = self._host.tolist()
        self._free[len(values)].append(self._host)
        self._stacked = None
        return values


# Device type -> how to read a list of its 0-d tensors without waiting.
READERS: dict[str, Callable[[Sequence[Any]], Readback]] = {"cuda": CudaReadback}


def device_type(value: Any) -> str | None:
    """The device type of a tensor on a device that has a reader, else None
    (numbers, CPU tensors, devices read with float())."""
    device = getattr(value, "device", None)
    kind = getattr(device, "type", None)
    return kind if kind in READERS else None


class DeviceRead:
    """One record whose values are (partly) on a device."""

    def __init__(self, metrics: dict[str, Any]) -> None:
        self._metrics = metrics
        self._names = [name for name, value in metrics.items() if device_type(value)]
        tensors = [metrics[name] for name in self._names]
        kind = device_type(tensors[0])
        assert kind is not None, "a DeviceRead has a device value"
        self._readback = READERS[kind](tensors)

    def ready(self) -> bool:
        return self._readback.ready()

    def metrics(self, wait: bool = False) -> dict[str, float]:
        """The record's metrics as floats (waiting for the device if asked)."""
        if wait:
            self._readback.wait()
        values = dict(zip(self._names, self._readback.values()))
        return {name: values.get(name, value) for name, value in self._metrics.items()}
