"""Real processes for the tests: `lrpilot daemon` on free loopback ports with
its own state directory, the `lrpilot` command line, and polling with a
deadline. Every process started here is killed by ``stop()`` (the tests call
it in ``finally`` blocks or fixture teardowns)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

STARTUP_S = 20.0  # a daemon process is up (imports, store, bind) within this
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_address() -> str:
    """A loopback address nobody listens on (right now)."""
    return f"tcp://127.0.0.1:{free_port()}"


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str = "condition",
    detail: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds,
    naming ``what`` and adding ``detail()`` (a log, a screen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail()}")
        time.sleep(0.01)


class DaemonProcess:
    """`lrpilot daemon` as a user starts it, on its own ports and state
    directory (never the defaults); its log (stderr) goes to a file. A second
    DaemonProcess with the same addresses and state dir is a restart."""

    def __init__(
        self,
        exe: str,
        state_dir: Path,
        log: Path,
        *flags: str,
        address: str | None = None,
        control: str | None = None,
        metrics: str | None = None,
    ) -> None:
        self.address = address or free_address()
        self.control = control or free_address()
        self.metrics = metrics or f"127.0.0.1:{free_port()}"
        self.metrics_url = f"http://{self.metrics}/metrics"
        self.state_dir, self.log_path = state_dir, log
        with open(log, "w") as sink:
            self.proc = subprocess.Popen(
                [
                    exe,
                    "daemon",
                    "--address",
                    self.address,
                    "--control-address",
                    self.control,
                    "--state-dir",
                    str(state_dir),
                    "--metrics-addr",
                    self.metrics,
                    *flags,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> DaemonProcess:
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            return f"listening on {self.address} (control {self.control}," in self.log()

        wait_for(listening, STARTUP_S, f"the daemon to listen on {self.address}")
        return self

    def restored(self) -> int:
        """How many runs the daemon said it restored from its store."""
        found = re.search(r"(\d+) runs restored", self.log())
        assert found, self.log()
        return int(found.group(1))

    def restart(self, exe: str, log: Path, *flags: str) -> DaemonProcess:
        """A new daemon on the same addresses and state dir (this one is gone)."""
        assert self.proc.poll() is not None, "stop or kill the old daemon first"
        again = DaemonProcess(
            exe,
            self.state_dir,
            log,
            *flags,
            address=self.address,
            control=self.control,
            metrics=self.metrics,
        )
        return again.wait_ready()

    def kill9(self) -> None:
        self.proc.kill()
        assert self.proc.wait(10) == -9

    def terminate(self) -> int:
        self.proc.terminate()
        return self.proc.wait(15)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextmanager
def daemon_process(exe: str, state_dir: Path, log: Path, *flags: str) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(exe, state_dir, log, *flags)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


def lrpilot(
    exe: str, *args: str, stdin: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess:
    """One `lrpilot` command, as a user runs it."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [exe, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    assert done.stderr == "", done.stderr
    return done.stdout


def ok_json(done: subprocess.CompletedProcess) -> Any:
    return json.loads(ok(done))


def store_row(state_dir: Path, run: str) -> dict[str, Any] | None:
    """The run's row as the daemon's store has it on disk now (read-only)."""
    path = state_dir / "lrpilot.sqlite3"
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run,)).fetchone()
    except sqlite3.OperationalError:  # the schema is being created
        return None
    finally:
        db.close()
    return dict(row) if row else None


def settled_history(
    fetch: Callable[[], list[dict]], until_step: int | None = None, timeout: float = 10.0
) -> list[dict]:
    """A run's journal (``fetch``: `lrpilot history --json`) once every change
    due by ``until_step`` (default: every change) says where it was applied.
    The training's ack travels apart from the test's request, and the daemon
    writes it through its store thread, so it can show a moment later."""

    def settled() -> list[dict] | None:
        history = fetch()
        due = [e for e in history if until_step is None or e["effective_step"] <= until_step]
        return history if all(e["applied_step"] is not None for e in due) else None

    return wait_for(settled, timeout, f"the journal's applied steps (until step {until_step})")


