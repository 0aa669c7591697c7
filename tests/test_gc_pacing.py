"""When the daemon's garbage collector may pause its loop
(daemon/service/gc_pacing.py): what survives a second goes out of the
collector's sight, a full collection comes once per interval and still frees
cycles among frozen objects, and stop() gives everything back."""

from __future__ import annotations

import gc
import weakref

from lrpilot.daemon.service.gc_pacing import CollectorPacing


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref:
    """A reference cycle no one holds (garbage only a collection frees)."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_frozen_objects_are_out_of_sight_until_the_full_collection():
    pacing = CollectorPacing(full_every=600.0)
    before = gc.get_freeze_count()
    try:
        pacing.start(now=0.0)
        assert gc.get_freeze_count() > before
        gone = cycle()
        pacing.tick(now=1.0)  # frozen with the rest: an automatic collection skips it
        gc.collect()
        assert gone() is not None
        pacing.tick(now=600.0)  # the full collection looks at everything again
        assert gone() is None
        assert pacing.full_collections == 1
        assert gc.get_freeze_count() > 0  # and freezes what survived
    finally:
        pacing.stop()
    assert gc.get_freeze_count() == 0
    assert not pacing.running


def test_stop_without_start_changes_nothing():
    pacing = CollectorPacing()
    pacing.stop()
    assert gc.get_freeze_count() == 0
