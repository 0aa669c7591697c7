"""The other side of every two-process measurement, run as a subprocess:
``python bench/workers.py ROLE [ARGS]``.

Each role binds (or connects), prints one line ``READY <address>`` on stdout,
does its work, and prints one line ``DONE <json>`` before it exits. A role
that serves until told to stop stops on SIGTERM.

- ``daemon``: a real :class:`lrpilot.daemon.service.server.Daemon` on a free loopback
  port (and a temporary state dir). It also records, per LR command, the
  CLOCK_MONOTONIC time at which the daemon decided it: when
  ``PolicyEngine.command`` has made the versioned command, before it is
  journaled, encoded and sent (the method is wrapped here, in this process
  only: the daemon's code is not changed). ``--profile PATH`` writes a
  cProfile of the serve loop.
- ``pull N [json]``: a PULL socket that receives N messages one ``recv()``
  at a time (optionally ``json.loads`` each) and reports the rate between
  the first and the last.
- ``echo``: a ROUTER that sends every message straight back (the raw
  DEALER/ROUTER round trip).
- ``drain``: a PULL socket that receives and drops messages (the peer of the
  raw NOBLOCK send being timed).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import zmq

LOOPBACK = "tcp://127.0.0.1:*"


def say(word: str, payload: object) -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    sys.stdout.write(f"{word} {text}\n")
    sys.stdout.flush()


def stop_on_sigterm() -> list[bool]:
    stopped = [False]

    def handler(*_: object) -> None:
        stopped[0] = True

    signal.signal(signal.SIGTERM, handler)
    return stopped


def role_daemon(args: list[str]) -> None:
    import logging
    import shutil
    import tempfile

    from lrpilot.daemon.service.config import DaemonConfig
    from lrpilot.daemon.service.engine import PolicyEngine
    from lrpilot.daemon.service.server import Daemon

    logging.basicConfig(level=logging.WARNING)
    decided: dict[int, int] = {}  # command version -> monotonic ns of the decision
    command = PolicyEngine.command

    def timed_command(self: PolicyEngine, *a: Any, **k: Any) -> Any:
        made = command(self, *a, **k)
        version = getattr(made, "command", made).version  # a Change (or, before, the command)
        decided[version] = time.monotonic_ns()
        return made

    # This process only: the daemon's code is unchanged.
    PolicyEngine.command = timed_command  # type: ignore[method-assign]
    # Free ports and a fresh state dir, whatever else the config has grown.
    fields = DaemonConfig.model_fields
    options: dict[str, Any] = {"address": "tcp://127.0.0.1:0", "log_level": "warning"}
    state_dir = None
    if "control_address" in fields:
        options["control_address"] = "tcp://127.0.0.1:0"
    if "state_dir" in fields:
        state_dir = options["state_dir"] = tempfile.mkdtemp(prefix="lrpilot-bench-state-")
    if "metrics_addr" in fields:  # /metrics on a free port, or off
        options["metrics_addr"] = "127.0.0.1:0" if "--metrics" in args else "off"
    if "max_runs" in fields:  # the scrape bench holds 1,000 live runs and one more
        options["max_runs"] = 100_000
    daemon = Daemon(DaemonConfig(**options))
    daemon.start()
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    profile_path = args[args.index("--profile") + 1] if "--profile" in args else None
    say("READY", daemon.bound_address)
    if "--metrics" in args:
        say("METRICS", daemon.metrics.url)
    plane = daemon.plane  # read before close(), which may drop it
    try:
        if profile_path:
            import cProfile

            profiler = cProfile.Profile()
            profiler.runcall(daemon.serve)
            profiler.dump_stats(profile_path)
        else:
            daemon.serve()
    finally:
        daemon.close()
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
    say(
        "DONE",
        {
            "records_ingested": plane.records_ingested,
            "rejected": dict(plane.rejected),
            "commands_sent": plane.commands_sent,
            "decided_ns": decided,
        },
    )


def role_pull(args: list[str]) -> None:
    count, decode = int(args[0]), len(args) > 1 and args[1] == "json"
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(LOOPBACK)
    say("READY", sock.getsockopt_string(zmq.LAST_ENDPOINT))
    recv, loads = sock.recv, json.loads
    recv()
    start = time.perf_counter_ns()
    if decode:
        for _ in range(count - 1):
            loads(recv())
    else:
        for _ in range(count - 1):
            recv()
    elapsed = time.perf_counter_ns() - start
    say("DONE", {"messages": count - 1, "seconds": elapsed / 1e9})
    sock.close()
    context.term()


def role_echo(args: list[str]) -> None:
    stopped = stop_on_sigterm()
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.bind(LOOPBACK)
    say("READY", sock.getsockopt_string(zmq.LAST_ENDPOINT))
    served = 0
    while not stopped[0]:
        if sock.poll(100, zmq.POLLIN):
            sock.send_multipart(sock.recv_multipart())
            served += 1
    say("DONE", {"served": served})
    sock.close(linger=0)
    context.term()


def role_drain(args: list[str]) -> None:
    stopped = stop_on_sigterm()
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(LOOPBACK)
    say("READY", sock.getsockopt_string(zmq.LAST_ENDPOINT))
    received = 0
    while not stopped[0]:
        if sock.poll(100, zmq.POLLIN):
            while True:
                try:
                    sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                received += 1
    say("DONE", {"received": received})
    sock.close(linger=0)
    context.term()


ROLES = {"daemon": role_daemon, "pull": role_pull, "echo": role_echo, "drain": role_drain}

if __name__ == "__main__":
    ROLES[sys.argv[1]](sys.argv[2:])
