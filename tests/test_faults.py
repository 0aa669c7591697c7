"""One real training job through the faults a daemon meets in production:
a store whose disk fills up and comes back, a `kill -9` and a restart on the
same store, and other clients that stop reading their socket. At the end,
the journal holds every LR change the optimizer used, at the step it used it.

Real processes over real sockets: `lrpilot daemon` with its state dir on its
own small tmpfs (so the disk really fills: the test needs root, and fails
saying so without it), a torch training in lock-step with a plateau on its
validation loss (tests/live/train_faults.py; it logs, per optimizer step, the
LRs the step used and its round trip), a second pilot process that is
SIGSTOPped, and a raw ZeroMQ DEALER that says hello and never reads.

Every wait is a poll with a deadline; every process is killed and the tmpfs
unmounted on the way out.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from statistics import median

import pytest
import zmq
from conftest import ROOT
from procs import (
    LIVE,
    DaemonProcess,
    Training,
    first_difference,
    metric_value,
    mounted_tmpfs,
    read_steps,
    settled_history,
    stream_trainer,
    wait_for,
)

from lrpilot.protocol import REPORT, STEP, BatchEncoder, GroupInfo, Hello, Processed, encode

TRAIN = LIVE / "train_faults.py"
RUN = "faults"
BASE_LRS = [0.2, 0.1]  # body, head
# Cuts now and then on a real training's validation loss, and not so often
# that the LRs reach min_lr before the run ends.
PLATEAU = {
    "kind": "plateau",
    "metric": "val_loss",
    "factor": 0.9,
    "patience": 3,
    "threshold": 0.02,
    "min_lr": 1e-4,
}
REPORT_EVERY = 50
DISK = "128m"  # the state dir's tmpfs: room for the run, and it fills in a moment
HELD = 0.05  # the operator's set-lr while the disk is full
# The deaf client: batches it sends (a step each) in chunks; the daemon
# answers each, and the pipe to it holds 10,000 answers (SNDHWM).
FLOOD_BATCHES, FLOOD_CHUNKS = 20_000, 5


# --- processes and the disk ----------------------------------------------------


@pytest.fixture
def processes(small_disk, processes) -> list:
    """conftest's, set up after the disk: so its processes are stopped
    before the disk they write is unmounted."""
    return processes


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own: a disk that really fills."""
    with mounted_tmpfs(tmp_path / "disk", DISK) as where:
        yield where


def fill(path: Path) -> int:
    """Write ``path`` until its file system has no byte left (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    chunk, total = b"\xff" * 65536, 0
    try:
        while True:
            try:
                total += os.write(fd, chunk)  # the last one may be short
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return total
    finally:
        os.close(fd)


class Trainer:
    """tests/live/train_faults.py in its own process, and its step lines,
    read as they come (each poll reads only what is new)."""

    def __init__(self, where: Path, daemon: DaemonProcess, data: Path) -> None:
        self.out, self.stop_file = where / "faults.jsonl", where / "stop"
        self.output, self.summary = where / "train.out", where / "summary.json"
        config = {
            "address": daemon.address,
            "data": str(data),
            "run": RUN,
            "policy": PLATEAU,
            "lrs": BASE_LRS,
            "sync": True,
            "sync_timeout": 20.0,  # covers a daemon's restart
            "report_every": REPORT_EVERY,
            "out": str(self.out),
            "stop_file": str(self.stop_file),
            "summary": str(self.summary),
            "deadline_s": 100,
            "step_sleep": 0.001,  # pace only: leaves the daemon a core
        }
        path = where / "train.json"
        path.write_text(json.dumps(config))
        with open(self.output, "w") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, str(TRAIN), str(path)],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.steps: list[dict] = []
        self._offset = 0

    def read(self) -> list[dict]:
        if self.proc.poll() not in (None, 0):
            raise AssertionError(
                f"the training exited with {self.proc.returncode}:\n{self.output.read_text()}"
            )
        if self.out.exists():
            with open(self.out, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # whole lines only
            self._offset += end
            self.steps += [json.loads(line) for line in chunk[:end].splitlines()]
        return self.steps

    def at(self, step: int, timeout: float = 30.0, what: str = "") -> dict:
        """Wait until the training has done ``step``; that step's line."""
        wait_for(
            lambda: len(self.read()) >= step,
            timeout,
            what or f"the training to reach step {step}",
            lambda: f"at step {len(self.steps)}\n{self.output.read_text()}",
        )
        return self.steps[step - 1]

    @property
    def step(self) -> int:
        return len(self.read())

    def finish(self, timeout: float = 30.0) -> dict:
        self.stop_file.write_text("stop")
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        assert self.proc.returncode == 0, self.output.read_text()
        return json.loads(self.summary.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Daemon:
    """The daemon under test, as the test reaches it: the command line,
    the control plane, its HTTP side, its process."""

    def __init__(self, proc: DaemonProcess) -> None:
        self.proc = proc

    def cli(self, *args: str):
        return self.proc.cli(*args)

    def show(self, run: str = RUN) -> dict:
        return self.proc.ask({"op": "show", "run": run})["run"]

    def history(self) -> list[dict]:
        return self.cli("history", RUN)

    def http(self, path: str) -> tuple[int, str]:
        return self.proc.http(path)

    def metric(self, name: str, **labels: str) -> float:
        value = metric_value(self.proc.scrape(), name, **labels)
        assert value is not None, f"{name} {labels} is not on /metrics"
        return value

    def rss_mib(self) -> float:
        """The daemon's resident anonymous memory (its heaps; not the store's
        files, which the kernel caches and SQLite maps)."""
        status = Path(f"/proc/{self.proc.proc.pid}/status").read_text()
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))
        return int(kib) / 1024


