"""What a Prometheus scrape of the daemon costs, with 1,000 live runs of 4
param groups each, against an empty daemon's scrape in the same run.

Two real daemons (:class:`~lrpilot.daemon.service.server.Daemon`, each in its own
process, /metrics on a free port). The full one gets 1,000 runs: one DEALER
socket per run says hello (4 groups, a ``plateau`` policy on ``val_loss``)
and sends a step with 8 metrics and a report, so every per-run, per-group and
per-rank series exists. Then both are scraped with ``GET /metrics``
alternately, one after the other (never at once); the time is from the
request to the last byte of the body, on a connection opened per scrape as
Prometheus does at a 1 s+ interval, with ``Accept-Encoding: gzip`` as
Prometheus sends it, so the time includes the daemon's gzip. The sizes are
of the text (uncompressed) and of the gzipped body sent.

A scrape runs on the daemon's HTTP thread and holds the GIL while it renders,
so it can delay the daemon loop: the last rows time a lock-step session's
round trip (a 1-record batch out, ``processed`` back) on the full daemon with
and without a scraper fetching /metrics back to back from another process.
"""

from __future__ import annotations

import gzip
import resource
import subprocess
import sys
import time
import urllib.request
import uuid

import zmq
from harness import Row, Summary, Worker

from lrpilot.protocol import (
    REPORT,
    STEP,
    BatchEncoder,
    ClientStats,
    GroupInfo,
    Hello,
    Processed,
    Welcome,
    decode,
    encode,
)

RUNS, GROUPS = 1_000, 4
NAMES = ("loss", "acc", "grad_norm", "tokens", "m4", "m5", "m6", "m7")
POLICY = {"kind": "plateau", "metric": "val_loss", "patience": 10}


def raise_fd_limit(need: int) -> None:
    """A socket per run, on both sides: more descriptors than the usual 1,024.
    Workers started after this inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        wanted = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def connect(context: zmq.Context, address: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def expect(sock: zmq.Socket, kind: type, what: str) -> object:
    while True:
        if not sock.poll(10_000):
            raise RuntimeError(f"bench: no {what} from the daemon")
        reply = decode(sock.recv_multipart())
        if isinstance(reply, kind):
            return reply


def populate(context: zmq.Context, address: str, runs: int) -> list[zmq.Socket]:
    """``runs`` sync sessions, each with one step and one report taken in."""
    groups = [GroupInfo(name=f"g{i}", lr=0.1 / (i + 1)) for i in range(GROUPS)]
    socks = []
    for i in range(runs):
        sock = connect(context, address)
        run = f"bench-run-{i:04d}"
        sock.send(encode(Hello(run=run, groups=groups, policy=POLICY, sync=True)))
        metrics = dict(zip(NAMES, (1.0 + i * 1e-3, 0.5, 2.0, 512.0, 4.0, 5.0, 6.0, 7.0)))
        records = [(1, 1, STEP, metrics), (2, 1, REPORT, {"val_loss": 1.5})]
        frames = BatchEncoder(run, 0).encode(records, ClientStats())
        socks.append((sock, frames))
    for sock, _ in socks:
        expect(sock, Welcome, "welcome")
    for sock, frames in socks:
        sock.send_multipart(frames)
    for sock, _ in socks:
        expect(sock, Processed, "processed")
    return [sock for sock, _ in socks]


def fetch(url: str) -> tuple[int, int, int]:
    """(nanoseconds, bytes of text, bytes sent) of one GET that accepts gzip,
    as Prometheus's does (the time stops at the body's last byte, before it
    is decompressed)."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    start = time.perf_counter_ns()
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
        encoding = response.headers.get("Content-Encoding")
    took = time.perf_counter_ns() - start
    text = gzip.decompress(body) if encoding == "gzip" else body
    return took, len(text), len(body)


def scrapes(urls: list[str], rounds: int) -> tuple[list[list[int]], list[int], list[int]]:
    """Alternate between the daemons, ``rounds`` times (after 2 warm-ups each):
    the times, and the last text and sent sizes of each."""
    for url in urls * 2:
        fetch(url)
    times: list[list[int]] = [[] for _ in urls]
    sizes, sent = [0] * len(urls), [0] * len(urls)
    for _ in range(rounds):
        for i, url in enumerate(urls):
            seconds, sizes[i], sent[i] = fetch(url)
            times[i].append(seconds)
    return times, sizes, sent


