"""``StateLock``: one daemon (or one shard) per state directory.

Two daemons on one store would both take records, journal commands and
write each other's runs over. A daemon holds an exclusive ``flock`` on
``STATE_DIR/lock`` while it runs; the kernel lets go of it when the process
ends, however it ends, so a daemon killed with -9 leaves nothing to clean up.
A shard started again by its front waits a little for the lock: the shard
it replaces (its front was killed and a new one started) may still be
flushing its store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from lrpilot.errors import LRPilotError

LOCK_NAME = "lock"
POLL_S = 0.05


class StateLocked(LRPilotError, RuntimeError):
    """Another process serves this state directory."""


class StateLock:
    def __init__(self, state_dir: Path, wait_s: float = 0.0) -> None:
        """Hold ``state_dir``'s lock, waiting up to ``wait_s`` seconds for it;
        StateLocked (naming the holder's pid) when another process keeps it."""
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateLocked(f"cannot lock {state_dir}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
                    os.close(self._fd)
                    raise StateLocked(
                        f"another lrpilot daemon (pid {holder or 'unknown'}) serves {state_dir}: "
                        "stop it, or give this one another --state-dir"
                    ) from None
                time.sleep(POLL_S)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor lets go of the flock
            self._fd = -1