def all_applied(daemon: Daemon) -> bool:
    """Every journal entry of the run says at which step it was applied."""
    history = daemon.proc.ask({"op": "history", "run": RUN})["history"]
    return all(entry["applied_step"] is not None for entry in history)


def applied_through(trainer: Trainer, daemon: Daemon, version: int, timeout: float = 10.0) -> dict:
    """Wait until the training has applied every command up to ``version``
    (a lock-step pilot applies each version once, in order)."""
    return wait_for(
        lambda: trainer.read()[-1]["applied"] >= version and trainer.steps[-1],
        timeout,
        f"the training to apply v{version}",
        lambda: f"applied {trainer.steps[-1]['applied']}; show: {daemon.show()}",
    )


# --- a client that stops reading ---------------------------------------------------


class Deaf:
    """A raw DEALER that says hello for its own run (lock-step, a plateau
    that cuts at every report) and then sends and never reads: the daemon's
    answers (processed, persisted, the cuts' commands) pile up for it. Its
    receive buffers are as small as ZeroMQ and the kernel allow, so they pile
    up in the daemon."""

    def __init__(self, address: str, run: str = "deaf-" + "x" * 195) -> None:
        self.run = run
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 1)
        self.sock.setsockopt(zmq.RCVBUF, 4096)
        self.sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        self.sock.connect(address)
        self.encoder = BatchEncoder(run, 0)
        self.seq = self.last_step = 0
        policy = {"kind": "plateau", "metric": "val_loss", "patience": 0, "factor": 0.99, "eps": 0}
        hello = Hello(run=run, groups=[GroupInfo(name="0", lr=0.1)], policy=policy, sync=True)
        self.sock.send_multipart([encode(hello)])

    def send(self, batches: int, report_every: int = 20) -> None:
        """One step a batch; every ``report_every`` a val_loss that got worse."""
        for _ in range(batches):
            self.last_step += 1
            self.seq += 1
            records = [(self.seq, self.last_step, STEP, {"loss": 1.0})]
            if self.last_step % report_every == 0:
                self.seq += 1
                records.append((self.seq, self.last_step, REPORT, {"val_loss": self.last_step}))
            self.sock.send_multipart(self.encoder.encode(records, {}))

    def drain(self) -> int:
        """Read, at last, what the daemon kept for this client: how many
        messages (until none comes for half a second)."""
        count = 0
        while self.sock.poll(500, zmq.POLLIN):
            self.sock.recv_multipart()
            count += 1
        return count

    def close(self) -> None:
        self.sock.close()
        self.context.term()


# --- what the journal says the optimizer used ----------------------------------------


