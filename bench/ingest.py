"""How many records the daemon ingests per second on one core, next to raw
ZeroMQ PUSH/PULL message rates between two processes, in the same run.

Daemon ingest: a real :class:`~lrpilot.daemon.service.server.Daemon` in its own
process. The benchmark says hello as a sync session (so the daemon answers
every batch with ``processed``), then sends pre-encoded metrics batches
(:class:`~lrpilot.protocol.BatchEncoder`, 256 records of 8 metrics each) as
fast as the socket takes them and waits for the ``processed`` of the last
record. The rate is records / (first send → last ``processed``): every record
decoded, validated (header by pydantic, values finite) and fed to the run's
``plateau`` policy on ``loss`` (a loss that keeps improving, so the policy
decides nothing and no command is sent).

Raw baselines: a PUSH socket here sends N messages one ``send()`` at a time
to a PULL socket in another process that ``recv()``s them one at a time; the
rate is measured on the receiving side from its first message to its last.
Once with 72-byte binary frames (one packed record), once with each message
a JSON record of 8 metrics that the receiver ``json.loads``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict

import zmq
from harness import Row, Worker

from lrpilot.protocol import (
    STEP,
    BatchEncoder,
    ClientStats,
    GroupInfo,
    Hello,
    Persisted,
    Processed,
    Welcome,
    decode,
    encode,
)

BATCH = 256
NAMES = ("loss", "acc", "grad_norm", "lr", "tokens", "m5", "m6", "m7")
POLICY = {"kind": "plateau", "metric": "loss", "patience": 10, "threshold": 0.0}


def metrics_of(step: int) -> dict[str, float]:
    loss = 1.0 / (1.0 + step * 1e-3)  # strictly decreasing: plateau never cuts
    return dict(zip(NAMES, (loss, 1 - loss, 0.5 + loss, 0.1, step * 512.0, loss**2, 3.0, -loss)))


def batches(run: str, first_step: int, count: int) -> list[list[bytes]]:
    encoder = BatchEncoder(run, 0)
    stats = asdict(ClientStats())
    out = []
    step = first_step
    for _ in range(count):
        records = [(s, s, STEP, metrics_of(s)) for s in range(step, step + BATCH)]
        out.append(encoder.encode(records, stats))
        step += BATCH
    return out


def daemon_ingest(records: int, repeats: int) -> tuple[float, dict]:
    """Best records/s over ``repeats`` bursts of ``records`` records."""
    per_burst = max(1, records // BATCH)
    run = "bench-ingest"
    plan = batches(run, 1, per_burst * repeats)
    context = zmq.Context()
    rates = []
    with Worker("daemon", label="ingest") as daemon:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.address)
        hello = Hello(run=run, groups=[GroupInfo(name="0", lr=0.1)], policy=POLICY, sync=True)
        sock.send(encode(hello))
        if not sock.poll(5000):
            raise RuntimeError("bench: the daemon did not answer hello")
        welcome = decode(sock.recv_multipart())
        assert isinstance(welcome, Welcome), welcome
        for r in range(repeats):
            burst = plan[r * per_burst : (r + 1) * per_burst]
            last_seq = (r + 1) * per_burst * BATCH
            start = time.perf_counter_ns()
            for frames in burst:
                sock.send_multipart(frames, copy=False)
            seen = 0
            while seen < last_seq:
                if not sock.poll(10_000):
                    raise RuntimeError(f"bench: no processed({last_seq}) from the daemon")
                reply = decode(sock.recv_multipart())
                if isinstance(reply, Persisted):
                    continue  # the store caught up; this bench counts processing
                if not isinstance(reply, Processed):
                    raise RuntimeError(f"bench: the daemon answered {reply}")
                seen = reply.seq
            elapsed = time.perf_counter_ns() - start
            rates.append(len(burst) * BATCH / (elapsed / 1e9))
        sock.close()
        counts = daemon.finish()
    context.term()
    expected = per_burst * repeats * BATCH
    if counts["records_ingested"] != expected or counts["rejected"]:
        raise RuntimeError(f"bench: daemon ingested {counts}, expected {expected} records")
    return max(rates), {"rates": rates, "records_per_burst": per_burst * BATCH, **counts}


def push_pull(messages: int, payload: bytes, decode_json: bool) -> float:
    """Messages/s a PULL socket in another process receives one recv() at a time."""
    context = zmq.Context()
    args = [str(messages)] + (["json"] if decode_json else [])
    with Worker("pull", *args) as pull:
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(pull.address)
        send = sock.send
        for _ in range(messages):
            send(payload)
        done = pull.finish(stop=False)
        sock.close()
    context.term()
    return done["messages"] / done["seconds"]


def measure(records: int = 60_000, repeats: int = 3, messages: int = 300_000) -> tuple[list, dict]:
    raw_bin = max(push_pull(messages, bytes(8 + 8 * len(NAMES)), False) for _ in range(2))
    record = json.dumps({"step": 123456, "metrics": metrics_of(123456)}).encode()
    raw_json = max(push_pull(messages // 3, record, True) for _ in range(2))
    ingest, detail = daemon_ingest(records, repeats)
    rows = [
        Row(
            "daemon ingest, records/s (batches of 256, sync session)",
            ingest,
            "/s",
            raw_bin,
            "raw PUSH/PULL msgs",
            0.2,
            at_least=True,
        ),
        Row("raw PUSH/PULL, 72 B messages, unbatched", raw_bin, "/s"),
        Row(f"raw PUSH/PULL + json.loads, {len(record)} B JSON records", raw_json, "/s"),
    ]
    detail.update(raw_push_pull_per_s=raw_bin, raw_push_pull_json_per_s=raw_json)
    return rows, detail