def sync_round_trips(context: zmq.Context, address: str, count: int) -> list[int]:
    """Nanoseconds from sending a 1-record batch to its ``processed``."""
    sock = connect(context, address)
    run = f"bench-sync-{uuid.uuid4().hex[:8]}"
    sock.send(encode(Hello(run=run, groups=[GroupInfo(name="0", lr=0.1)], sync=True)))
    expect(sock, Welcome, "welcome")
    encoder = BatchEncoder(run, 0)
    samples = []
    for step in range(1, count + 1):
        frames = encoder.encode([(step, step, STEP, {"loss": 1.0})], ClientStats())
        start = time.perf_counter_ns()
        sock.send_multipart(frames)
        expect(sock, Processed, "processed")
        samples.append(time.perf_counter_ns() - start)
    sock.close()
    return samples


# Scrapes back to back (accepting gzip, as Prometheus does) until stdin
# closes, then prints how many it made. In its own process, so that reading
# the body does not compete with this one's GIL.
SCRAPER = """
import sys, threading, urllib.request
done, stop = 0, threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
request = urllib.request.Request(sys.argv[1], headers={"Accept-Encoding": "gzip"})
while not stop.is_set():
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
    done += 1
print(done)
"""


def under_scrapes(
    context: zmq.Context, address: str, url: str, count: int
) -> tuple[list[int], int]:
    """Round trips while another process scrapes ``url`` back to back."""
    scraper = subprocess.Popen(
        [sys.executable, "-c", SCRAPER, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        fetch(url)  # the scraper is started by the time this one is back
        samples = sync_round_trips(context, address, count)
        out, _ = scraper.communicate("", timeout=60)
    finally:
        scraper.kill()
    return samples, int(out)


def measure(runs: int = RUNS, rounds: int = 20, round_trips: int = 2000) -> tuple[list, dict]:
    raise_fd_limit(4 * runs + 256)
    context = zmq.Context()
    with (
        Worker("daemon", "--metrics", label="scrape-full") as full,
        Worker("daemon", "--metrics", label="scrape-empty") as empty,
    ):
        full_url, empty_url = full._expect("METRICS"), empty._expect("METRICS")
        started = time.perf_counter()
        socks = populate(context, full.address, runs)
        populated_s = time.perf_counter() - started
        (full_times, empty_times), (full_bytes, empty_bytes), (full_gz, empty_gz) = scrapes(
            [full_url, empty_url], rounds
        )
        quiet = Summary.of(sync_round_trips(context, full.address, round_trips))
        samples, scraped = under_scrapes(context, full.address, full_url, round_trips)
        busy = Summary.of(samples)
        for sock in socks:
            sock.close()
    context.term()
    full_s, empty_s = Summary.of(full_times), Summary.of(empty_times)
    rows = [
        Row(
            f"scrape /metrics, {runs:,} runs × {GROUPS} groups, p50",
            full_s.p50,
            "ns",
            empty_s.p50,
            "empty daemon's scrape",
        ),
        Row(f"scrape /metrics, {runs:,} runs × {GROUPS} groups, slowest", full_s.p99, "ns"),
        Row("scrape /metrics, empty daemon, p50", empty_s.p50, "ns"),
        Row(
            "sync round trip while /metrics is scraped back to back, p50",
            busy.p50,
            "ns",
            quiet.p50,
            "no scrapes",
        ),
        Row(
            "sync round trip while /metrics is scraped back to back, p99",
            busy.p99,
            "ns",
            quiet.p99,
            "no scrapes",
        ),
    ]
    detail = {
        "runs": runs,
        "groups": GROUPS,
        "populate_s": populated_s,
        "full_scrape_ns": full_times,
        "empty_scrape_ns": empty_times,
        "full_bytes": full_bytes,
        "empty_bytes": empty_bytes,
        "full_gzip_bytes": full_gz,
        "empty_gzip_bytes": empty_gz,
        "scrapes_during_round_trips": scraped,
        "round_trip_quiet_ns": quiet.__dict__,
        "round_trip_scraped_ns": busy.__dict__,
    }
    return rows, detail


if __name__ == "__main__":
    import json
    import sys

    rows, detail = measure(runs=int(sys.argv[1]) if len(sys.argv) > 1 else RUNS)
    for row in rows:
        print(row.as_dict())
    detail.pop("full_scrape_ns"), detail.pop("empty_scrape_ns")
    print(json.dumps(detail, indent=1, default=str))
