"""The cluster-scale load test: many simulated ranks against one real daemon.

    bash scripts/bench --load                      # 1,000 ranks, 8 processes, 60 s
    .venv/bin/python bench/load.py --ranks 2000 --seconds 20 --json out.json
    .venv/bin/python bench/load.py --ceiling       # then more ranks until a target breaks

A real `lrpilot daemon` (its own process, a fresh state dir) and ``--procs``
load processes. Each simulated rank is a real ZeroMQ DEALER that speaks the
real protocol as the hook does: a hello, a STEP record per step with a loss,
for `plateau` runs a `val_loss` report every 10 steps (sent at once, as
``pilot.report`` does), its records batched and sent at the hook's own send
interval (``lrpilot.hook.SEND_INTERVAL``), the daemon's commands, persisted
acks and errors read as they come, and a bye at the end once everything it
sent is persisted. Runs have 1 to 64 ranks, with `plateau` (on the ranks'
mean `val_loss`), `cosine` and `step` policies in turn. Meanwhile an operator
holds and releases random runs' LRs (`set-lr`, `resume`) and /metrics is
scraped, and the daemon's CPU and RSS and the store's size are sampled.

Reported: records lost (sent and never persisted, or persisted and not in
the store: must be 0); decision latency (the journal's time of a decision to
its arrival at each rank) and operator-command latency (the request sent to
its arrival at each rank), p50/p99, target p99 <= 10 ms; the daemon's CPU and
RSS over time (flat: the last third against the second); store growth per
hour; the daemon's RSS per active rank and per ended run, and the store's
bytes per million records.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import math
import multiprocessing
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import zmq
from ports import free_port, free_ports

HERE = Path(__file__).resolve().parent
TARGET_P99_MS = 10.0
SIZES = (1, 2, 4, 8, 16, 32, 64)
REPORT_EVERY = 10
# Plain ints: pyzmq's enum flags cost ~2 µs per `&` (as in lrpilot.transport).
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
# lrpilot.protocol.Persisted.frame's start: read without pydantic (~20 µs each).
PERSISTED = b'{"v":1,"t":"persisted",'
POLICIES = (
    {"kind": "plateau", "metric": "val_loss", "patience": 2, "factor": 0.7, "min_lr": 1e-6},
    {"kind": "cosine", "T_max": 1_000_000},
    {"kind": "step", "step_size": 500, "gamma": 0.9},
)


def layout(ranks: int, prefix: str) -> list[dict[str, Any]]:
    """Runs of 1..64 ranks (sizes in turn) adding up to ``ranks``, policies in turn."""
    runs, left, i = [], ranks, 0
    while left > 0:
        size = min(SIZES[i % len(SIZES)], left)
        runs.append({"run": f"{prefix}-{i:04d}", "world": size, "policy": POLICIES[i % 3]})
        left -= size
        i += 1
    return runs


# --- a load process ---------------------------------------------------------------


class Rank:
    """One simulated rank: the hook's wire behaviour without a model."""

    def __init__(self, ctx: zmq.Context, address: str, run: dict, rank: int, now: float) -> None:
        from lrpilot.protocol import BatchEncoder, GroupInfo, Hello, encode

        self.run, self.rank = run["run"], rank
        self.reports = run["policy"]["kind"] == "plateau"
        self.ctx, self.address = ctx, address
        self.sock = self.connect(address)
        self.encoder = BatchEncoder(self.run, rank)
        self.hello = encode(
            Hello(
                run=self.run,
                rank=rank,
                world_size=run["world"],
                groups=[GroupInfo(name="0", lr=0.1)],
                policy=run["policy"],
            )
        )
        self.sock.send(self.hello)
        # Records wait for the welcome: a daemon of several shards answers
        # the hello with its shard's address (moved), and what went to the
        # front would be lost (the hook sends it again; this rank keeps none).
        self.welcomed = False
        self.step = self.seq = self.persisted = self.sent = 0
        self.queue: list[tuple] = []
        self.random = random.Random(hash((self.run, rank)))
        self.best = 2.0
        self.started = now + self.random.random() * 0.01  # phases spread over a step
        self.sent_at = now
        self.received: list[tuple[str, int, str, float]] = []  # (run, version, actor, wall)
        self.errors: dict[str, int] = {}

    def connect(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return sock

    def steps_until(self, now: float, rate: float) -> None:
        """Queue the records of the steps due by ``now`` (at ``rate`` steps/s
        from the rank's start), each with a loss, and for `plateau` a report
        every REPORT_EVERY steps: what the hook queues, step by step."""
        from lrpilot.protocol import REPORT, STEP

        due = int((now - self.started) * rate)
        while self.step < due:
            self.step += 1
            self.seq += 1
            self.queue.append((self.seq, self.step, STEP, {"loss": 1.0 / self.step}))
            if self.reports and self.step % REPORT_EVERY == 0:
                # Improves now and then: plateau decides now and then.
                value = self.best * (0.97 if self.random.random() < 0.3 else 1.01)
                self.best = min(self.best, value)
                self.seq += 1
                self.queue.append((self.seq, self.step, REPORT, {"val_loss": value}))

    def flush(self, now: float) -> None:
        if self.queue and self.welcomed:
            self.sock.send_multipart(self.encoder.encode(self.queue, {}))
            self.sent += len(self.queue)
            self.queue = []
        self.sent_at = now

    def read(self) -> zmq.Socket | None:
        """Handle what arrived; the old socket when a moved answer replaced it."""
        from lrpilot.protocol import Error, LRCommand, Moved, Persisted, Welcome, decode
        from lrpilot.transport import redirected

        while self.sock.getsockopt(EVENTS) & POLLIN:
            frames = self.sock.recv_multipart()
            if frames[0].startswith(PERSISTED):  # most of what comes: one per send
                self.persisted = max(self.persisted, int(frames[0].rpartition(b":")[2][:-1]))
                continue
            message = decode(frames)
            if isinstance(message, Moved):
                old, self.sock = (
                    self.sock,
                    self.connect(redirected(self.address, message.address) or message.address),
                )
                self.sock.send(self.hello)
                return old
            if isinstance(message, Welcome):
                self.welcomed = True
            if isinstance(message, Persisted):
                self.persisted = max(self.persisted, message.seq)
            elif isinstance(message, LRCommand):
                self.received.append((message.run, message.version, message.actor, time.time()))
            elif isinstance(message, Welcome) and message.command is not None:
                command = message.command
                self.received.append((command.run, command.version, command.actor, time.time()))
            elif isinstance(message, Error):
                self.errors[message.code] = self.errors.get(message.code, 0) + 1
        return None


def load_process(config: dict) -> dict:
    """Step every rank of ``config["ranks"]`` at ``rate`` until ``until``
    (wall), then flush, wait for every record to be persisted and say bye."""
    from lrpilot.protocol import Bye, encode

    # No collector pauses in the load: its lists of received commands and
    # latenesses grow for the whole run, and a full collection over them
    # paused a process ~100 ms, counted in the latencies of its ranks. The
    # loop makes no reference cycles; the process ends with the run.
    gc.disable()
    ctx = zmq.Context()
    now = time.monotonic()
    ranks = [Rank(ctx, config["address"], run, r, now) for run, r in config["ranks"]]
    # epoll over the sockets' ZMQ_FDs, not zmq.Poller: a zmq_poll of 125
    # sockets costs ~55 µs whatever is ready, and a process wakes up to 1,000
    # times a second: CPU taken from the daemon on a small machine. A ZMQ_FD
    # signals that a socket's events may have changed; Rank.read() reads
    # ZMQ_EVENTS until nothing is waiting, which re-arms it, and is called
    # after every send (a send can take the signal of a message that arrived
    # meanwhile).
    poller = select.epoll()
    by_fd: dict[int, Rank] = {}

    def watch(rank: Rank) -> None:
        fd = rank.sock.getsockopt(zmq.FD)
        poller.register(fd, select.EPOLLIN)
        by_fd[fd] = rank

    for rank in ranks:
        watch(rank)

    def read(rank: Rank) -> None:
        old = rank.read()
        if old is not None:  # moved to its shard
            fd = old.getsockopt(zmq.FD)
            poller.unregister(fd)
            del by_fd[fd]
            old.close()
            watch(rank)
            rank.read()

    # A rank sends what it queued every send interval (the hook's), and at
    # once for a report: with a report every REPORT_EVERY steps, at the step
    # of each report. Its steps are generated when it sends (the records a
    # hook would have queued by then), not one by one: the load processes
    # must leave the daemon its core.
    rate, interval = config["rate"], config["send_interval"]
    every = min(interval, REPORT_EVERY / rate) if any(r.reports for r in ranks) else interval
    due = [
        (rank.started + (every if rank.reports else interval), i) for i, rank in enumerate(ranks)
    ]
    heapq.heapify(due)
    end = now + config["seconds"]
    late = 0.0  # the worst a send came after its time (the process kept up, or not)
    # How late this process ran, every 16th send: a command that arrives
    # for one of its ranks is read as late, and counted in the latencies.
    lateness: list[float] = []
    sends = 0
    while now < end:
        while due[0][0] <= now:
            at, i = heapq.heappop(due)
            late = max(late, now - at)
            sends += 1
            if not sends % 16:
                lateness.append(now - at)
            rank = ranks[i]
            rank.steps_until(at, rate)
            rank.flush(now)
            read(rank)
            heapq.heappush(due, (at + (every if rank.reports else interval), i))
            # What arrived for any rank meanwhile (a command's arrival is
            # timed when it is read): an epoll_wait of nothing is ~1 µs.
            for fd, _ in poller.poll(0):
                read(by_fd[fd])
        wait_s = max(0.0, min(0.001, due[0][0] - time.monotonic()))
        for fd, _ in poller.poll(wait_s):
            read(by_fd[fd])
        now = time.monotonic()
    for rank in ranks:
        rank.steps_until(end, rate)
    for rank in ranks:
        rank.flush(time.monotonic())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(r.persisted < r.seq for r in ranks):
        for rank in ranks:
            read(rank)
        time.sleep(0.005)
    poller.close()
    for rank in ranks:
        rank.sock.send(encode(Bye(run=rank.run, rank=rank.rank, step=rank.step)))
        rank.sock.close()
    ctx.term()
    return {
        "sent": {f"{r.run}/{r.rank}": [r.sent, r.seq, r.persisted] for r in ranks},
        "received": [(*item, r.rank) for r in ranks for item in r.received],
        "errors": {
            code: sum(r.errors.get(code, 0) for r in ranks) for r in ranks for code in r.errors
        },
        "steps": sum(r.step for r in ranks),
        "worst_late_s": late,
        "late_s": lateness,
    }


# --- the test ----------------------------------------------------------------------


class Daemon:
    def __init__(self, state_dir: Path, shards: int = 1) -> None:
        exe = Path(sys.executable).parent / "lrpilot"
        self.shards = shards
        self.base_port = free_ports(shards) if shards > 1 else 0
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.control = f"tcp://127.0.0.1:{free_port()}"
        self.metrics = f"http://127.0.0.1:{free_port()}/metrics"
        self.state_dir = state_dir
        self.log = open(state_dir.parent / "daemon.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(exe),
                "daemon",
                "--address",
                self.address,
                "--control-address",
                self.control,
                "--state-dir",
                str(state_dir),
                "--metrics-addr",
                self.metrics[7:-8],
                "--max-runs",
                "100000",
                "--log-level",
                "warning",
                *(
                    ["--shards", str(shards), "--shard-base-port", str(self.base_port)]
                    if shards > 1
                    else []
                ),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.metrics[:-8] + "/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start: see daemon.log") from None
                time.sleep(0.05)

    def sample(self) -> tuple[float, int]:
        """(CPU seconds so far, RSS bytes) of the daemon, from /proc: of all
        its processes with --shards (the front, the shards, multiprocessing's
        resource tracker)."""
        cpu, rss = 0.0, 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    rss += next(
                        int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")
                    )
            except (OSError, StopIteration):
                continue  # a shard between two lives
            cpu += cpu_seconds(pid)
        return cpu, rss

    def pids(self) -> list[int]:
        pids = [self.proc.pid]
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                pids += [int(pid) for pid in f.read().split()]
        except OSError:
            pass
        return pids

    def data_address(self, run: str) -> str:
        """Where ``run``'s records go: the daemon, or the shard it hashes to."""
        if self.shards == 1:
            return self.address
        from lrpilot.daemon.service.sharding import shard_of

        return f"tcp://127.0.0.1:{self.base_port + shard_of(run, self.shards)}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]

    return {"n": len(values), "p50": at(0.50), "p99": at(0.99), "max": values[-1]}


def operator(control: str, runs: list[str], every: float, stop: threading.Event, log: list):
    """Hold a random run's LR, then release it, every ``every`` seconds."""
    from lrpilot.daemon.cli.control_client import ControlClient, ControlClientError

    chooser = random.Random(7)
    with ControlClient(control, timeout=10.0, actor="load-operator") as client:
        held: str | None = None
        while not stop.wait(every):
            try:
                sent = time.time()
                if held is None:
                    held = chooser.choice(runs)
                    command = client.set_lr(held, 0.01)
                else:
                    command = client.resume(held)
                    held = None
                log.append((command.run, command.version, sent, time.time() - sent))
            except ControlClientError as exc:
                log.append(("error", 0, time.time(), str(exc)))


def operated(runs: list[dict], probe_runs: list[dict]) -> list[str]:
    """The runs the operator picks from: every run, the probe runs three
    times as often as all others together (enough of its commands reach a
    probe for a p99)."""
    names = [r["run"] for r in runs]
    probes = [r["run"] for r in probe_runs]
    return names + probes * max(1, 3 * len(names) // max(1, len(probes)))


def logged(name: str, target: Any, args: tuple, stop: Any, logs: Any) -> None:
    """Run ``target(*args, stop, log)`` in a process of its own; put
    ``(name, log)`` on ``logs`` when ``stop`` is set, or when the bench is
    gone (killed, it cannot set it: the helper would go on for ever)."""
    bench = os.getppid()

    def watch_bench() -> None:
        while not stop.wait(0.5):
            if os.getppid() != bench:
                stop.set()

    threading.Thread(target=watch_bench, daemon=True).start()
    log: list = []
    target(*args, stop, log)
    logs.put((name, log))


def scraper(url: str, every: float, stop: threading.Event, log: list) -> None:
    while not stop.wait(every):
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:
                size = len(answer.read())
            log.append((time.monotonic() - started, size))
        except OSError as exc:
            log.append((time.monotonic() - started, str(exc)))


def ended_runs_rss(daemon: Daemon, count: int) -> float:
    """RSS the daemon keeps per run that came and ended (hello, 20 records, bye)."""
    from lrpilot.protocol import STEP, BatchEncoder, Bye, GroupInfo, Hello, encode

    before = daemon.sample()[1]
    ctx = zmq.Context()
    socks: dict[str, zmq.Socket] = {}
    for i in range(count):
        run = f"ended-{i:05d}"
        # Straight to the run's shard: the moved answer is not what is measured.
        where = daemon.data_address(run)
        if where not in socks:
            socks[where] = ctx.socket(zmq.DEALER)
            socks[where].connect(where)
        sock = socks[where]
        sock.send(encode(Hello(run=run, groups=[GroupInfo(name="0", lr=0.1)], policy=POLICIES[1])))
        records = [(k, k, STEP, {"loss": 1.0}) for k in range(1, 21)]
        sock.send_multipart(BatchEncoder(run, 0).encode(records, {}))
        sock.send(encode(Bye(run=run, step=20)))
    # Every message handled: the daemon answers in order; wait for its answers.
    received = 0
    poller = zmq.Poller()
    for sock in socks.values():
        poller.register(sock, zmq.POLLIN)
    while received < 2 * count:  # a welcome and a persisted (or more) per run
        ready = poller.poll(10_000)
        if not ready:
            break
        for sock, _ in ready:
            sock.recv_multipart()
            received += 1
    for sock in socks.values():
        sock.close(linger=0)
    ctx.term()
    time.sleep(1.5)  # two sweeps of the daemon's loop: sessions and rows settled
    return (daemon.sample()[1] - before) / count


def run_load(
    args: argparse.Namespace, ranks: int, seconds: float, where: Path, shards: int
) -> dict:
    state = where / "state"
    state.mkdir(parents=True)
    daemon = Daemon(state, shards)
    result: dict[str, Any] = {
        "ranks": ranks,
        "shards": shards,
        "seconds": seconds,
        "procs": args.procs,
        "send_interval_s": args.send_interval,
        "load_nice": args.nice,
    }
    try:
        base_rss = daemon.sample()[1]
        if args.memory:
            result["rss_per_ended_run_bytes"] = ended_runs_rss(daemon, 1000)
        probes = min(args.probes, ranks - 1)
        runs = layout(ranks - probes, "load")
        probe_runs = [
            {"run": f"probe-{i:04d}", "world": 1, "policy": POLICIES[0]} for i in range(probes)
        ]
        members = [(run, r) for run in runs for r in range(run["world"])]
        chunks = [members[i :: args.procs] for i in range(args.procs)]
        if probe_runs:
            chunks.append([(run, 0) for run in probe_runs])
        configs = []
        for i, chunk in enumerate(chunks):
            path = where / f"load{i}.json"
            path.write_text(
                json.dumps(
                    {
                        "address": daemon.address,
                        "ranks": chunk,
                        "rate": args.rate,
                        "seconds": seconds,
                        "send_interval": args.send_interval,
                    }
                )
            )
            configs.append(path)
        procs = [
            subprocess.Popen(
                [sys.executable, str(Path(__file__)), "--worker", str(p)],
                # Its result goes to a file: a pipe's 64 KiB would block a
                # worker that writes more until this process reads it, which
                # is only after every worker has exited.
                text=True,
                # The probe ranks' process (the last) runs at the daemon's
                # priority: ranks on hosts of their own.
                preexec_fn=(lambda: os.nice(args.nice)) if args.nice and i < args.procs else None,
            )
            for i, p in enumerate(configs)
        ]
        # The operator and the scraper each in a process of their own: in
        # this one, reading and unzipping 2 MB bodies held up the operator's
        # own clock (its figures were this process's GIL as much as the
        # daemon's answer).
        spawn = multiprocessing.get_context("spawn")
        stop = spawn.Event()
        logs: Any = spawn.Queue()
        helpers = [
            spawn.Process(
                target=logged,
                args=(
                    "operator",
                    operator,
                    (daemon.control, operated(runs, probe_runs), args.operator_every),
                    stop,
                    logs,
                ),
            ),
            spawn.Process(
                target=logged,
                args=("scraper", scraper, (daemon.metrics, args.scrape_every), stop, logs),
            ),
        ]
        time.sleep(min(3.0, seconds / 5))  # the hellos in, before the operator starts
        for helper in helpers:
            helper.start()
        samples, load_samples = [], []
        t0 = time.monotonic()
        while any(p.poll() is None for p in procs):
            cpu, rss = daemon.sample()
            samples.append((time.monotonic() - t0, cpu, rss, dir_bytes(state)))
            load_samples.append((time.monotonic() - t0, sum(cpu_seconds(p.pid) for p in procs)))
            time.sleep(1.0)
        stop.set()
        got = dict(logs.get(timeout=60) for _ in helpers)
        for helper in helpers:
            helper.join(30)
        operations, scrapes = got["operator"], got["scraper"]
        outputs = [json.loads(p.with_suffix(".out").read_text()) for p in configs]
        history = journal(state)
    finally:
        daemon.stop()
    stored = stored_counts(state)
    sent, unpersisted = {}, 0
    for out in outputs:
        for key, (count, seq, persisted) in out["sent"].items():
            sent[key] = count
            unpersisted += seq - persisted
    driver_sent = {key.rsplit("/", 1)[0]: n for key, n in sent.items() if key.endswith("/0")}
    missing = sum(max(0, n - stored.get(run, 0)) for run, n in driver_sent.items())
    made = {(run, version): (actor, t) for run, version, actor, t in history}
    decision, by_operator = [], []
    at_probes: dict[str, list[float]] = {"decision": [], "operator": []}
    asked = {(run, version): sent_at for run, version, sent_at, _ in operations if run != "error"}
    for out in outputs:
        for run, version, actor, wall, _rank in out["received"]:
            if actor == "policy" and (run, version) in made:
                took, kind = (wall - made[(run, version)][1]) * 1000, "decision"
            elif (run, version) in asked:
                took, kind = (wall - asked[(run, version)]) * 1000, "operator"
            else:
                continue
            if run.startswith("probe-"):
                at_probes[kind].append(took)
            else:
                (decision if kind == "decision" else by_operator).append(took)
    # The load's own window, past its start (the hellos, the first sends).
    steady = [s for s in samples if seconds * 0.2 <= s[0] <= seconds]
    load_steady = [s for s in load_samples if seconds * 0.2 <= s[0] <= seconds]
    load_cpu = (
        (load_steady[-1][1] - load_steady[0][1]) / (load_steady[-1][0] - load_steady[0][0])
        if len(load_steady) > 1
        else None
    )
    thirds = [steady[: len(steady) // 2], steady[len(steady) // 2 :]]
    cpu_share = [
        (part[-1][1] - part[0][1]) / (part[-1][0] - part[0][0]) if len(part) > 1 else None
        for part in thirds
    ]
    rss_mean = [sum(s[2] for s in part) / len(part) if part else None for part in thirds]
    store_rate = (
        (steady[-1][3] - steady[0][3]) / (steady[-1][0] - steady[0][0]) if len(steady) > 1 else 0
    )
    records_stored = sum(stored.values())
    steps = sum(out["steps"] for out in outputs)
    result.update(
        {
            "records_sent": sum(sent.values()),
            "records_stored": records_stored,
            "steps_per_s": steps / seconds,
            "lost": unpersisted + missing,
            "unpersisted": unpersisted,
            "missing_from_store": missing,
            "errors": merge(out["errors"] for out in outputs),
            "worst_step_late_s": max(out["worst_late_s"] for out in outputs),
            "load_late_ms": percentiles([x * 1000 for out in outputs for x in out["late_s"]]),
            "load_cpu_cores": load_cpu,
            "decision_ms": percentiles(decision),
            "operator_ms": percentiles(by_operator),
            "probes": probes,
            "probe_decision_ms": percentiles(at_probes["decision"]),
            "probe_operator_ms": percentiles(at_probes["operator"]),
            "operator_answer_ms": percentiles(
                [op[3] * 1000 for op in operations if op[0] != "error"]
            ),
            "operator_errors": [op for op in operations if op[0] == "error"][:3],
            "scrape_s": percentiles([s[0] for s in scrapes if not isinstance(s[1], str)]),
            "scrape_errors": [s for s in scrapes if isinstance(s[1], str)][:3],
            "daemon_cpu_cores": cpu_share,
            "daemon_rss_mb": [None if r is None else r / 2**20 for r in rss_mean],
            "rss_per_active_rank_bytes": (max(s[2] for s in samples) - base_rss) / ranks,
            "store_bytes_per_hour": store_rate * 3600,
            "store_bytes_per_million_records": dir_bytes(state) / max(1, records_stored) * 1e6,
            "samples": samples,
        }
    )
    return result


def merge(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def store_dirs(state: Path) -> list[Path]:
    """The state dir, or its shards' (--shards)."""
    shards = sorted(state.glob("shard-*"))
    return shards or [state]


def journal(state: Path) -> list[tuple[str, int, str, float]]:
    from lrpilot.daemon.service.schema import DB_NAME, open_readonly

    entries = []
    for where in store_dirs(state):
        db = open_readonly(where / DB_NAME)
        try:
            entries += list(db.execute("SELECT run_id, version, actor, time FROM journal"))
        finally:
            db.close()
    return entries


def stored_counts(state: Path) -> dict[str, int]:
    """Records in the store per run (the driver's stream), as the daemon reads them."""
    from lrpilot.daemon.service.records import read_records
    from lrpilot.daemon.service.schema import DB_NAME, open_readonly

    counts = {}
    for where in store_dirs(state):
        db = open_readonly(where / DB_NAME)
        try:
            runs = [row[0] for row in db.execute("SELECT DISTINCT run_id FROM batches")]
            counts.update({run: sum(1 for _ in read_records(db, run)) for run in runs})
        finally:
            db.close()
    return counts


def verdict(result: dict, at: str = "") -> list[str]:
    """The targets a load run misses (none: it passed), at every simulated
    rank, or (``at="probe_"``) at the probe ranks."""
    missed = []
    if result["lost"]:
        missed.append(f"{result['lost']} records lost")
    for name in (f"{at}decision_ms", f"{at}operator_ms"):
        p99 = result[name]["p99"]
        if p99 is None or p99 > TARGET_P99_MS:
            missed.append(f"{name} p99 {p99} > {TARGET_P99_MS}")
    return missed


def show(result: dict) -> str:
    d, o, s = result["decision_ms"], result["operator_ms"], result["scrape_s"]
    pd, po = result["probe_decision_ms"], result["probe_operator_ms"]
    a = result["operator_answer_ms"]

    def ms(x):
        return "-" if x is None else f"{x:.1f}"

    cpu = " -> ".join("-" if c is None else f"{c:.2f}" for c in result["daemon_cpu_cores"])
    rss = " -> ".join("-" if r is None else f"{r:.0f}" for r in result["daemon_rss_mb"])
    lines = [
        f"{result['ranks']} ranks in {result['procs']} processes, {result['seconds']:.0f} s, "
        f"daemon of {result.get('shards', 1)} shard(s), "
        f"sends every {result['send_interval_s'] * 1000:g} ms: "
        f"{result['steps_per_s']:.0f} steps/s, {result['records_sent']} records sent, "
        f"{result['records_stored']} stored (drivers'), lost {result['lost']} "
        f"({result['unpersisted']} never persisted, "
        f"{result['missing_from_store']} not in the store)",
        f"  decision -> rank  p50 {ms(d['p50'])} ms  p99 {ms(d['p99'])} ms  (n={d['n']})",
        f"  at the {result['probes']} probe ranks (a process at the daemon's priority): "
        f"decision p50 {ms(pd['p50'])} ms, p99 {ms(pd['p99'])} ms (n={pd['n']}); "
        f"operator p50 {ms(po['p50'])} ms, p99 {ms(po['p99'])} ms (n={po['n']})",
        f"  operator -> rank  p50 {ms(o['p50'])} ms  p99 {ms(o['p99'])} ms  (n={o['n']}; "
        f"the daemon's answer p50 {ms(a['p50'])} ms, p99 {ms(a['p99'])} ms)",
        f"  scrape            p50 {ms(s['p50'] and s['p50'] * 1000)} ms  "
        f"p99 {ms(s['p99'] and s['p99'] * 1000)} ms  (n={s['n']})",
        f"  daemon CPU (cores, first half of the load vs second) {cpu}; RSS MB {rss}",
        f"  RSS per active rank {result['rss_per_active_rank_bytes'] / 1024:.1f} KiB"
        + (
            f"; per ended run {result['rss_per_ended_run_bytes'] / 1024:.1f} KiB"
            if "rss_per_ended_run_bytes" in result
            else ""
        ),
        f"  store {result['store_bytes_per_hour'] / 2**30:.2f} GiB/hour, "
        f"{result['store_bytes_per_million_records'] / 2**20:.1f} MiB per million records",
        f"  load processes: {result['load_cpu_cores'] or 0:.2f} cores; their sends' lateness "
        f"p50 {ms(result['load_late_ms']['p50'])} ms, p99 {ms(result['load_late_ms']['p99'])} ms, "
        f"worst {result['worst_step_late_s'] * 1000:.0f} ms; "
        f"errors {result['errors'] or 'none'}",
    ]
    missed = verdict(result)
    lines.append("  PASS" if not missed else "  FAIL: " + "; ".join(missed))
    missed = verdict(result, "probe_")
    lines.append(
        "  at the probe ranks: " + ("PASS" if not missed else "FAIL: " + "; ".join(missed))
    )
    return "\n".join(lines)


def search(args: argparse.Namespace, shards: int, where: Path, done: int) -> list[dict]:
    """One load run against a daemon of ``shards``; with --ceiling, then more
    or fewer ranks until a passing count sits right below a failing one. The
    ceiling is judged at the probe ranks when there are some: the other
    ranks' latencies include their own processes' lateness on this machine."""
    results = []
    ranks, seconds, memory = args.ranks, args.seconds, args.memory
    passed: list[int] = []
    failed: list[int] = []
    while True:
        print(
            f"load: {ranks} ranks, {args.procs} processes, {seconds:.0f} s, {shards} shard(s)",
            file=sys.stderr,
        )
        args.memory = memory
        result = run_load(args, ranks, seconds, where / f"{done + len(results)}-{ranks}", shards)
        results.append(result)
        print(show(result), flush=True)
        missed = verdict(result, "probe_" if result["probes"] else "")
        (failed if missed else passed).append(ranks)
        if not args.ceiling:
            break
        # Up by half while it passes, down by a third while it fails,
        # then halfway between, until the two are within a fifth.
        if failed and passed:
            low, high = max(passed), min(failed)
            if high <= low * 1.2:
                break
            ranks = (low + high) // 2
        else:
            ranks = int(ranks * 1.5) if not failed else int(min(failed) / 1.5)
        if ranks > 8000 or ranks < max(args.procs, 10):
            break
        seconds, memory = min(seconds, 20.0), False
    if args.ceiling:
        print(
            f"ceiling with {shards} shard(s): passes at {max(passed) if passed else 'none'} "
            f"ranks, fails at {min(failed) if failed else 'none found'} "
            f"(p99 <= {TARGET_P99_MS:g} ms at the probe ranks, no record lost)",
            flush=True,
        )
    return results


def shard_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 1,2, got {text!r}") from None
    if not counts or any(not 1 <= n <= 64 for n in counts):
        raise argparse.ArgumentTypeError(f"shard counts are 1 to 64, got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/load.py", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1000, help="simulated ranks (default 1000)")
    parser.add_argument("--procs", type=int, default=8, help="load processes (default 8)")
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (default 60)")
    parser.add_argument("--rate", type=float, default=100.0, help="steps/s per rank (default 100)")
    parser.add_argument(
        "--operator-every",
        type=float,
        default=0.1,
        metavar="S",
        # Ten a second: an operator p99 of 60 s then rests on ~450 commands
        # at the probes, not on the worst of ~90 (every 0.5 s, until 2026-11-28).
        help="seconds between operator commands (default 0.1)",
    )
    parser.add_argument(
        "--scrape-every",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between scrapes of /metrics (default 2)",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="after the run, runs of 20 s with 1.5x the ranks while the targets hold "
        "(1/1.5 while they do not) until a passing count sits right below a failing one",
    )
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the RSS-per-ended-run phase"
    )
    parser.add_argument("--json", metavar="PATH", help="write every result as JSON")
    parser.add_argument(
        "--send-interval",
        type=float,
        default=None,
        metavar="S",
        help="seconds between a rank's sends of its step records (default: "
        "the hook's, lrpilot.hook.SEND_INTERVAL)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=10,
        metavar="N",
        help="niceness of the load processes (default 10): they stand in for the ranks' own "
        "hosts, so the daemon gets the CPU it has on a host of its own; 0 shares the "
        "machine's cores evenly between the daemon and the load",
    )
    parser.add_argument(
        "--shards",
        type=shard_counts,
        default=[1, 2],
        metavar="N[,N...]",
        help="the daemon's --shards, one load run (or ceiling search) for each: N "
        "processes serve the runs behind one address (default 1,2: one process, then two)",
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=16,
        metavar="K",
        help="of the ranks, K single-rank plateau runs in a process of their own at the "
        "daemon's priority (default 16): ranks on hosts of their own, where the others share "
        "the machine's cores at --nice; three in four of the operator's commands go to them",
    )
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        config = Path(args.worker)
        result = load_process(json.loads(config.read_text()))
        config.with_suffix(".out").write_text(json.dumps(result))
        return 0
    if args.probes < 0:
        parser.error("--probes must be at least 0")
    for name in ("ranks", "procs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.seconds <= 0 or args.rate <= 0:
        parser.error("--seconds and --rate must be positive")
    if args.send_interval is None:
        from lrpilot.hook import SEND_INTERVAL

        args.send_interval = SEND_INTERVAL
    results: list[dict] = []
    where = Path(tempfile.mkdtemp(prefix="lrpilot-load-"))
    try:
        for shards in args.shards:
            results += search(args, shards, where, len(results))
    finally:
        shutil.rmtree(where, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