def store_records(state_dir: Path, run: str) -> list[tuple[int, str, dict]]:
    """(step, kind, metrics) of a run's recorded stream, read from the daemon's
    store (while it runs) as the daemon reads it: metrics batches, not rows."""
    from lrpilot.daemon.store import DB_NAME, open_readonly, read_records

    db = open_readonly(state_dir / DB_NAME)
    try:
        return list(read_records(db, run))
    finally:
        db.close()


TRAIN_STREAM = Path(__file__).resolve().parent / "live" / "train_stream.py"


class Training:
    """tests/live/train_stream.py in its own process; ``at(k)``/``go(k)`` are
    its gates (it waits after step k until the test says go)."""

    def __init__(self, where: Path, config: dict, name: str = "train") -> None:
        self.where, self.name = where, name
        self.gate_dir = where / f"{name}-gates"
        self.gate_dir.mkdir(parents=True, exist_ok=True)
        self.summary_path = where / f"{name}-summary.json"
        self.output = where / f"{name}.out"
        config = {"gate_dir": str(self.gate_dir), "summary": str(self.summary_path), **config}
        path = where / f"{name}.json"
        path.write_text(json.dumps(config))
        with open(self.output, "w") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, str(TRAIN_STREAM), str(path)],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def at(self, k: int, timeout: float = 30.0) -> dict:
        """Wait until the training is held at gate k; its pilots' stats then."""
        gate = self.gate_dir / f"at-{k}"

        def there() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"training exited with {self.proc.returncode} before gate {k}:\n"
                    + self.output.read_text()
                )
            return gate.exists()

        wait_for(there, timeout, f"the training to reach step {k}")
        return json.loads(gate.read_text())

    def go(self, k: int) -> None:
        (self.gate_dir / f"go-{k}").write_text("go")

    def finish(self, timeout: float = 60.0) -> dict:
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        assert self.proc.returncode == 0, (
            f"training exited with {self.proc.returncode}:\n" + self.output.read_text()
        )
        return json.loads(self.summary_path.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def read_steps(path: Path) -> list[dict]:
    """A trainer's per-step lines (train_stream.py), checked to be consecutive."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    steps = [line["step"] for line in lines]
    if steps:
        assert steps == list(range(steps[0], steps[0] + len(steps))), steps
    return lines


def metric_stream(lines: list[dict]) -> str:
    """The recorded metric stream as `lrpilot simulate` input (docs/policies.md):
    record k is step k's loss plus the val_loss reported after step k."""
    out = []
    for line in lines:
        metrics = {"loss": line["loss"]}
        if "val_loss" in line:
            metrics["val_loss"] = line["val_loss"]
        out.append(json.dumps({"step": line["step"], "metrics": metrics}) + "\n")
    return "".join(out)


def simulate(exe: str, policy: dict, stream: str, base_lrs: list[float]) -> list[list[float]]:
    """`lrpilot simulate` on a stream: the LRs after each record."""
    flags = [arg for lr in base_lrs for arg in ("--base-lr", repr(lr))]
    done = lrpilot(exe, "simulate", "--policy", json.dumps(policy), *flags, stdin=stream)
    return [json.loads(line)["lrs"] for line in ok(done).splitlines()]


def one_line_error(done, command: str, *says: str, status: int = 1) -> str:
    """What every refused CLI call must look like: exit ``status``, nothing on
    stdout, one line on stderr naming the command and saying ``says``."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"lrpilot {command}: "), lines[0]
    for words in says:
        assert words in lines[0], (words, lines[0])
    return lines[0]


@contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``where``: a disk that really fills. It needs
    root and `mount`; without them the test fails saying so (never skips)."""
    assert shutil.which("mount"), "this test needs `mount` (util-linux) to mount a tmpfs"
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    assert mounted.returncode == 0, (
        f"this test needs a tmpfs it can fill (run it as root, where `mount -t tmpfs` is "
        f"allowed): mount exited {mounted.returncode}: {mounted.stderr.strip()}"
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


class FakeOptimizer:
    """Just param_groups: what the hook duck-types (no torch needed)."""

    def __init__(self, param_groups: list[dict]) -> None:
        self.param_groups = param_groups
