"""Every journaled LR change as a Grafana annotation, posted off the loop.

The daemon loop calls :meth:`AnnotationPoster.on_change` right after a change
is journaled (``DataPlane.change_listeners``). It only appends to a bounded
queue under a lock that is never held across I/O, so a Grafana that is down
or hanging costs the loop nothing: a background thread posts, one change at a
time, each with a short timeout. When the queue is full a change is dropped
and counted. Outcomes are counted (``posted``, ``failed``, ``dropped``; the
exporter shows them as ``lrpilot_grafana_annotations_total``), so every change
offered ends in exactly one of them.

Failures are logged rate-limited: the first one at once, then one summary
line per ``LOG_EVERY`` seconds while they go on, and one line when posting
works again; not one line per change when Grafana is down for an hour.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..service.engine import Change
from ..service.registry import Run

if TYPE_CHECKING:
    from .grafana import Credential

log = logging.getLogger("lrpilot.daemon")

LOG_EVERY = 60.0  # seconds between summary lines while posts fail
DRAIN_S = 2.0  # close() waits this long for queued changes to be posted
OUTCOMES = ("posted", "failed", "dropped")

# (wall time in ms, run id, the command, the LRs before it, its cause)
Queued = tuple[int, str, Change]  # (time ms, run, the change)
Post = Callable[[int, list[str], str], None]  # (time ms, tags, text); raises on failure


def lrs_text(lrs: list[float]) -> str:
    return ", ".join(f"{lr:.6g}" for lr in lrs)


def annotation(queued: Queued) -> tuple[int, list[str], str]:
    """(time ms, tags, text) of the annotation for one change."""
    time_ms, run_id, change = queued
    command, old_lrs, cause = change.command, change.old_lrs, change.cause
    # The cause is the reason label of lrpilot_run_lr_changes_total (plateau,
    # set_lr, pause, resume, policy_switch); the full reason is in the text.
    tags = ["lrpilot", f"run:{run_id}", cause]
    text = (
        f"run {run_id} v{command.version} from step {command.effective_step}: "
        f"lr {lrs_text(old_lrs)} → {lrs_text(command.lrs)}; {command.reason} "
        f"(by {command.actor})"
    )
    return time_ms, tags, text


class AnnotationPoster:
    """A bounded queue of LR changes and the thread that posts them."""

    def __init__(self, post: Post, capacity: int = 1000, where: str = "Grafana") -> None:
        self._post = post
        self.capacity = capacity
        self.where = where
        self._queue: deque[Queued] = deque()
        self._lock = threading.Condition()
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._closed = False  # no more changes taken
        self._stopping = False  # the thread leaves
        self._in_flight = False
        self._failing_since: float | None = None
        self._failed_unlogged = 0
        self._last_logged = 0.0
        self._thread = threading.Thread(target=self._run, name="lrpilot-annotations", daemon=True)
        self._thread.start()

    @classmethod
    def for_grafana(
        cls, url: str, credential: Credential, timeout: float, capacity: int
    ) -> AnnotationPoster:
        """A poster to one Grafana (grafana-client is imported only here)."""
        from .grafana import Grafana

        grafana = Grafana(url, credential, timeout=timeout)
        return cls(grafana.annotate, capacity=capacity, where=grafana.url)

    # --- the daemon loop's side -------------------------------------------

    def on_change(self, run: Run, change: Change) -> None:
        """A ChangeListener: queue the change and return (never raises, never waits)."""
        queued = (int(time.time() * 1000), run.run_id, change)
        with self._lock:
            if self._closed or len(self._queue) >= self.capacity:
                self._counts["dropped"] += 1
                return
            self._queue.append(queued)
            self._lock.notify()

    def counts(self) -> dict[str, int]:
        """Outcomes so far, for the exporter (called from the scrape thread)."""
        with self._lock:
            return dict(self._counts)

    def close(self, drain_s: float = DRAIN_S) -> None:
        """Take no more changes, give the queued ones up to ``drain_s`` seconds
        to be posted, count the rest as dropped, and stop the thread (a post
        that hangs is left to its timeout on a daemon thread)."""
        deadline = time.monotonic() + drain_s
        with self._lock:
            self._closed = True
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            self._counts["dropped"] += len(self._queue)
            self._queue.clear()
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.1)
        if self._failed_unlogged:
            self._log_failures(time.monotonic(), "", force=True)

    # --- the posting thread -------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                change = self._queue.popleft()
                self._in_flight = True
            outcome = self._post_one(change)
            with self._lock:
                self._counts[outcome] += 1
                self._in_flight = False
                self._lock.notify_all()

    def _post_one(self, change: Queued) -> str:
        try:
            self._post(*annotation(change))
        except Exception as exc:  # whatever Grafana does, the daemon goes on
            self._failed(str(exc))
            return "failed"
        if self._failing_since is not None:
            # The failures since the last warning are in no other line: count them here.
            log.info(
                "posting LR changes to Grafana at %s works again, after %.0fs of failures "
                "(%d more LR changes could not be posted since the last warning)",
                self.where,
                time.monotonic() - self._failing_since,
                self._failed_unlogged,
            )
            self._failing_since, self._failed_unlogged = None, 0
        return "posted"

    def _failed(self, error: str) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._last_logged = now
            log.warning("cannot post an LR change to Grafana as an annotation: %s", error)
            return
        self._failed_unlogged += 1
        self._log_failures(now, error)

    def _log_failures(self, now: float, error: str, force: bool = False) -> None:
        if not force and now - self._last_logged < LOG_EVERY:
            return
        log.warning(
            "%d more LR changes could not be posted to Grafana in the last %.0fs%s",
            self._failed_unlogged,
            now - self._last_logged,
            f" (last error: {error})" if error else "",
        )
        self._failed_unlogged, self._last_logged = 0, now
