"""What ``pilot.step()`` with 8 metrics adds to a training loop's iteration,
next to what the usual alternatives add, all measured the same way.

Every variant runs the same loop: a trivial body (a few float ops that make
the 8 metric values) followed by the call under test; each iteration is
timed with ``perf_counter_ns``. A variant's added cost is its median (or
mean) iteration time minus the bare loop's (body only). The variants run in
interleaved rounds after a warm-up, so drift hits them alike.

- ``pilot.step`` with a daemon up (a real daemon in its own process) and
  with the daemon down (an address where nothing listens), each with a
  step-driven policy (``step``, evaluated in the hook every step) and a
  metric-driven one (``plateau`` on ``val_loss``, decided by the daemon);
- one raw pyzmq ``send(frame, NOBLOCK)`` of a 72-byte frame (the size of one
  packed record: int64 step + 8 float64) to a PULL socket in another process;
- 8 ``SummaryWriter.add_scalar`` calls (torch.utils.tensorboard, to a temp dir);
- one ``ReduceLROnPlateau.step(loss)``.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import zmq
from harness import Row, Summary, Worker, dead_address

import lrpilot

RECORD_BYTES = 8 + 8 * 8  # what one step of 8 metrics packs to on the wire
STEP_POLICY = {"kind": "step", "step_size": 1000, "gamma": 0.99}
PLATEAU_POLICY = {"kind": "plateau", "metric": "val_loss", "patience": 10}

clock = time.perf_counter_ns
# Two cadences. FAST: each iteration first spins (not timed) until 20 µs after
# the previous one began: a stand-in for the training step's own work that
# lets the daemon, on another core, keep up with the records; the pilot does
# its I/O every ~50 steps. KHZ: a 1 kHz loop that sleeps to the next tick, as
# a real loop waits on data or the GPU; the pilot does I/O nearly every step,
# and whatever runs after a millisecond of sleep runs with cold caches.
FAST_NS, KHZ_NS = 20_000, 1_000_000


def wait(deadline: int, sleep: bool) -> None:
    if sleep:
        left = deadline - clock()
        if left > 0:
            time.sleep(left / 1e9)
    else:
        while clock() < deadline:
            pass


# --- the loops: identical bodies, one call each; keep them in step ---------------


def loop_bare(n: int, start: int, pace: int, sleep: bool) -> list[int]:
    times = [0] * n
    deadline = clock()
    for k in range(n):
        deadline += pace
        wait(deadline, sleep)
        t = clock()
        x = (start + k) * 1e-3
        loss = 1.0 / (1.0 + x)
        _ = (loss, 1.0 - loss, x * 0.5 + 1.0, 0.1, x * 512.0, loss * loss, loss + x, x - loss)
        times[k] = clock() - t
    return times


def loop_pilot(n: int, start: int, pace: int, sleep: bool, pilot: lrpilot.Pilot) -> list[int]:
    times = [0] * n
    step = pilot.step
    deadline = clock()
    for k in range(n):
        deadline += pace
        wait(deadline, sleep)
        t = clock()
        x = (start + k) * 1e-3
        loss = 1.0 / (1.0 + x)
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
        times[k] = clock() - t
    return times


def loop_send(
    n: int, start: int, pace: int, sleep: bool, sock: zmq.Socket, frame: bytes
) -> list[int]:
    times = [0] * n
    send, flags = sock.send, zmq.NOBLOCK
    deadline = clock()
    for k in range(n):
        deadline += pace
        wait(deadline, sleep)
        t = clock()
        x = (start + k) * 1e-3
        loss = 1.0 / (1.0 + x)
        _ = (loss, 1.0 - loss, x * 0.5 + 1.0, 0.1, x * 512.0, loss * loss, loss + x, x - loss)
        send(frame, flags)
        times[k] = clock() - t
    return times


def loop_add_scalar(n: int, start: int, pace: int, sleep: bool, writer: Any) -> list[int]:
    times = [0] * n
    add = writer.add_scalar
    deadline = clock()
    for k in range(n):
        deadline += pace
        wait(deadline, sleep)
        t = clock()
        i = start + k
        x = i * 1e-3
        loss = 1.0 / (1.0 + x)
        add("loss", loss, i)
        add("acc", 1.0 - loss, i)
        add("grad_norm", x * 0.5 + 1.0, i)
        add("lr", 0.1, i)
        add("tokens", x * 512.0, i)
        add("m5", loss * loss, i)
        add("m6", loss + x, i)
        add("m7", x - loss, i)
        times[k] = clock() - t
    return times


def loop_plateau(n: int, start: int, pace: int, sleep: bool, scheduler: Any) -> list[int]:
    times = [0] * n
    step = scheduler.step
    deadline = clock()
    for k in range(n):
        deadline += pace
        wait(deadline, sleep)
        t = clock()
        x = (start + k) * 1e-3
        loss = 1.0 / (1.0 + x)
        _ = (loss, 1.0 - loss, x * 0.5 + 1.0, 0.1, x * 512.0, loss * loss, loss + x, x - loss)
        step(loss)
        times[k] = clock() - t
    return times


# --- the measurement ------------------------------------------------------------

Loop = Callable[..., list[int]]


def measure(
    rounds: int = 3, n: int = 25_000, n_scalar: int = 300, n_khz: int = 300
) -> tuple[list[tuple[str, list[Row]]], dict]:
    import torch

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch imports tensorboard lazily, here
        raise SystemExit(
            "bench: SummaryWriter needs the tensorboard package "
            f"({exc}); `bash scripts/bench` installs it, or: "
            ".venv/bin/python -m pip install 'tensorboard>=2.14,<3'"
        ) from None

    param = torch.nn.Parameter(torch.zeros(1))
    context = zmq.Context()
    with (
        Worker("daemon", label="step-cost") as daemon,
        Worker("drain") as drain,
        tempfile.TemporaryDirectory(prefix="lrpilot-bench-tb-") as logdir,
        warnings.catch_warnings(),
    ):
        # A pilot whose daemon is down may warn (queue full); that is expected here.
        warnings.simplefilter("ignore", RuntimeWarning)
        down = dead_address()
        pilots = {
            f"{where}_{kind}": lrpilot.attach(
                torch.optim.SGD([param], lr=0.1),
                run=f"bench-step-{where}-{kind}",
                policy=policy,
                daemon=address,
                steps="calls",  # the loop never steps the optimizer: each call is a step
            )
            for where, address in (("up", daemon.address), ("down", down))
            for kind, policy in (("step", STEP_POLICY), ("plateau", PLATEAU_POLICY))
        }
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(drain.address)
        frame = bytes(RECORD_BYTES)
        writer = SummaryWriter(log_dir=logdir)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            torch.optim.SGD([param], lr=0.1), patience=10
        )
        baselines: dict[str, tuple[Loop, tuple, int]] = {
            "bare": (loop_bare, (), n),
            "send": (loop_send, (push, frame), n),
            "add_scalar": (loop_add_scalar, (writer,), n_scalar),
            "plateau_scheduler": (loop_plateau, (scheduler,), n),
        }
        # name -> (loop, args, iterations per round, pace, sleep)
        variants: dict[str, tuple[Loop, tuple, int, int, bool]] = {}
        for cadence, pace, sleep in (("fast", FAST_NS, False), ("1khz", KHZ_NS, True)):
            for name, (loop, args, count) in baselines.items():
                if cadence == "1khz" and name == "plateau_scheduler":
                    continue
                count = min(count, n_khz) if sleep else count
                variants[f"{cadence}/{name}"] = (loop, args, count, pace, sleep)
            for name, pilot in pilots.items():
                variants[f"{cadence}/pilot_{name}"] = (
                    loop_pilot,
                    (pilot,),
                    n_khz if sleep else n,
                    pace,
                    sleep,
                )
        samples: dict[str, list[int]] = {name: [] for name in variants}
        position = dict.fromkeys(variants, 1)
        for name, (loop, args, count, pace, sleep) in variants.items():  # warm up
            warm = min(count, 2000) // (10 if sleep else 1)
            loop(warm, position[name], pace, sleep, *args)
            position[name] += warm
        for _ in range(rounds):
            for name, (loop, args, count, pace, sleep) in variants.items():
                samples[name] += loop(count, position[name], pace, sleep, *args)
                position[name] += count
        stats = {name: asdict(pilot.stats) for name, pilot in pilots.items()}
        for pilot in pilots.values():
            pilot.close()
        writer.close()
        push.close(linger=0)
        daemon_counts = daemon.finish()
        drain.finish()
    context.term()
    return rows(samples, stats, daemon_counts)


TITLES = {
    "fast": "added cost per loop iteration, median: loop at 50 kHz (20 µs spin between steps)",
    "1khz": "the same in a 1 kHz loop that sleeps to each tick (pilot I/O nearly every step)",
}


def rows(
    samples: dict[str, list[int]], stats: dict, daemon_counts: dict
) -> tuple[list[tuple[str, list[Row]]], dict]:
    summary = {name: Summary.of(values) for name, values in samples.items()}
    sections = []
    added_p50: dict[str, float] = {}
    added_mean: dict[str, float] = {}
    for cadence in ("fast", "1khz"):
        bare = summary[f"{cadence}/bare"]
        for name, s in summary.items():
            if name.startswith(cadence + "/"):
                added_p50[name] = s.p50 - bare.p50
                added_mean[name] = s.mean - bare.mean
        send = added_p50[f"{cadence}/send"]
        scalars = added_p50[f"{cadence}/add_scalar"]
        out: list[Row] = []
        for where in ("up", "down"):
            for kind in ("step", "plateau"):
                name = f"{cadence}/pilot_{where}_{kind}"
                out.append(
                    Row(
                        f"pilot.step(8 metrics), daemon {where}, {kind} policy",
                        added_p50[name],
                        "ns",
                        send,
                        "1 NOBLOCK send",
                        3.0,
                    )
                )
                out.append(
                    Row(
                        "  the same against 8 add_scalar",
                        added_p50[name],
                        "ns",
                        scalars,
                        "8 add_scalar",
                        0.01,
                    )
                )
                if cadence == "fast":
                    # What a loop pays: the mean, the pilot's batched sends
                    # and looks for commands included (the median has none).
                    out.append(
                        Row(
                            "  the same, mean (its batched I/O included)",
                            added_mean[name],
                            "ns",
                            added_mean[f"{cadence}/send"],
                            "1 NOBLOCK send, mean",
                            3.0,
                        )
                    )
        out.append(Row("8 SummaryWriter.add_scalar", scalars, "ns"))
        if f"{cadence}/plateau_scheduler" in added_p50:
            out.append(
                Row("ReduceLROnPlateau.step(loss)", added_p50[f"{cadence}/plateau_scheduler"], "ns")
            )
        out.append(Row(f"raw pyzmq send(NOBLOCK), {RECORD_BYTES} B frame", send, "ns"))
        sections.append((TITLES[cadence], out))
    detail = {
        "per_variant_ns": {name: asdict(s) for name, s in summary.items()},
        "added_p50_ns": added_p50,
        "added_mean_ns": added_mean,
        "pilot_stats": stats,
        "daemon": {k: v for k, v in daemon_counts.items() if k != "decided_ns"},
    }
    return sections, detail
