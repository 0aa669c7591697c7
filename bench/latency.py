"""How long a daemon decision takes to reach the param group, and what a
sync-mode step costs, next to raw ZeroMQ round trips measured in the same run.

Async decision latency: a real daemon in its own process; here, a 1 kHz
training loop (each iteration: 8 metrics through ``pilot.step()``, then sleep
to the next millisecond tick) with an async pilot whose policy is ``plateau``
on ``val_loss`` with patience 0 and factor 0.99. Every 20 steps the loop
``pilot.report()``s a worse ``val_loss``, so every report after the first
makes the daemon cut the LR. Two intervals per cut, both on CLOCK_MONOTONIC,
which every process on the machine shares:

- decision → param group: from the moment the daemon decided (the bench's
  daemon process notes the time when ``PolicyEngine.command`` has made the
  versioned command, before it is journaled, encoded and sent) to the moment
  the pilot has written the new LR into the param group (its ``on_change``
  callback, which runs right after the write and the ack);
- report → param group: from just before ``pilot.report()`` (which sends at
  once) to the same moment: what the training loop sees end to end.

Sync step: ``pilot.step()`` of a sync pilot (8 metrics, plateau policy), each
call timed, against a raw round trip of a 72-byte frame from a DEALER here to
a ROUTER in another process that sends it straight back.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import asdict

import zmq
from harness import Row, Summary, Worker

import lrpilot

LATENCY_POLICY = {
    "kind": "plateau",
    "metric": "val_loss",
    "patience": 0,
    "factor": 0.99,
    "min_lr": 0.0,
}
SYNC_POLICY = {"kind": "plateau", "metric": "val_loss", "patience": 10}
REPORT_EVERY = 20
PERIOD_NS = 1_000_000  # a 1 kHz loop

clock = time.monotonic_ns


def decision_latency(seconds: float) -> tuple[list[Row], dict]:
    import torch

    steps = int(seconds * 1e9 / PERIOD_NS)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    changed: list[int] = []  # monotonic ns when each new LR was in the group
    changed_step: list[int] = []  # the optimizer step it was applied before
    reported: list[int] = []
    reported_step: list[int] = []  # the pilot's step count at each report
    group = optimizer.param_groups[0]
    lrs_seen: list[float] = []

    def on_change(step: int, old: list[float], new: list[float], reason: str, actor: str) -> None:
        changed.append(clock())
        changed_step.append(step)
        lrs_seen.append(group["lr"])

    with Worker("daemon", label="latency") as daemon:
        pilot = lrpilot.attach(
            optimizer,
            run="bench-latency",
            policy=LATENCY_POLICY,
            daemon=daemon.address,
            # The loop never steps the optimizer (its own cost is not
            # measured): each call is a step.
            steps="calls",
            on_change=on_change,
        )
        time.sleep(0.2)  # let the hello land
        step, report = pilot.step, pilot.report
        tick = clock()
        late_steps: list[int] = []  # loop iterations that began over 0.5 ms late
        step_ns = [0] * steps  # each pilot.step() call at 1 kHz
        for i in range(steps):
            tick += PERIOD_NS
            x = i * 1e-3
            loss = 1.0 / (1.0 + x)
            t = clock()
            step(
                loss=loss,
                acc=1.0 - loss,
                grad_norm=x * 0.5 + 1.0,
                lr=0.1,
                tokens=x * 512.0,
                m5=loss * loss,
                m6=loss + x,
                m7=x - loss,
            )
            step_ns[i] = clock() - t
            if i % REPORT_EVERY == REPORT_EVERY - 1:
                reported.append(clock())
                reported_step.append(pilot.step_count)
                report(val_loss=1.0 + 0.01 * len(reported))  # worse every time
            delay = tick - clock()
            if delay > 0:
                time.sleep(delay / 1e9)
            elif -delay > PERIOD_NS // 2:
                late_steps.append(i)
        stats = pilot.stats
        pilot.flush()
        pilot.close()
        counts = daemon.finish()
    decided = {int(v): t for v, t in counts["decided_ns"].items()}
    # The first report sets plateau's best; report k (k >= 2) causes version k - 1.
    n = min(len(changed), len(decided), len(reported) - 1)
    if n < 10 or stats.commands_applied != len(changed):
        raise RuntimeError(
            f"bench: {len(changed)} LR changes, {len(decided)} decisions, "
            f"{len(reported)} reports, stats {stats}"
        )
    from_decision = [changed[k] - decided[k + 1] for k in range(n)]
    from_report = [changed[k] - reported[k + 1] for k in range(n)]
    if min(from_decision) < 0:
        raise RuntimeError("bench: an LR change before its decision: commands out of step")
    dec, rep = Summary.of(from_decision), Summary.of(from_report)
    # pilot.step() calls after the report up to the one that wrote the new LR
    # (on_change's step is the optimizer step that will use it: one more).
    steps_after = Counter(changed_step[k] - 1 - reported_step[k + 1] for k in range(n))
    rows = [
        Row(
            "async 1 kHz loop, decision → LR in param group: p99",
            dec.p99,
            "ns",
            2e6,
            "2 ms",
            1.0,
        ),
        Row("  same, p50", dec.p50, "ns"),
        Row("  report() → LR in param group: p50", rep.p50, "ns"),
        Row("  report() → LR in param group: p99", rep.p99, "ns"),
        Row("  pilot.step(8 metrics) in this 1 kHz loop: p50", Summary.of(step_ns).p50, "ns"),
    ]
    detail = {
        "decisions": n,
        "decision_to_group_ns": asdict(dec),
        "report_to_group_ns": asdict(rep),
        "commands_applied": stats.commands_applied,
        "commands_late": stats.commands_late,
        "late_loop_iterations": len(late_steps),
        "step_at_1khz_ns": asdict(Summary.of(step_ns)),
        "step_calls_until_new_lr": dict(sorted(steps_after.items())),
        "final_lr": lrs_seen[-1] if lrs_seen else None,
    }
    return rows, detail


def sync_against_round_trip(steps: int, chunks: int = 8) -> tuple[Summary, Summary]:
    """Per-call times of a sync ``pilot.step()`` and of a raw DEALER/ROUTER
    round trip, measured in alternating chunks so that load hits them alike."""
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    clock_ns = time.perf_counter_ns
    sync_times: list[int] = []
    trip_times: list[int] = []
    context = zmq.Context()
    with (
        Worker("daemon", label="sync") as daemon,
        Worker("echo") as echo,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", RuntimeWarning)  # sync timeouts are counted below
        pilot = lrpilot.attach(
            torch.optim.SGD([param], lr=0.1),
            run="bench-sync",
            policy=SYNC_POLICY,
            daemon=daemon.address,
            sync=True,
            steps="calls",  # the loop never steps the optimizer: each call is a step
        )
        sock = context.socket(zmq.DEALER)
        sock.connect(echo.address)
        frame = bytes(8 + 8 * 8)
        send, recv, step = sock.send, sock.recv, pilot.step
        per_chunk = max(1, steps // chunks)
        i = 0
        for chunk in range(-1, chunks):  # chunk -1 warms both up
            for _ in range(per_chunk):
                t = clock_ns()
                send(frame)
                recv()
                if chunk >= 0:
                    trip_times.append(clock_ns() - t)
            for _ in range(per_chunk):
                i += 1
                x = i * 1e-3
                loss = 1.0 / (2.0 + x)
                t = clock_ns()
                step(
                    loss=loss,
                    acc=1.0 - loss,
                    grad_norm=x * 0.5 + 1.0,
                    lr=0.1,
                    tokens=x * 512.0,
                    m5=loss * loss,
                    m6=loss + x,
                    m7=x - loss,
                )
                if chunk >= 0:
                    sync_times.append(clock_ns() - t)
        if pilot.stats.sync_timeouts:
            raise RuntimeError(f"bench: sync pilot timed out: {pilot.stats}")
        pilot.close()
        sock.close(linger=0)
        daemon.finish()
        echo.finish()
    context.term()
    return Summary.of(sync_times), Summary.of(trip_times)


def measure(seconds: float = 10.0, sync_steps: int = 4000) -> tuple[list[Row], dict]:
    rows, detail = decision_latency(seconds)
    sync, trip = sync_against_round_trip(sync_steps)
    rows += [
        Row(
            "sync pilot.step(8 metrics): p50",
            sync.p50,
            "ns",
            trip.p50,
            "DEALER/ROUTER RTT",
            2.0,
        ),
        Row("  sync pilot.step: p99", sync.p99, "ns", trip.p99, "RTT p99"),
        Row("  raw DEALER/ROUTER round trip, 72 B: p50", trip.p50, "ns"),
    ]
    detail.update(sync_step_ns=asdict(sync), round_trip_ns=asdict(trip))
    return rows, detail
