"""What the tests share: real processes (`lrpilot daemon` on free loopback
ports with its own state directory, the trainings under tests/live), the
`lrpilot` command line, the daemon's HTTP side, polling with a deadline, and
the policies and files the live tests read. Every process started here is
killed by ``stop()`` (the tests call it in ``finally`` blocks or fixture
teardowns; conftest.py's ``processes`` does it for a list of them).

A test learns what the daemon is doing through its API, never its log: it is
ready when /healthz says ok (its control plane answers, with --metrics-addr
off), and its runs and decisions are what `lrpilot runs/show/history --json`
say. The log is for failure messages, and for tests of what it tells a user."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

STARTUP_S = 20.0  # a daemon process is up (imports, store, bind) within this
T = TypeVar("T")
LIVE = Path(__file__).resolve().parent / "live"

# Plateau on the validation loss, as the live tests steer it: on a real torch
# training of the digits (tests/live/train_digits.py, train_ddp.py), it cuts a
# few times in a few hundred steps...
DIGITS_PLATEAU = {
    "kind": "plateau",
    "metric": "val_loss",
    "factor": 0.5,
    "patience": 1,
    "threshold": 0.05,
}
# ...and on tests/live/train_stream.py's fixed stream, every few reports.
STREAM_PLATEAU = {
    "kind": "plateau",
    "metric": "val_loss",
    "factor": 0.5,
    "patience": 1,
    "threshold": 0.01,
}


def _bench_ports() -> Any:
    """bench/ports.py, the allocator the load bench uses too, loaded by path:
    bench/ is not a package, and its module names are generic."""
    path = Path(__file__).resolve().parent.parent / "bench" / "ports.py"
    spec = importlib.util.spec_from_file_location("lrpilot_bench_ports", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ports = _bench_ports()
free_ports: Callable[..., int] = _ports.free_ports  # (count=1): the first of count free ports
free_port: Callable[[], int] = _ports.free_port


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


def http_get(url: str, gzip_ok: bool = False, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET, an error status included."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip_ok else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample ``name`` in a /metrics text whose labels
    include ``labels``; None when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _metrics_flag(flags: tuple[str, ...]) -> str | None:
    """The --metrics-addr among a daemon's extra flags (the last one wins, as
    on the command line), or None."""
    value = None
    for i, flag in enumerate(flags):
        if flag == "--metrics-addr" and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith("--metrics-addr="):
            value = flag.partition("=")[2]
    return value


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
        self.exe = exe
        self.address = address or free_address()
        self.control = control or free_address()
        self.metrics = metrics or f"127.0.0.1:{free_port()}"
        self.metrics_url = f"http://{self.metrics}/metrics"
        # A --metrics-addr among the flags wins over ours (it comes after):
        # with "off" there is no /healthz to ask, and readiness is the
        # control plane's answer.
        self.serves_metrics = _metrics_flag(flags) in (None, self.metrics)
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

    def http(self, path: str) -> tuple[int, str]:
        """(status, body) of a GET of ``path`` on the daemon's HTTP side."""
        status, _, body = http_get(f"http://{self.metrics}{path}", timeout=10.0)
        return status, body.decode()

    def scrape(self) -> str:
        status, text = self.http("/metrics")
        assert status == 200, f"/metrics answered {status}: {text}"
        return text

    def cli(self, *args: str) -> Any:
        """`lrpilot ARGS --json` against this daemon's control plane: the answer."""
        return ok_json(lrpilot(self.exe, *args, "--control", self.control, "--json"))

    def ask(self, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """One control-plane request, in this process (no `lrpilot` to start)."""
        return control(self.control, payload, timeout)

    def wait_ready(self) -> DaemonProcess:
        """Wait until the daemon serves: /healthz says ok (it serves HTTP once
        both its sockets are bound), or, with --metrics-addr off, its control
        plane answers."""
        said = ["nothing yet"]

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if not self.serves_metrics:
                return self._control_answers(said)
            try:
                status, body = self.http("/healthz")
            except OSError as exc:  # not listening yet
                said[0] = str(exc)
                return False
            said[0] = f"/healthz {status}: {body.strip()}"
            return (status, body) == (200, "ok\n")

        wait_for(
            ready,
            STARTUP_S,
            f"the daemon on {self.address} to be ready",
            lambda: f"last answer: {said[0]}\n--- daemon log\n{self.log()}",
        )
        return self

    def _control_answers(self, said: list[str]) -> bool:
        from lrpilot.daemon.cli.control_client import ControlClientError

        try:
            self.ask({"op": "runs"}, timeout=1.0)
        except ControlClientError as exc:
            said[0] = str(exc)
            return False
        return True

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


def control(address: str, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request to a daemon's control plane, as `lrpilot` sends it: the
    answer (a JSON object that says ok), or ControlClientError."""
    from lrpilot.daemon.cli.control_client import ControlClient

    with ControlClient(address, timeout) as client:
        return client.call(payload)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    assert done.stderr == "", done.stderr
    return done.stdout


def ok_json(done: subprocess.CompletedProcess) -> Any:
    return json.loads(ok(done))


def store_row(state_dir: Path, run: str) -> dict[str, Any] | None:
    """The run's row as the daemon's store has it on disk now (read-only)."""
    from lrpilot.daemon.service.sharding import store_dir_of

    path = store_dir_of(state_dir, run) / "lrpilot.sqlite3"
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
    from lrpilot.daemon.service.records import read_records
    from lrpilot.daemon.service.schema import DB_NAME, open_readonly
    from lrpilot.daemon.service.sharding import store_dir_of

    db = open_readonly(store_dir_of(state_dir, run) / DB_NAME)
    try:
        return list(read_records(db, run))
    finally:
        db.close()


TRAIN_STREAM = LIVE / "train_stream.py"
TRAIN_DIGITS = LIVE / "train_digits.py"


def stream_trainer(run: str, address: str, out: Path, **fields: Any) -> dict:
    """One trainer of a train_stream.py config: lock-step plateau on two
    groups (body 0.1, head 0.05) unless ``fields`` say otherwise."""
    return {
        "run": run,
        "address": address,
        "policy": STREAM_PLATEAU,
        "sync": True,
        "sync_timeout": 10.0,
        "lrs": [0.1, 0.05],
        "out": str(out),
        **fields,
    }


def start_live(
    script: Path,
    where: Path,
    name: str,
    config: dict,
    env: dict[str, str] | None = None,
    unset: Sequence[str] = (),
    launcher: Sequence[str] = (),
    cwd: Path | None = None,
) -> subprocess.Popen:
    """A training script of tests/live/ in its own process, on ``config``
    (written to where/NAME-config.json, its last argument); its output to
    where/NAME.out. ``env``: variables set for it, ``unset``: removed;
    ``launcher``: python's arguments before the script (``-m
    torch.distributed.run ...``)."""
    path = where / f"{name}-config.json"
    path.write_text(json.dumps(config))
    full = {**os.environ, **(env or {})}
    for name_ in unset:
        full.pop(name_, None)
    with open(where / f"{name}.out", "w") as sink:
        return subprocess.Popen(
            [sys.executable, *launcher, str(script), str(path)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=full,
        )


def finish_live(proc: subprocess.Popen, output: Path, timeout: float = 120.0) -> None:
    """Wait for a training to end (killed past ``timeout``): it must exit 0,
    else its output (the tail) says why."""
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert proc.returncode == 0, f"exited with {proc.returncode}:\n{output.read_text()[-5000:]}"


def start_digits(config: dict, where: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """tests/live/train_digits.py on ``config``, its output to where/train.out;
    ``env``: variables to set for it."""
    return start_live(TRAIN_DIGITS, where, "train", config, env, cwd=Path(__file__).parent.parent)


TRAIN_GUARD = LIVE / "train_guard.py"


def start_guard(config: dict, where: Path) -> subprocess.Popen:
    """tests/live/train_guard.py on ``config``, its output to where/train.out."""
    return start_live(TRAIN_GUARD, where, "train", config, cwd=where)


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


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines a training has written so far: whole lines only (each is
    written with its newline; one without is still being written)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]


def read_steps(path: Path) -> list[dict]:
    """A trainer's per-step lines (train_stream.py), checked to be consecutive."""
    lines = read_jsonl(path)
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


def simulate_lines(exe: str, policy: dict, stream: str, base_lrs: list[float]) -> list[dict]:
    """`lrpilot simulate` on a stream: its line after each record (LRs, momenta)."""
    flags = [arg for lr in base_lrs for arg in ("--base-lr", repr(lr))]
    policy_flag = ("--policy", json.dumps(policy))
    done = lrpilot(exe, "simulate", *policy_flag, *flags, stdin=stream, timeout=60)
    return [json.loads(line) for line in ok(done).splitlines()]


def simulate(exe: str, policy: dict, stream: str, base_lrs: list[float]) -> list[list[float]]:
    """`lrpilot simulate` on a stream: the LRs after each record."""
    return [line["lrs"] for line in simulate_lines(exe, policy, stream, base_lrs)]


def first_difference(got: list, want: list, got_is: str = "got", want_is: str = "want") -> str:
    """Where two per-step sequences part, for a failure message."""
    for k, (a, b) in enumerate(zip(got, want), start=1):
        if a != b:
            return f"first difference at step {k}: {got_is} {a}, {want_is} {b}"
    return f"lengths {len(got)} and {len(want)}"


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


@contextmanager
def serving(state_dir: Path, address: str = "tcp://127.0.0.1:0") -> Iterator[Any]:
    """A daemon in a thread of the test process, with its own store and free
    ports (never the defaults)."""
    from lrpilot.daemon.service.config import DaemonConfig
    from lrpilot.daemon.service.server import Daemon

    config = DaemonConfig(address=address, control_address="tcp://127.0.0.1:0", state_dir=state_dir)
    daemon = Daemon(config)
    thread = daemon.serve_in_thread()
    try:
        assert daemon.ready.is_set()
        yield daemon
    finally:
        daemon.stop()
        thread.join(5)
        daemon.close()


def two_groups(optimizer_cls: Any = None, **kwargs: Any) -> Any:
    """A torch optimizer over two small params: groups "body" (LR 0.1) and 0.02."""
    import torch

    optimizer_cls = optimizer_cls or torch.optim.SGD
    body, head = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    return optimizer_cls(
        [{"params": [body], "lr": 0.1, "name": "body"}, {"params": [head], "lr": 0.02}],
        **kwargs,
    )


def train_step(optimizer: Any) -> None:
    """A real optimizer step (on a fixed gradient) with whatever LRs are in the groups."""
    import torch

    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.full_like(p, 0.01)
    optimizer.step()


def steer_at_gates(
    daemon: DaemonProcess,
    training: subprocess.Popen,
    where: Path,
    out: str,
    run: str,
    gates: tuple[int, int],
    held_lr: float,
) -> None:
    """An operator at a gated training (tests/live/train_*.py write at-K and
    wait for go-K): `lrpilot set-lr RUN held_lr` at the first gate, `resume`
    at the second. A training that dies shows its output (``out``.out)."""

    def at(k: int) -> None:
        def there() -> bool:
            if training.poll() is not None:
                raise AssertionError((where / f"{out}.out").read_text()[-5000:])
            return (where / f"at-{k}").exists()

        wait_for(there, 60, f"the training to reach real step {k}", daemon.log)

    hold_at, release_at = gates
    try:
        at(hold_at)
        daemon.cli("set-lr", run, str(held_lr))
        (where / f"go-{hold_at}").write_text("go")
        at(release_at)
        daemon.cli("resume", run)
        (where / f"go-{release_at}").write_text("go")
    except BaseException:
        training.kill()  # held at a gate: it would wait for its deadline
        raise


def stored_records(state_dir: Path, run: str, count: int) -> list[tuple[int, str, dict]]:
    """The run's recorded stream once the store has ``count`` records (the
    daemon commits them a moment after the training sent them)."""

    def there() -> list | None:
        records = store_records(state_dir, run)
        return records if len(records) >= count else None

    return wait_for(there, 20, f"{count} records of {run} in the store")


def lrs_from_journal(history: list[dict], steps: range, start: list[float]) -> dict:
    """The LRs of each step as the journal has them: a change's new LRs from
    its effective step on, ``start`` before the first."""
    lrs, by_step = start, {}
    entries = sorted(history, key=lambda e: e["version"])
    for step in steps:
        for entry in entries:
            if entry["effective_step"] == step:
                lrs = entry["new_lrs"]
        by_step[step] = lrs
    return by_step


# --- tests/live/train_ddp.py ---------------------------------------------------------

TRAIN_DDP = LIVE / "train_ddp.py"


def start_train_ddp(
    where: Path, config: dict, torchrun: Sequence[str], env: dict[str, str], out: str = "train"
) -> subprocess.Popen:
    """tests/live/train_ddp.py under real torchrun (``python -m
    torch.distributed.run TORCHRUN...``) on ``config``, its output to
    where/OUT.out. The daemon's address and the keys come from ``env``; the
    run id is torchrun's, as in a user's job."""
    return start_live(
        TRAIN_DDP,
        where,
        out,
        config,
        {"OMP_NUM_THREADS": "1", **env},
        unset=["LRPILOT_RUN"],
        launcher=["-m", "torch.distributed.run", *torchrun],
        cwd=where,
    )


def ddp_ranks_agree(where: Path, run: str, history: list[dict], world: int) -> list[dict]:
    """What every rank of a train_ddp.py run wrote in ``where`` says that
    each applied every journaled change at its effective step (none late),
    with the same LRs at every step and the same parameters at the end on
    every rank; their summaries."""
    summaries = [json.loads((where / f"summary{r}.json").read_text()) for r in range(world)]
    for rank, summary in enumerate(summaries):
        assert (summary["run"], summary["rank"], summary["world_size"]) == (run, rank, world)
        assert summary["stats"]["commands_late"] == 0, summary
        assert summary["warnings"] == [], summary
    last = summaries[0]["steps"]
    assert all(s["steps"] == last for s in summaries), [s["steps"] for s in summaries]
    # The same LRs at every optimizer step on every rank: the line of step
    # k holds the LRs of step k + 1, and the last step has no step after it.
    lines = [read_jsonl(where / f"rank{r}.jsonl") for r in range(world)]
    used = [
        [(line["step"], line["lrs"]) for line in rank if "lrs" in line][: last - 1]
        for rank in lines
    ]
    assert len(used[0]) == last - 1
    for rank in range(1, world):
        first_difference = next(((a, b) for a, b in zip(used[0], used[rank]) if a != b), None)
        assert used[rank] == used[0], (rank, first_difference)
    # Every journaled change due within the run, at its effective step, on
    # every rank (a decision made just before the stop may be due after it).
    journal = [(e["effective_step"], e["new_lrs"], e["actor"]) for e in history]
    due = [entry for entry in journal if entry[0] <= last]
    for rank, summary in enumerate(summaries):
        changes = [line for line in lines[rank] if line.get("event") == "change"]
        seen = [(c["step"], c["new"], c["actor"]) for c in changes]
        assert seen[: len(due)] == due, (rank, seen, journal)
        assert summary["stats"]["commands_applied"] == len(seen), (summary, seen)
    # Same LRs at every step: DDP's replicas are still the same model.
    assert len({s["params_sha256"] for s in summaries}) == 1
    return summaries


def mean_val_losses(where: Path, world: int) -> list[tuple[int, float]]:
    """(step, the ranks' mean val_loss) of each step every rank validated at."""
    shards = [
        {
            line["step"]: line["val_loss"]
            for line in read_jsonl(where / f"rank{r}.jsonl")
            if "val_loss" in line
        }
        for r in range(world)
    ]
    steps = sorted(set.intersection(*(set(shard) for shard in shards)))
    return [(step, math.fsum(shard[step] for shard in shards) / world) for step in steps]


def stored_val_losses(daemon: DaemonProcess, run: str, count: int) -> list[tuple[int, float]]:
    """(step, val_loss) of the run's stored reports, what the policy took,
    once there are ``count`` (the daemon commits a moment after the last)."""

    def there() -> list | None:
        records = store_records(daemon.state_dir, run)
        found = [(step, m["val_loss"]) for step, _, m in records if "val_loss" in m]
        return found if len(found) >= count else None

    return wait_for(there, 20, f"{count} val_loss reports of {run} in the store")


# --- clients with keys (tests/test_security.py, test_shards.py) ----------------------


def as_key(daemon: DaemonProcess, keys: Path, who: str, *args: str) -> subprocess.CompletedProcess:
    return lrpilot(
        daemon.exe, *args, "--control", daemon.control, "--keys", str(keys / "clients" / who)
    )


def trained(daemon: DaemonProcess, keys: Path, who: str, run: str) -> Any:
    """A lock-step pilot with ``who``'s key that has taken one step."""
    import warnings

    import lrpilot

    optimizer = two_groups()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pilot = lrpilot.attach(
            optimizer,
            run=run,
            daemon=daemon.address,
            sync=True,
            sync_timeout=2.0,
            keys=keys / "clients" / who,
        )
        train_step(optimizer)
        pilot.step(loss=1.0)
    return pilot
