"""``Daemon``: the lifecycle of the service: bind, serve, shut down cleanly.

One thread, one ROUTER socket: the data plane's work per message is a few
microseconds, so a single loop keeps every run's records in order without
locks. SIGINT/SIGTERM end the loop at the next poll (within 100 ms).
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import zmq

from .config import DaemonConfig
from .dataplane import DataPlane

log = logging.getLogger("lrpilot.daemon")

POLL_MS = 100
SWEEP_EVERY = 1.0  # seconds between looks for silent sessions
# libzmq drops a peer that sends more than this; below it the data plane
# answers an oversized message with an error instead.
HARD_LIMIT_FACTOR = 4


class DaemonError(RuntimeError):
    """The daemon cannot start (address in use, bad address)."""


class Daemon:
    def __init__(self, config: DaemonConfig | None = None) -> None:
        self.config = config or DaemonConfig()
        self.plane = DataPlane(self.config)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._context: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self.bound_address = ""

    def start(self) -> None:
        self._context = zmq.Context()
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes * HARD_LIMIT_FACTOR)
        # Replies to a client whose pipe is full are dropped, never block the loop.
        sock.setsockopt(zmq.SNDHWM, 10_000)
        try:
            sock.bind(self.config.address)
        except zmq.ZMQError as exc:
            sock.close()
            self._context.term()
            raise DaemonError(f"cannot bind {self.config.address}: {exc}") from None
        self.bound_address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        log.info("lrpilot daemon listening on %s", self.bound_address)

    def serve(self) -> None:
        """Run the loop until stop() or a signal."""
        assert self._sock is not None, "start() first"
        sock, plane = self._sock, self.plane
        next_sweep = time.monotonic() + SWEEP_EVERY
        self.ready.set()
        while not self._stop.is_set():
            if sock.poll(POLL_MS, zmq.POLLIN):
                now = time.monotonic()
                # Drain what is there before looking at the clock again.
                while True:
                    try:
                        identity, *frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    try:
                        replies = plane.handle(identity, frames, now)
                    except Exception:  # a bug must not take every run down with it
                        log.exception("internal error handling a message; it was dropped")
                        plane.rejected["internal_error"] += 1
                        continue
                    for to, out in replies:
                        try:
                            sock.send_multipart([to, *out], zmq.NOBLOCK)
                        except zmq.ZMQError:
                            plane.rejected["reply_dropped"] += 1
            now = time.monotonic()
            if now >= next_sweep:
                plane.sweep(now)
                next_sweep = now + SWEEP_EVERY

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def run(self) -> None:
        """start, serve until SIGINT/SIGTERM, close: what `lrpilot daemon` does."""
        self.start()
        previous = {
            sig: signal.signal(sig, lambda *_: self.stop())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self.serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
            log.info("lrpilot daemon stopped")

    def serve_in_thread(self) -> threading.Thread:
        """Start and serve in a daemon thread (the demo's embedded daemon, tests)."""
        self.start()
        thread = threading.Thread(target=self.serve, name="lrpilot-daemon", daemon=True)
        thread.start()
        self.ready.wait(5)
        return thread
