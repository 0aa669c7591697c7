"""When the daemon's Python garbage collector may pause the loop.

CPython's full collection walks every tracked object; with 1,000 runs and
their ranks that took ~27 ms, every ~6 s under load (bench/load.py), and a
message or an operator's request that came in meanwhile waited for it: the
p99 of every latency the load test measures.

Most of what the daemon holds lives as long as its runs. So once a second
the loop moves what survived so far out of the collector's sight
(``gc.freeze``): the automatic collections then walk only what is younger
than a second. Every ``full_every`` seconds one full collection looks at
everything again (``gc.unfreeze``, ``gc.collect``, ``gc.freeze``), so that
reference cycles among frozen objects that became garbage (a traceback kept
past its handler, say) are freed all the same, at one pause per interval.
Objects without cycles are freed by reference counting, frozen or not.
"""

from __future__ import annotations

import gc

FULL_EVERY_S = 600.0


class CollectorPacing:
    def __init__(self, full_every: float = FULL_EVERY_S) -> None:
        self.full_every = full_every
        self._next_full = 0.0
        self.full_collections = 0
        self.running = False

    def start(self, now: float) -> None:
        """After the daemon's state is loaded: what is there now lives long."""
        gc.collect()
        gc.freeze()
        self._next_full = now + self.full_every
        self.running = True

    def tick(self, now: float) -> None:
        """Once a second, from the loop (``now``: its monotonic clock)."""
        if now >= self._next_full:
            gc.unfreeze()
            gc.collect()
            self.full_collections += 1
            self._next_full = now + self.full_every
        gc.freeze()

    def stop(self) -> None:
        """Everything back in the collector's sight: a program that runs the
        daemon in a thread goes on with its own objects collected as usual."""
        if self.running:
            gc.unfreeze()
            self.running = False
