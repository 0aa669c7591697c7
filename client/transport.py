"""The hook's ZeroMQ link to the daemon: a DEALER that never blocks on send.

ZeroMQ reconnects by itself; messages sent while the daemon is away wait in
the socket's pipe (up to ``SNDHWM`` messages), and the hook keeps the rest in
its own bounded queue. The routing id is fixed per pilot so the daemon knows
a session again after a reconnect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import zmq

from .errors import UsageError
from .keys import ClientKeys

# 64 batches in the pipe; beyond that the hook's own queue (counted in
# records) holds telemetry, so its bound is the one users set and see.
PIPE_MESSAGES = 64
RECONNECT_MS, RECONNECT_MAX_MS = 100, 2000
# On close, give a queued bye this long to leave; the loop is ending anyway.
LINGER_MS = 200
# Plain ints: pyzmq's enum flags cost ~2 µs per `&` on this path.
EVENTS, POLLIN, POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)


class LinkError(UsageError):
    """An address ZeroMQ cannot connect to (a daemon's moved answer)."""


class DaemonLink:
    def __init__(self, address: str, identity: bytes, keys: ClientKeys | None = None) -> None:
        self.address = address
        self._context = zmq.Context()
        sock = self._context.socket(zmq.DEALER)
        if keys is not None:
            keys.apply(sock)  # CURVE: the handshake proves both ends' keys
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.setsockopt(zmq.SNDHWM, PIPE_MESSAGES)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self._context.term()
            raise LinkError(f"cannot connect to {address!r}: {exc}") from None
        self._sock = sock

    def events(self) -> int:
        """POLLIN | POLLOUT as they stand: one call, for both questions."""
        return cast(int, self._sock.getsockopt(EVENTS))  # EVENTS is an int option

    def writable(self) -> bool:
        return bool(cast(int, self._sock.getsockopt(EVENTS)) & POLLOUT)  # as in events()

    def send(self, frames: Sequence[bytes]) -> bool:
        """Queue a message; False (nothing sent) when the pipe is full."""
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def receive(self, timeout_ms: int = 0) -> list[bytes] | None:
        """One waiting message, or None if none arrives within ``timeout_ms``."""
        if timeout_ms and not self._sock.poll(timeout_ms, zmq.POLLIN):
            return None
        try:
            return self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def close(self, linger_ms: int = LINGER_MS) -> None:
        self._sock.close(linger=linger_ms)
        self._context.term()


def redirected(given: str, moved: str) -> str | None:
    """Where to reach the shard a ``moved`` answer names: its port on the
    host this pilot was given (tcp), so that a shard behind a name, a tunnel
    or a published port is reached the way the daemon was, never at a host
    the daemon chose; an ipc path as it is (the same machine). None for a
    port that is not one."""
    if moved.startswith("ipc://"):
        return moved
    if not moved.startswith("tcp://"):
        return None
    if not given.startswith("tcp://"):
        return moved
    port = moved.rpartition(":")[2]
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 < int(port) < 65536:
        return None
    host = given[len("tcp://") :].rpartition(":")[0]
    return f"tcp://{host}:{port}"
