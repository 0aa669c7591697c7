"""What the daemon keeps in memory and on disk, as rows of the bench table.

A real `lrpilot daemon` (bench/load.py's) with a fresh state dir; its RSS
read from /proc after each phase, against the RSS it had with no run (the
baseline of each row):

- per ended run: ``ended`` runs that each say hello (a `cosine` policy),
  send 20 records and bye, as a finished job leaves them (in memory up to
  --max-ended-runs, then in the store only);
- per active rank: ``ranks`` connected ranks of runs of 8 (a `plateau` on
  the ranks' mean val_loss), each having sent 100 steps and their reports;
- the store's bytes per million records: the state dir's growth while one
  sync session sends ``records`` records (8 metrics each, batches of 256),
  scaled to a million.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import zmq
from harness import Row
from load import Daemon, dir_bytes, ended_runs_rss

from lrpilot.protocol import (
    REPORT,
    STEP,
    BatchEncoder,
    Bye,
    GroupInfo,
    Hello,
    Processed,
    decode,
    encode,
)

PLATEAU = {"kind": "plateau", "metric": "val_loss", "patience": 5}


def settle(daemon: Daemon) -> int:
    """The daemon's RSS once its loop has swept twice (sessions, rows)."""
    time.sleep(2.2)
    return daemon.sample()[1]


def active_ranks_rss(daemon: Daemon, ranks: int) -> tuple[float, list[zmq.Socket], zmq.Context]:
    """RSS per connected rank; the sockets stay open (the ranks stay active)."""
    before = settle(daemon)
    ctx = zmq.Context()
    socks = []
    for i in range(ranks):
        run, rank = f"active-{i // 8:04d}", i % 8
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.address)
        hello = Hello(run=run, rank=rank, world_size=8, groups=[GroupInfo(name="0", lr=0.1)],
                      policy=PLATEAU)  # fmt: skip
        sock.send(encode(hello))
        records, seq = [], 0
        for step in range(1, 101):
            seq += 1
            records.append((seq, step, STEP, {"loss": 1.0 / step}))
            if step % 10 == 0:
                seq += 1
                records.append((seq, step, REPORT, {"val_loss": 1.0 / step}))
        sock.send_multipart(BatchEncoder(run, rank).encode(records, {}))
        socks.append(sock)
    return (settle(daemon) - before) / ranks, socks, ctx


def store_bytes_per_million(daemon: Daemon, records: int) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.address)
    run = "store-bytes"
    sock.send(encode(Hello(run=run, groups=[GroupInfo(name="0", lr=0.1)], sync=True,
                           policy={"kind": "cosine", "T_max": 10**6})))  # fmt: skip
    sock.recv_multipart()  # the welcome
    before = dir_bytes(daemon.state_dir)
    metrics = {f"m{i}": 0.5 for i in range(7)}
    seq = 0
    while seq < records:
        batch = [(seq + k + 1, seq + k + 1, STEP, {"loss": 1.0, **metrics}) for k in range(256)]
        seq += 256
        sock.send_multipart(BatchEncoder(run, 0).encode(batch, {}))
        while True:  # sync: the daemon processed it
            message = decode(sock.recv_multipart())
            if isinstance(message, Processed):
                break
    sock.send(encode(Bye(run=run, step=seq)))
    time.sleep(1.0)  # the last ticks committed
    grown = dir_bytes(daemon.state_dir) - before
    sock.close()
    ctx.term()
    return grown / seq * 1e6


def measure(ended: int = 1000, ranks: int = 512, records: int = 200_000) -> tuple[list[Row], dict]:
    where = Path(tempfile.mkdtemp(prefix="lrpilot-memory-"))
    state = where / "state"
    state.mkdir()
    daemon = Daemon(state)
    try:
        empty = settle(daemon)
        per_ended = ended_runs_rss(daemon, ended)
        per_rank, socks, ctx = active_ranks_rss(daemon, ranks)
        for sock in socks:
            sock.close()
        ctx.term()
        per_million = store_bytes_per_million(daemon, records)
    finally:
        daemon.stop()
        shutil.rmtree(where, ignore_errors=True)
    rows = [
        Row("daemon RSS with no run (the baseline of the two below)", empty / 2**20, "MiB"),
        Row(f"daemon RSS added per ended run ({ended} runs)", per_ended / 1024, "KiB"),
        Row(f"daemon RSS added per active rank ({ranks} ranks, runs of 8)", per_rank / 1024,
            "KiB"),
        Row("store bytes per million records (8 metrics each)", per_million / 2**20, "MiB"),
    ]  # fmt: skip
    detail = {
        "empty_rss_bytes": empty,
        "per_ended_run_bytes": per_ended,
        "per_active_rank_bytes": per_rank,
        "store_bytes_per_million": per_million,
    }
    return rows, detail