def lrs_from_journal(journal: list[dict], steps: int) -> list[list[float]]:
    """The LRs of optimizer steps 1..steps as the journal tells them: the
    base LRs, then from each entry's applied step its new LRs (the newest
    version wins where several landed at the same step)."""
    at = {}
    for entry in sorted(journal, key=lambda e: e["version"]):
        if entry["applied_step"] is not None:
            at[entry["applied_step"]] = entry["new_lrs"]
    lrs, out = list(BASE_LRS), []
    for k in range(1, steps + 1):
        lrs = at.get(k, lrs)
        out.append(lrs)
    return out


def differs(got: list, want: list) -> str:
    return first_difference(got, want, "the optimizer used", "the journal says")


# --- the test --------------------------------------------------------------------


def test_a_training_through_a_full_disk_a_kill_9_and_a_deaf_client(
    lrpilot_exe, digits, tmp_path, small_disk, processes
):
    state_dir = small_disk / "state"
    first = DaemonProcess(lrpilot_exe, state_dir, tmp_path / "first.log")
    processes.append(first)
    trainer = Trainer(tmp_path, first, digits)
    processes.append(trainer)
    # A second pilot process, on its own run, to be SIGSTOPped later.
    paused_out = tmp_path / "paused.jsonl"
    paused = Training(
        tmp_path,
        {
            "steps": 1_000_000,
            "seed": 3,
            "report_every": 10,
            "step_sleep": 0.01,
            "deadline_s": 100,
            "trainers": [
                stream_trainer(
                    "paused",
                    first.address,
                    paused_out,
                    policy=PLATEAU,
                    sync_timeout=20.0,
                    lrs=[0.1],
                )
            ],
        },
        name="paused",
    )
    processes.append(paused)
    first.wait_ready()
    daemon = Daemon(first)
    began = time.monotonic()

    # --- the disk fills up, and comes back ---------------------------------------
    trainer.at(300, 60, "the training to start")
    wait_for(lambda: daemon.show()["version"] >= 1, 20, "the plateau's first cut")
    wal = state_dir / "lrpilot.sqlite3-wal"
    # SQLite rewrites its WAL from the start once it has grown past 4 MiB
    # and been checkpointed; until then every commit must grow the file.
    assert wal.stat().st_size < 3 * 2**20, "the WAL grew too soon for the disk to fill"
    filler = small_disk / "filler"
    fill(filler)
    assert os.statvfs(small_disk).f_bavail == 0
    store = str(state_dir / "lrpilot.sqlite3")

    def unhealthy() -> str | None:
        status, body = daemon.http("/healthz")
        return body if status == 503 else None

    said = wait_for(unhealthy, 10, "/healthz to fail on the full disk")
    assert store in said and "database or disk is full" in said, said
    assert daemon.http("/livez") == (200, "ok\n")
    assert daemon.metric("lrpilot_store_up") == 0
    full_at = trainer.step
    journaled = max(e["version"] for e in daemon.history())

    # The operator holds the LRs; the training gets it from the daemon's memory.
    held = daemon.cli("set-lr", RUN, str(HELD))
    applied_through(trainer, daemon, held["version"])
    assert trainer.at(held["effective_step"])["used"] == [HELD, HELD], held
    resumed = daemon.cli("resume", RUN)
    applied_through(trainer, daemon, resumed["version"])
    # ...and the policy's decisions too: one made while the disk is full.
    wait_for(
        lambda: daemon.show()["version"] > resumed["version"],
        20,
        "a plateau cut while the disk is full",
        lambda: f"show: {daemon.show()}",
    )
    decided = daemon.show()["version"]
    applied_through(trainer, daemon, decided)
    # None of it is in the store yet: it waits in the writer.
    assert max(e["version"] for e in daemon.history()) == journaled
    assert unhealthy(), "the store was meant to be failing still"
    # (counted: every entry since the disk filled; a fresh daemon had none before)
    assert daemon.metric("lrpilot_journal_deferred_total") >= decided - journaled >= 3
    assert daemon.metric("lrpilot_store_backlog_batches") > 0
    assert trainer.step > full_at + 100, "the training was meant to go on meanwhile"

    filler.unlink()
    wait_for(lambda: daemon.http("/healthz") == (200, "ok\n"), 10, "/healthz once the disk is back")
    assert daemon.metric("lrpilot_store_up") == 1

    def caught_up() -> list[dict] | None:
        history = daemon.history()
        return history if len(history) >= decided else None

    history = wait_for(caught_up, 10, f"the journal to catch up to v{decided}")
    assert [e["version"] for e in history][:decided] == list(range(1, decided + 1))
    # With its effective step and LRs, and who made it: the operator's hold
    # and resume, and at least one of the policy's cuts.
    assert [e["actor"] == "policy" for e in history[journaled:decided]][-1]
    hold = history[held["version"] - 1]
    assert (hold["effective_step"], hold["new_lrs"], hold["hold"]) == (
        held["effective_step"],
        [HELD, HELD],
        1,
    )
    assert first.log().count("cannot write to") == 1  # logged once, not at every retry

    # --- kill -9, and a restart on the same store and addresses --------------------
    # Mid-run, but not while an ack is on its way: a cut comes with a report
    # (every REPORT_EVERY steps) and the training acks it at once; an ack the
    # killed daemon had not written is lost for good (the client does not
    # send it again), and the journal would never say where that change landed.
    wait_for(lambda: all_applied(daemon), 10, "the journal's applied steps before the kill")
    wait_for(lambda: 10 <= trainer.step % REPORT_EVERY <= 30, 10, "a step between two reports")
    before_kill = daemon.show()["version"]
    first.kill9()
    killed_at = trainer.step
    second = first.restart(lrpilot_exe, tmp_path / "second.log")
    processes.append(second)
    daemon = Daemon(second)
    # It restored the training's run and the paused one.
    assert sorted(r["run"] for r in second.cli("runs")) == [RUN, "paused"]
    trainer.at(killed_at + 200, 30, "the training to go on with the restarted daemon")
    wait_for(
        lambda: daemon.show()["version"] > before_kill,
        20,
        "a cut by the restarted daemon",
        lambda: f"show: {daemon.show()}",
    )
    # The training came back by itself, from the same process.
    sessions = daemon.show()["sessions"]
    assert [(s["rank"], s["pid"]) for s in sessions] == [(0, trainer.proc.pid)], sessions

    # --- a client that stops reading, and a pilot that is stopped -----------------------
    # The same daemon, the same stretch of training, before and during.
    base_from = trainer.step
    trainer.at(base_from + 400, 20)
    baseline = trainer.steps[base_from : base_from + 400]
    assert paused_out.exists() and read_steps(paused_out), "the paused pilot was meant to run"
    deaf = Deaf(second.address)
    rss = [daemon.rss_mib()]
    paused.proc.send_signal(signal.SIGSTOP)
    try:
        held_paused = second.ask({"op": "set_lr", "run": "paused", "lr": 0.01})
        flood_from = trainer.step
        for _ in range(FLOOD_CHUNKS):
            deaf.send(FLOOD_BATCHES)
            wait_for(
                lambda: daemon.show(deaf.run)["step"] == deaf.last_step,
                30,
                "the daemon to take the deaf client's steps",
            )
            rss.append(daemon.rss_mib())
        flood_to = trainer.step
        deaf_version = daemon.show(deaf.run)["version"]
        # What it could not deliver is counted, not dropped unseen.
        dropped = daemon.metric("lrpilot_messages_rejected_total", reason="reply_dropped")
        paused.proc.send_signal(signal.SIGCONT)
        kept = deaf.drain()
    finally:
        paused.proc.send_signal(signal.SIGCONT)
        deaf.close()
    flood = trainer.steps[flood_from:flood_to]
    # Had the daemon kept every answer it could not deliver, each chunk after
    # the first two (the pipe to the deaf client and the kernel's buffers are
    # full by then) would have cost at least this much: a message and
    # ZeroMQ's 64-byte frame per answer.
    answer = len(encode(Processed(run=deaf.run, seq=deaf.seq))) + 64
    unbounded = FLOOD_BATCHES * answer / 2**20
    print(
        "rss " + " ".join(f"{r:.1f}" for r in rss) + f" MiB (unbounded: +{unbounded:.1f} a chunk);"
        f" deaf v{deaf_version}; kept {kept} answers; flood {len(flood)} steps"
    )
    # The first report sets the best; each one after it is worse, and cuts.
    assert deaf_version == FLOOD_CHUNKS * FLOOD_BATCHES // 20 - 1
    # It was answered every batch (processed) and every cut: the daemon
    # kept what its pipe holds (10,000) and what the kernel buffered, and
    # dropped the rest rather than keep it all or wait.
    answers = FLOOD_CHUNKS * FLOOD_BATCHES + deaf_version
    assert 10_000 <= kept < answers / 3, (kept, answers)
    assert dropped >= answers - kept - 10_000, (dropped, answers, kept)

    def rate(lines: list[dict]) -> float:
        return (len(lines) - 1) / (lines[-1]["t"] - lines[0]["t"])

    def round_trip(lines: list[dict]) -> float:
        return median(line["rt"] for line in lines)

    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(flood)]
    print(
        f"steps/s {rate(baseline):.0f} -> {rate(flood):.0f}; round trip "
        f"{round_trip(baseline) * 1e3:.2f} -> {round_trip(flood) * 1e3:.2f} ms; "
        f"longest gap {max(gaps) * 1e3:.0f} ms"
    )
    assert len(flood) >= 100
    assert max(gaps) < 2.0  # a stall would be the sync timeout (20 s)
    assert rate(flood) > rate(baseline) / 3
    assert round_trip(flood) < 3 * round_trip(baseline) + 0.002
    # What waits for the deaf client is bounded: once its pipe is full, more
    # answers cost next to nothing (the daemon drops them).
    assert rss[-1] - rss[2] < 0.25 * unbounded * (FLOOD_CHUNKS - 2), rss
    # The stopped pilot gets the operator's hold once it runs again.
    wait_for(
        lambda: read_steps(paused_out)[-1]["used"] == [0.01],
        10,
        "the paused pilot to apply the hold after SIGCONT",
    )
    assert held_paused["command"]["version"] >= 1

    # --- the end: every change the optimizer used is in the journal -------------------
    summary = trainer.finish()
    steps = trainer.read()
    last = len(steps)
    assert last == summary["steps"]
    assert [line["step"] for line in steps] == list(range(1, last + 1))
    stats = summary["stats"]
    assert stats["sync_timeouts"] == stats["records_dropped"] == stats["daemon_errors"] == 0
    paused.stop()
    # Every change due by the last step says where it landed (the acks
    # reach the journal through the store's writer: a moment later).
    journal = settled_history(daemon.history, until_step=last)
    assert [e["version"] for e in journal] == list(range(1, len(journal) + 1))
    assert len(journal) == daemon.show()["version"]
    due = [e for e in journal if e["effective_step"] <= last]
    assert len(due) >= len(journal) - 1  # a cut on the last report is due after it
    assert stats["commands_applied"] in (len(due), len(journal))
    used = [line["used"] for line in steps]
    assert len({tuple(lrs) for lrs in used}) > 5, "the LRs were meant to change along the way"
    # Every change the optimizer made is in the journal: the newest entry
    # due at that step, with those LRs (lock-step: each lands on time, at
    # its effective step, through every fault).
    newest = {e["effective_step"]: e for e in due}  # in version order: the newest wins
    for k in range(2, last + 1):
        if used[k - 1] != used[k - 2]:
            entry = newest.get(k)
            assert entry is not None, f"step {k} used {used[k - 1]}: no journal entry is due then"
            assert entry["new_lrs"] == used[k - 1], (k, used[k - 1], entry)
    for entry in due:
        assert entry["applied_step"] == entry["effective_step"] and not entry["late"], entry
    # ...and every entry due was used, from its step until the next one.
    want = lrs_from_journal(due, last)
    assert used == want, differs(used, want)

    assert second.terminate() == 0
    log = second.log()
    assert "lrpilot daemon stopped" in log
    assert "could not write" not in log, log
    db = sqlite3.connect(f"file:{state_dir / 'lrpilot.sqlite3'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = db.execute(
            "SELECT version, effective_step, applied_step, new_lrs FROM journal"
            " WHERE run_id = ? ORDER BY version",
            (RUN,),
        ).fetchall()
    finally:
        db.close()
    assert stored == [
        (e["version"], e["effective_step"], e["applied_step"], json.dumps(e["new_lrs"]))
        for e in journal
    ]
    print(f"{last} steps, {len(journal)} changes, {time.monotonic() - began:.1f} s")
