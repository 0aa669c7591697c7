"""Ports for daemons that a bench or a test starts: one allocator for both
(tests/procs.py loads this file).

A port is picked, checked free, and let go; the daemon binds it a moment
later. Two things could take it in between, and this keeps both away:
- another pick in the same process: no port is returned twice;
- the kernel: ports come from below its ephemeral range, which it hands out
  on its own (a bind to port 0, as a shard's HTTP side does, or the local end
  of a connection). A test once failed with a daemon's metrics port held by
  a ZeroMQ socket of the same start."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _port_range() -> range:
    try:
        low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low = 32_768
    return range(10_000, max(low, 12_000))


PORTS = _port_range()
_given: set[int] = set()
_pick = random.Random()  # not the global one, which hypothesis seeds in tests


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive ports nobody listens on now (on any
    address) and no earlier call returned: a daemon's --shard-base-port."""
    for _ in range(1000):
        first = _pick.randrange(PORTS.start, PORTS.stop - count)
        span = range(first, first + count)
        if _given.intersection(span):
            continue
        try:
            for port in span:
                with socket.socket() as sock:
                    sock.bind(("", port))
        except OSError:
            continue
        _given.update(span)
        return first
    raise RuntimeError(f"no {count} consecutive free ports in {PORTS}")


def free_port() -> int:
    """A port nobody listens on now and no earlier call returned."""
    return free_ports(1)
