"""Fuzzing the wire, both planes and both ends, from real captured messages.

Every field that comes over a socket is hostile until checked: one hostile
message must never stall the daemon, crash it, poison another run, or make the
exporter or the CLI fail; one hostile "daemon" message must never make the
hook raise or write an LR the training cannot use.

- The corpus is captured, not written by hand: a real ``lrpilot.attach``
  pilot (steps, reports, commands it acks, a ``load_state_dict``, ``close``)
  against a ROUTER this module binds, whose messages a real DataPlane answers;
  the control requests the real CLI (``lrpilot.daemon.cli.main.main``) sends; and
  every daemon → client message the DataPlane answered with.
- Mutators are plain functions of a ``random.Random``: hypothesis hands them
  its own (``st.randoms``, so its choices shrink), the live-daemon test a
  seeded one. Structure-aware (the JSON envelope: hostile values, deleted and
  unknown fields, raw JSON tokens, blown-up lists), the binary records (steps
  2**62 ahead or negative, NaN, truncation, a batch of many records each just
  under the step gap), raw bytes, and the number of frames.
- Invariants after every input, on a DataPlane + ControlPlane over a store of
  its own: ``handle`` returns (a watchdog turns a stall into a failure) within
  STALL_S, every reply decodes, the exporter's scrape parses, ``runs`` and
  ``show`` answer every run, every run's LRs are finite, one per group; and
  a "victim" run, fed only valid records by its own identity, never changes
  on a hostile input and ends equal to its policy fed the same stream (what
  ``lrpilot simulate`` computes), also after a restart from the store, whose
  ``PRAGMA integrity_check`` passes.
- Then the same mutators against a real ``lrpilot daemon`` process over real
  sockets while a real sync-mode pilot trains against it.

``LRPILOT_FUZZ_EXAMPLES`` sets the number of hypothesis examples (default:
CI-sized, derandomized so CI is deterministic; set, the run is random);
``LRPILOT_FUZZ_LIVE`` the messages sent to the live daemon (seeded: fixed in
CI, random in a one-off run, and reported); ``LRPILOT_FUZZ_STALL_S`` the CPU
bound per input; ``LRPILOT_FUZZ_REPORT`` a file the module appends its input
counts and time to.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import math
import os
import random
import signal
import sqlite3
import struct
import threading
import time
import urllib.request
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import FakeOptimizer, control, daemon_process, lrpilot, ok, simulate
from prometheus_client.parser import text_string_to_metric_families

import lrpilot as lrpilot_client
from lrpilot.daemon.cli.control_client import checked_answer
from lrpilot.daemon.cli.main import main as cli_main
from lrpilot.daemon.control_protocol import MAX_CONTROL_BYTES
from lrpilot.daemon.observability.exporter import DaemonCollector, Exposition
from lrpilot.daemon.service.config import DaemonConfig
from lrpilot.daemon.service.control import ControlPlane
from lrpilot.daemon.service.dataplane import DataPlane
from lrpilot.daemon.service.schema import DB_NAME
from lrpilot.policies import parse_policy
from lrpilot.protocol import (
    MAX_MESSAGE_BYTES,
    REPORT,
    STEP,
    BatchEncoder,
    Error,
    GroupInfo,
    Hello,
    LRCommand,
    Persisted,
    Processed,
    decode,
    encode,
)

EXAMPLES = int(os.environ.get("LRPILOT_FUZZ_EXAMPLES", "0"))
ONE_OFF = EXAMPLES > 0  # a big run asked for by hand: random, not CI's fixed cases
LIVE_MESSAGES = int(os.environ.get("LRPILOT_FUZZ_LIVE", "3000"))
LIVE_SEED = random.randrange(2**32) if ONE_OFF else 20240917
# A handle() call costs microseconds to a few ms of the loop's CPU; a gap of
# 2**62 steps stepped through is hours. Measured as the thread's CPU time, so
# that a loaded machine (or a wait for the store's lock) is not taken for a
# stall; a wait that never ends is the watchdog's (wall clock).
STALL_S = float(os.environ.get("LRPILOT_FUZZ_STALL_S", "0.2"))
WATCHDOG_S = 3.0  # a call still running after this is interrupted and fails the example

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES or 100,
    derandomize=not ONE_OFF,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Inputs fed, by where they went: the one-off run reports the total.
INPUTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def input_count() -> Iterator[None]:
    started = time.monotonic()
    yield
    line = {
        "inputs": dict(INPUTS),
        "total": sum(INPUTS.values()),
        "seconds": round(time.monotonic() - started, 1),
        "examples": FUZZ_SETTINGS.max_examples,
        "random": ONE_OFF,
        "live_seed": LIVE_SEED,
    }
    print(f"\nfuzz: {json.dumps(line)}")
    report = os.environ.get("LRPILOT_FUZZ_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps(line) + "\n")


class Stalled(AssertionError):
    """A call ran past WATCHDOG_S: the loop it runs on would be stalled."""


@contextlib.contextmanager
def watchdog(what: Callable[[], str]) -> Iterator[None]:
    """Interrupt the block after WATCHDOG_S (SIGALRM; pytest runs tests on the
    main thread) so that a stall fails the example instead of hanging."""

    def fire(*_: Any) -> None:
        raise Stalled(f"still running after {WATCHDOG_S}s: {what()}")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def bounded(what: Callable[[], str]) -> Iterator[None]:
    """The block as the daemon's loop would run it: failed past STALL_S of
    this thread's CPU, interrupted past WATCHDOG_S. The garbage collector is
    held off meanwhile: its pauses are the test process's heap (hypothesis,
    the corpus), not the daemon's work."""
    gc.disable()
    started = time.thread_time()
    try:
        with watchdog(what):
            yield
    finally:
        took = time.thread_time() - started
        gc.enable()
    assert took < STALL_S, f"took {took:.3f}s of CPU (> {STALL_S}s) on {what()}"


# --- the corpus: real messages, captured -------------------------------------


CAPTURE_POLICY = {
    "kind": "plateau",
    "metric": "val_loss",
    "patience": 0,
    "factor": 0.5,
    "min_lr": [0.0, 0.0],
}
SWITCH_POLICY = {"kind": "step", "step_size": 3, "gamma": 0.5}
CAPTURE_LRS = [0.1, 0.02]


def message_type(frames: list[bytes]) -> str:
    try:
        return str(json.loads(frames[0]).get("t"))
    except (ValueError, AttributeError, IndexError):
        return "?"


class Corpus:
    """What was captured. A plain class: hypothesis prints a dataclass field
    by field with every failing example, this one as its __repr__."""

    def __init__(self) -> None:
        self.data: list[list[bytes]] = []  # client → daemon, in order
        self.control: list[bytes] = []  # what the CLI sent
        self.replies: list[list[bytes]] = []  # daemon → client

    def __repr__(self) -> str:
        return (
            f"Corpus({len(self.data)} client messages, {len(self.control)} control requests, "
            f"{len(self.replies)} replies)"
        )

    def types(self, frames_list: list[list[bytes]]) -> Counter[str]:
        return Counter(message_type(frames) for frames in frames_list)

    def session(self) -> list[list[bytes]]:
        """The captured pilot's messages with each stretch of metrics batches
        cut to 3: a session short enough that a fuzzed sender replaying it
        gets to its acks, its second hello and its bye, and starts again."""
        out: list[list[bytes]] = []
        stretch = 0
        for frames in self.data:
            stretch = stretch + 1 if message_type(frames) == "metrics" else 0
            if stretch <= 3:
                out.append(frames)
        return out

    @staticmethod
    def grouped(frames_list: list[list[bytes]]) -> list[list[list[bytes]]]:
        """The messages by type: a fuzzer picks a type first, or the many
        metrics batches of a capture would drown the few hellos and acks."""
        groups: dict[str, list[list[bytes]]] = {}
        for frames in frames_list:
            groups.setdefault(message_type(frames), []).append(frames)
        return [groups[kind] for kind in sorted(groups)]


class Capture:
    """A DataPlane behind a real ROUTER on loopback: records what the pilots
    send and what the plane answers, and sends the answers back."""

    def __init__(self, where: Path) -> None:
        self.plane = DataPlane(DaemonConfig(state_dir=where / "state"))
        self.control = ControlPlane(self.plane)
        self.context = zmq.Context()
        self.data = self._router()
        self.address = f"tcp://127.0.0.1:{self.data.bind_to_random_port('tcp://127.0.0.1')}"
        self.control_sock = self._router()
        port = self.control_sock.bind_to_random_port("tcp://127.0.0.1")
        self.control_address = f"tcp://127.0.0.1:{port}"
        self.corpus = Corpus()
        self.last_seq: dict[str, int] = Counter()  # run -> highest record seq received

    def _router(self) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def count(self, kind: str) -> int:
        return self.corpus.types(self.corpus.data)[kind]

    def _answer(self, out: list[tuple[bytes, list[bytes]]]) -> None:
        for to, frames in out:
            self.corpus.replies.append(frames)
            self.data.send_multipart([to, *frames])

    def pump(self, until: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        """Serve both sockets until ``until()``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self.data, zmq.POLLIN)
        poller.register(self.control_sock, zmq.POLLIN)
        while not until():
            assert time.monotonic() < deadline, f"capture: timed out waiting for {what}"
            ready = dict(poller.poll(10))
            if self.data in ready:
                identity, *frames = self.data.recv_multipart()
                self.corpus.data.append(frames)
                if message_type(frames) == "metrics":
                    header = json.loads(frames[0])
                    last = header["first_seq"] + sum(c for _, c in header["blocks"]) - 1
                    run = header["run"]
                    self.last_seq[run] = max(self.last_seq[run], last)
                out = self.plane.handle(identity, frames, time.monotonic())
                self.plane.flush()
                self._answer(out + self.plane.persisted())
            if self.control_sock in ready:
                identity, empty, raw = self.control_sock.recv_multipart()
                self.corpus.control.append(raw)
                answer, outgoing = self.control.handle(raw)
                self.control_sock.send_multipart([identity, empty, json.dumps(answer).encode()])
                self._answer(outgoing)

    def cli(self, *args: str, status: int = 0) -> None:
        """The real CLI in a thread (it blocks on its request), served here."""
        done: list[int] = []
        thread = threading.Thread(
            target=lambda: done.append(
                cli_main([*args, "--control", self.control_address, "--timeout", "10"])
            )
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            thread.start()
            self.pump(lambda: not thread.is_alive(), f"`lrpilot {' '.join(args)}`")
        assert done == [status], f"`lrpilot {' '.join(args)}` exited {done}: {out.getvalue()}"

    def close(self) -> None:
        self.data.close()
        self.control_sock.close()
        self.context.term()
        self.plane.close()


def capture_corpus(where: Path) -> Corpus:
    cap = Capture(where)
    groups = [{"params": [], "lr": lr, "name": n} for lr, n in zip(CAPTURE_LRS, ("body", "head"))]
    pilot = lrpilot_client.attach(
        FakeOptimizer(groups), run="captured", policy=CAPTURE_POLICY, daemon=cap.address
    )
    records = 0

    def step(**metrics: float) -> None:
        nonlocal records
        if "loss" in metrics:
            pilot.step(**metrics)
        else:
            pilot.report(**metrics)
        records += 1
        pilot.flush()
        cap.pump(lambda: cap.last_seq["captured"] >= records, f"record {records}")

    def until_acked(what: str) -> None:
        before = cap.count("ack")
        # An operator's command is scheduled ~0.1 s of the run's steps ahead.
        for _ in range(1000):
            step(loss=0.5)
            if cap.count("ack") > before:
                return
        raise AssertionError(f"capture: the pilot never acked {what}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook warns on what it refuses; not here
        for loss in (1.0, 0.9, 0.8):
            step(loss=loss)
        step(val_loss=1.0)
        step(loss=0.7)
        step(val_loss=2.0)  # patience 0: a metric-driven cut
        until_acked("the plateau cut")
        step(loss=0.6, grad_norm=3.0)  # another record shape in the stream
        cap.cli("runs", "--json")
        cap.cli("show", "captured", "--json")
        cap.cli("set-lr", "captured", "0.05", "--group", "head", "--json")
        until_acked("set-lr")
        cap.cli("pause", "captured", "--json", status=1)  # refused: set-lr holds already
        cap.cli("resume", "captured", "--json")
        until_acked("resume")
        cap.cli("pause", "captured", "--json")
        until_acked("pause")
        cap.cli("resume", "captured", "--json")
        until_acked("resume")
        cap.cli("policy", "captured", json.dumps(SWITCH_POLICY), "--json")
        until_acked("the policy switch")
        # A range test (its sweep's updates kept: a FakeOptimizer has no
        # tensors to copy), then its end, a decision with the curve.
        cap.cli("range-test", "captured", "--steps", "3", "--no-restore", "--json")
        until_acked("the range test")
        until_acked("the range test's end")
        cap.cli("policy", "captured", "--requested", "--json")
        until_acked("the policy given back")
        cap.cli("policy", "captured", json.dumps(SWITCH_POLICY), "--preview", "--json")
        cap.cli("history", "captured", "--limit", "3", "--json")
        pilot.load_state_dict(pilot.state_dict())  # says hello again, at its step
        step(loss=0.4)
        pilot.close()
        cap.pump(lambda: cap.count("bye") >= 1, "the bye")
        capture_sync_pilot(cap)
    capture_errors(cap)
    corpus = cap.corpus
    cap.close()
    return corpus


def capture_sync_pilot(cap: Capture) -> None:
    """A sync pilot (the daemon answers it `processed`), in a thread: each
    step waits for the daemon this thread serves."""
    failed: list[BaseException] = []

    def train() -> None:
        try:
            groups = [{"params": [], "lr": 0.3}]
            with lrpilot_client.attach(
                FakeOptimizer(groups),
                run="captured-sync",
                policy={"kind": "cosine", "T_max": 5},
                daemon=cap.address,
                sync=True,
                sync_timeout=10.0,
            ) as pilot:
                for k in range(4):
                    pilot.step(loss=1.0 / (k + 1))
                pilot.report(val_loss=0.5)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    cap.pump(lambda: not thread.is_alive(), "the sync pilot")
    assert not failed, failed
    cap.pump(lambda: cap.count("bye") >= 2, "the sync pilot's bye")


def capture_errors(cap: Capture) -> None:
    """The plane's error answers, each from the input that gets it."""
    plane = cap.plane
    metrics = BatchEncoder("strays", 0).encode([(1, 1, STEP, {"loss": 1.0})], {})
    hello = Hello(run="strays", groups=[GroupInfo(name="0", lr=0.1)], policy=CAPTURE_POLICY)
    taker = hello.model_copy(update={"pid": 4242, "host": "elsewhere"})
    wrong_base = hello.model_copy(update={"run": "strays-2", "policy_base_lrs": [0.1, 0.2]})
    far = BatchEncoder("strays", 0).encode([(1, 20_000_000, STEP, {"loss": 1.0})], {})
    inputs = [
        (b"stranger", metrics),  # unknown_session
        (b"stranger", [b"{"]),  # malformed
        (b"stranger", [encode(hello)]),  # welcome
        (b"another", [encode(taker)]),  # rank_taken
        (b"another", [encode(wrong_base)]),  # bad_hello
        (b"stranger", far),  # step_gap
    ]
    for identity, frames in inputs:
        for _, reply in plane.handle(identity, frames, time.monotonic()):
            cap.corpus.replies.append(reply)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    corpus = capture_corpus(tmp_path_factory.mktemp("capture"))
    sent, answered = corpus.types(corpus.data), corpus.types(corpus.replies)
    # What the fuzz starts from must hold every message type there is.
    for kind in ("hello", "metrics", "ack", "bye"):
        assert sent[kind] >= 1, f"capture: no {kind} among {sent}"
    for kind in ("welcome", "command", "processed", "persisted", "error"):
        assert answered[kind] >= 1, f"capture: no {kind} among {answered}"
    for spec in POLICIES:
        if spec is not None:
            parse_policy(spec).build(CAPTURE_LRS)
    ops = Counter(json.loads(raw)["op"] for raw in corpus.control)
    for op in [op for op in CONTROL_OPS if op != "nope"]:  # every op there is
        assert ops[op] >= 1, f"capture: the CLI sent no {op} among {ops}"
    return corpus


# --- mutators (plain functions of a random.Random) ---------------------------

HOSTILE_INTS = [0, 1, 2, 3, -1, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**62, 2**63 - 1, 2**63]
HOSTILE_INTS += [2**64, 2**70, -(2**63), 10**30]
HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 1e-12, 1e3]
HOSTILE_STRINGS = ["", "x" * 201, "x" * 5000, "\x1b[31mred\x1b[2J\x1b[H", "a\nb\r", "\x00"]
HOSTILE_STRINGS += ["\x7f\x9b", "\u202eevil", "\u2028", "\ud800", "é", "💥", "NaN", "-1", "9" * 30]
HOSTILE_STRINGS += ["0x10", "../../etc/passwd", "'); DROP TABLE runs;--", '{"v":1}', "captured"]
# JSON text that no Python value dumps to: tokens, huge numbers, deep nesting.
RAW_FRAGMENTS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "-0", "0.1e-400"]
RAW_FRAGMENTS += ["1" * 5000, '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', '"\\u001b[2J"']
RAW_FRAGMENTS += ["[" * 300 + "]" * 300, '{"a":' * 300 + "1" + "}" * 300, "[" * 5000 + "]" * 5000]
RAW_FRAGMENTS += ["true", "null", "[]", "{}"]
MESSAGE_TYPES = ["hello", "metrics", "ack", "bye", "welcome", "command", "processed", "error", "x"]
STEPS = [2**62, 2**63 - 1, -1, -(2**63), 2**53, 2**53 + 1, 0, 1, 10_000, 10_001]
STRIDES = [0, -1, 1, 2, 999, 1000, 1001, 9_999, 10_000, 10_001, 2**31]  # around the gaps
# Hostile runs are named from here; the victim's name never is.
RUN_NAMES = ["captured", "captured-sync", "fz", "fz\u00e9\u202e", "x" * 200]
CONTROL_OPS = ["runs", "show", "set_lr", "policy", "range_test", "pause", "resume", "history"]
CONTROL_OPS += ["store", "nope"]
# Valid specs of every kind, to swap into a hello, a command or a switch: the
# capture runs two kinds only. Some run out (onecycle, a gamma that leaves
# the float range), some count to 2**53.
POLICIES = [
    {"kind": "onecycle", "max_lr": 0.5, "total_steps": 5},
    {"kind": "exponential", "gamma": 1e10},
    {"kind": "cosine_restarts", "T_0": 3, "T_mult": 2},
    {"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.1, "step_size_up": 2},
    {"kind": "multistep", "milestones": [1, 2, 3, 2**53], "gamma": 0.5},
    {"kind": "linear", "start_factor": 0.1, "total_iters": 2**53},
    {"kind": "step", "step_size": 2**53, "gamma": 0.5},
    {"kind": "cosine", "T_max": 2**53, "eta_min": 1e-300},
    {"kind": "plateau", "metric": "loss", "patience": 0, "factor": 0.5, "min_lr": 1e-300},
    {
        "kind": "sequential",
        "policies": [
            {"kind": "linear", "total_iters": 2},
            {"kind": "onecycle", "max_lr": 1.0, "total_steps": 4},
        ],
        "milestones": [2],
    },
    None,
]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(9 if depth < 2 else 6)
    if pick == 0:
        return rng.choice(HOSTILE_INTS)
    if pick == 1:
        return rng.choice(HOSTILE_FLOATS)
    if pick == 2:
        return rng.choice(HOSTILE_STRINGS)
    if pick == 3:
        return rng.choice([True, False, None])
    if pick == 4:
        return rng.choice([[], {}, [0.1], [0.1, 0.02], {"kind": "plateau"}])
    if pick == 5:
        return rng.choice([1, 0.1, "0", "loss"])
    if pick == 6:
        return [hostile_value(rng, depth + 1) for _ in range(rng.choice([1, 2, 3, 2000]))]
    if pick == 7:
        keys = rng.choice([["kind", "lrs"], ["name", "lr"], ["x"], HOSTILE_STRINGS[:4]])
        return {k: hostile_value(rng, depth + 1) for k in keys}
    nested: Any = rng.choice([1, "x", math.nan])
    for _ in range(rng.choice([10, 100, 150])):
        nested = [nested] if rng.random() < 0.5 else {"a": nested}
    return nested


Path_ = tuple  # a path into a JSON value: keys and indices


def paths(value: Any, prefix: Path_ = ()) -> list[Path_]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:16]):
            out += paths(item, (*prefix, i))
    return out


def get_at(value: Any, path: Path_) -> Any:
    for key in path:
        value = value[key]
    return value


def set_at(root: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    get_at(root, path[:-1])[path[-1]] = value
    return root


def delete_at(root: Any, path: Path_) -> Any:
    if path:
        del get_at(root, path[:-1])[path[-1]]
    return root


# json.dumps writes a value once for every reference to it: a list of 2,000
# references to a 2,000 x 2,000 nest (mutate_json's list multiplied, twice),
# or to a fragment of 5,000 characters, is GBs of text. A mutation past
# MAX_JSON_BYTES is sent as a message of OVERSIZED_BYTES instead: the
# refusal it would meet. (A test process was once killed for memory here.)
MAX_JSON_BYTES = 16 * 2**20
MAX_LIST_ITEMS = 100_000
OVERSIZED_BYTES = MAX_MESSAGE_BYTES + 2**20  # over the daemon's limit


def json_bytes_within(value: Any, budget: int, fragments: dict[str, str]) -> bool:
    """Whether ``value`` written as JSON, its fragment markers replaced, is
    at most about ``budget`` bytes (a circular value is more than any)."""

    def text_bytes(text: str) -> int:
        text = fragments.get(text, text)
        return 2 + (len(text) if text.isascii() else 6 * len(text))  # \uXXXX

    stack, size = [value], 0
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            size += 2 + sum(2 + text_bytes(str(key)) for key in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            size += 2 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, str):
            size += text_bytes(item)
        else:
            size += 24
        if size > budget:
            return False
    return True


def mutate_json(rng: random.Random, obj: Any, donors: list[Any]) -> str:
    """1 to 3 structure-aware changes to a JSON value; its text."""
    obj = copy.deepcopy(obj)
    fragments: dict[str, str] = {}
    for _ in range(rng.choice([1, 1, 2, 3])):
        where = paths(obj)
        path = rng.choice(where)
        how = rng.randrange(10)
        if how == 0:
            obj = set_at(obj, path, hostile_value(rng))
        elif how == 1 and path:
            obj = delete_at(obj, path)
        elif how == 2:
            dicts = [p for p in where if isinstance(get_at(obj, p), dict)]
            if dicts:
                target = get_at(obj, rng.choice(dicts))
                target[rng.choice([*HOSTILE_STRINGS, "policy", "lrs", "v"])] = hostile_value(rng)
        elif how == 3:
            marker = f"@@fragment{len(fragments)}@@"
            fragments[marker] = rng.choice(RAW_FRAGMENTS)
            obj = set_at(obj, path, marker)
        elif how == 4 and isinstance(obj, dict):
            obj["t"] = rng.choice(MESSAGE_TYPES)
        elif how == 5:
            lists = [p for p in where if isinstance(get_at(obj, p), list) and get_at(obj, p)]
            if lists:
                target = rng.choice(lists)
                items = get_at(obj, target)
                times = rng.choice([0, 2, 300, 2000])
                # Twice on one list would be millions of items: capped here,
                # and what the items hold by json_bytes_within below.
                set_at(obj, target, items * min(times, max(1, MAX_LIST_ITEMS // len(items))))
        elif how == 6:
            value = get_at(obj, path)
            if isinstance(value, bool):
                obj = set_at(obj, path, not value)
            elif isinstance(value, int):
                nudge = rng.choice([-1, 1, 1001, 10_001, 2**53, -value - 1, value, 2**62])
                obj = set_at(obj, path, value + nudge)
            elif isinstance(value, float):
                obj = set_at(obj, path, rng.choice([value * 1e300, -value, value / 1e300]))
        elif how == 7 and donors:
            donor = rng.choice(donors)
            obj = set_at(obj, path, copy.deepcopy(get_at(donor, rng.choice(paths(donor)))))
        elif how == 8 and isinstance(obj, dict) and "run" in obj:
            obj["run"] = rng.choice([*RUN_NAMES, *HOSTILE_STRINGS])
        elif how == 9 and isinstance(obj, dict) and "policy" in obj:
            obj["policy"] = copy.deepcopy(rng.choice(POLICIES))
            for stale in ("policy_state", "policy_base_lrs", "base_lrs"):
                if stale in obj and rng.random() < 0.7:
                    obj[stale] = None
    if not json_bytes_within(obj, MAX_JSON_BYTES, fragments):
        return json.dumps({"v": 1, "t": "hello", "pad": "x" * OVERSIZED_BYTES})
    try:
        text = json.dumps(obj)
    except (ValueError, RecursionError):  # a circular donor, a nest too deep for json
        text = json.dumps({"v": 1, "t": "hello"})
    for marker, fragment in fragments.items():
        text = text.replace(json.dumps(marker), fragment)
    return text


def random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Byte-level damage, blind to what the bytes mean."""
    data = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4])):
        how = rng.randrange(7)
        at = rng.randrange(len(data) + 1)
        if how == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif how == 1:
            data[at:at] = random_bytes(rng, rng.choice([1, 4, 8, 64]))
        elif how == 2:
            del data[at : at + rng.choice([1, 8, 100])]
        elif how == 3:
            del data[at:]
        elif how == 4:
            chunk = data[at : at + rng.choice([1, 8, 64])]
            data[at:at] = chunk * rng.choice([1, 10, 1000])
        elif how == 5:
            data[at:at] = rng.choice([b"\x00", b"\xff\xfe", b'"', b"\\", b"\xed\xa0\x80", b"{"])
        else:
            data = bytearray(random_bytes(rng, rng.choice([0, 1, 16, 300])))
    return bytes(data)


def record_offsets(header: Any, body: bytes) -> list[tuple[int, int]]:
    """(offset, number of values) of each record the header describes, as far
    as the body goes; [] when the header is not one a layout comes from."""
    try:
        sizes = []
        for shape, n in header["blocks"]:
            names = header["shapes"][shape][1]
            sizes += [len(names)] * min(int(n), 100_000)
        offsets, at = [], 0
        for n in sizes:
            if at + 8 + 8 * n > len(body):
                break
            offsets.append((at, n))
            at += 8 + 8 * n
        return offsets
    except (KeyError, IndexError, TypeError, ValueError):
        return []


def mutate_records(rng: random.Random, header: Any, body: bytes) -> tuple[Any, bytes]:
    """Damage the binary records frame, knowing its layout where it has one."""
    data = bytearray(body)
    offsets = record_offsets(header, body)
    how = rng.randrange(8)
    if how == 0 and offsets:
        at, _ = rng.choice(offsets)
        struct.pack_into("<q", data, at, rng.choice(STEPS))
    elif how == 1 and any(n for _, n in offsets):
        at, n = rng.choice([o for o in offsets if o[1]])
        value = rng.choice([math.nan, math.inf, -math.inf, 1e308, 5e-324, -0.0])
        struct.pack_into("<d", data, at + 8 + 8 * rng.randrange(n), value)
    elif how == 2:
        del data[rng.randrange(len(data) + 1) :]
    elif how == 3:
        data += random_bytes(rng, rng.choice([1, 7, 8, 9, 100]))
    elif how == 4 and data:
        for _ in range(rng.choice([1, 3, 10])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how in (5, 6) and offsets and isinstance(header, dict):
        if how == 6:  # many records: the budget of work one message may cost
            times = rng.choice([2, 50, 1000])
            header = {**header, "blocks": header["blocks"] * times}
            data = data * times
            offsets = record_offsets(header, bytes(data))
        start = rng.choice([1, 2**53 - 2000, rng.randrange(1, 100)])
        stride = rng.choice(STRIDES)
        for i, (at, _) in enumerate(offsets):
            struct.pack_into("<q", data, at, max(-(2**63), min(2**63 - 1, start + i * stride)))
    elif how == 7 and isinstance(header, dict) and header.get("blocks"):
        blocks = copy.deepcopy(header["blocks"])
        i = rng.randrange(len(blocks))
        if isinstance(blocks[i], list) and len(blocks[i]) == 2:
            blocks[i][1] = rng.choice([0, -1, 2**62, blocks[i][1] + 1, blocks[i][1] * 2])
        header = {**header, "blocks": blocks}
    return header, bytes(data)


def mutate_frames(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    how = rng.randrange(7)
    if how == 0:
        return []
    if how == 1:
        return frames[:1]
    if how == 2:
        return [*frames, frames[-1] if frames else b""]
    if how == 3:
        return [*frames, b""]
    if how == 4:
        return [b""]
    if how == 5:
        return [*frames, random_bytes(rng, rng.choice([1, 16]))]
    return frames[1:] or [b""]


MUTATIONS = ("none", "struct", "struct", "records", "bytes", "frames")


PERSONAS = ("captured", "own", "rank")


def retarget(envelope: Any, run: str, persona: str = "captured", who: int = 0) -> Any:
    """The message as another run's, and as sent by a persona of sender
    ``who``: "captured" is the captured process itself (so a second identity
    may take its rank over), "own" a process of its own (refused a live rank),
    "rank" one that is rank ``who % 3`` of 3 (several ranks, and a driver)."""
    if not isinstance(envelope, dict):
        return envelope
    envelope = {**envelope}
    if "run" in envelope:
        envelope["run"] = run
    if persona != "captured" and "pid" in envelope:
        envelope.update(pid=100 + who, host=f"host-{who}")
    if persona == "rank" and "rank" in envelope:
        envelope["rank"] = who % 3
        if "world_size" in envelope:
            envelope["world_size"] = 3
    return envelope


def mutate_message(
    rng: random.Random,
    frames: list[bytes],
    how: str,
    run: str,
    donors: list[Any],
    persona: str = "captured",
    who: int = 0,
) -> list[bytes]:
    """A client → daemon message (or a daemon → client one), renamed to
    ``run``, sent as ``persona`` of sender ``who``, and mutated ``how``."""
    try:
        envelope = json.loads(frames[0])
    except ValueError:
        envelope = None
    envelope = retarget(envelope, run, persona, who)
    head = json.dumps(envelope).encode() if envelope is not None else frames[0]
    frames = [head, *frames[1:]]
    if how == "struct" and envelope is not None:
        return [mutate_json(rng, envelope, donors).encode(), *frames[1:]]
    if how == "records" and len(frames) == 2:
        header, body = mutate_records(rng, envelope, frames[1])
        if rng.random() < 0.3:
            return [mutate_json(rng, header, donors).encode(), body]
        return [json.dumps(header).encode(), body]
    if how == "bytes" and frames:
        i = rng.randrange(len(frames))
        return [*frames[:i], mutate_bytes(rng, frames[i]), *frames[i + 1 :]]
    if how == "frames":
        return mutate_frames(rng, frames)
    return frames


def mutate_request(rng: random.Random, raw: bytes, how: str, run: str, donors: list) -> bytes:
    """A control request the CLI sent, aimed at ``run``, mutated ``how``."""
    request = json.loads(raw)
    if "run" in request:
        request["run"] = run
    if rng.random() < 0.2:
        request["op"] = rng.choice(CONTROL_OPS)
    if how == "struct":
        return mutate_json(rng, request, donors).encode()
    if how in ("bytes", "records", "frames"):
        return mutate_bytes(rng, json.dumps(request).encode())
    return json.dumps(request).encode()


def envelopes(frames_list: list[list[bytes]]) -> list[Any]:
    return [json.loads(frames[0]) for frames in frames_list if frames]


# --- the victim: a run driven only by valid messages, and its reference ------

VICTIM_POLICY = {
    "kind": "sequential",
    "policies": [
        {"kind": "linear", "start_factor": 0.5, "total_iters": 3},
        {"kind": "plateau", "metric": "val_loss", "patience": 1, "factor": 0.5, "cooldown": 1},
    ],
    "milestones": [3],
}
VICTIM_LRS = [0.2, 0.04]
VAL_LOSSES = [1.0, 0.9, 0.95, 0.97, 0.99, 0.5, 0.6, 0.7, 0.8, 0.81, 0.3]


class Victim:
    """Its own identity, its own run, valid messages only; beside it the same
    policy stepped directly on the same records (what `lrpilot simulate`
    computes)."""

    RUN = "victim"
    IDENTITY = b"victim-identity"

    def __init__(self) -> None:
        self.encoder = BatchEncoder(self.RUN, 0)
        self.reference = parse_policy(VICTIM_POLICY).build(VICTIM_LRS)
        self.seq = self.step = 0
        self.decisions = 0

    def hello(self) -> list[bytes]:
        message = Hello(
            run=self.RUN,
            host="victim-host",
            pid=1,
            groups=[GroupInfo(name=f"g{i}", lr=lr) for i, lr in enumerate(VICTIM_LRS)],
            policy=VICTIM_POLICY,
        )
        return [encode(message)]

    def batch(self, steps: int) -> list[bytes]:
        records = []
        for _ in range(steps):
            self.step += 1
            self.seq += 1
            metrics = {"loss": 1.0 / self.step}
            records.append((self.seq, self.step, STEP, metrics))
            self.reference.step(metrics)
            self.decisions += self.reference.decided is not None
            if self.step % 2 == 0:
                self.seq += 1
                value = {"val_loss": VAL_LOSSES[(self.step // 2) % len(VAL_LOSSES)]}
                records.append((self.seq, self.step, REPORT, value))
                self.reference.observe(value)
                self.decisions += self.reference.decided is not None
        return self.encoder.encode(records, {})

    def check(self, plane: DataPlane, restored: bool = False) -> None:
        engine = plane.registry.runs[self.RUN].engine
        where = "after a restart from the store" if restored else "after the fuzz"
        assert engine.step == self.step, where
        assert engine.lrs == self.reference.lrs, where
        assert engine.policy.state_dict() == self.reference.state_dict(), where
        assert engine.version == self.decisions, where


def victim_state(plane: DataPlane) -> Any:
    run = plane.registry.runs[Victim.RUN]
    engine = run.engine
    sessions = {r: (s.identity, s.sync, s.step) for r, s in run.sessions.items()}
    return (
        engine.step,
        run.ledger.seq,
        engine.version,
        engine.lrs,
        engine.policy.state_dict(),
        engine.held,
        dict(run.last_metrics),
        sessions,
        run.group_names,
        run.world_size,
        run.ended,
    )


# --- the harness: a DataPlane + ControlPlane and every invariant --------------


class Harness:
    def __init__(self, state_dir: Path, corpus: Corpus) -> None:
        self.state_dir = state_dir
        self.corpus = corpus
        self.donors = envelopes(corpus.data) + envelopes(corpus.replies)
        # Limits small enough that a short sequence reaches them.
        self.config = DaemonConfig(
            state_dir=state_dir, max_runs=3, max_metric_names=2, max_step_gap=1000
        )
        self.plane = DataPlane(self.config)
        self.control = ControlPlane(self.plane)
        self.exposition = Exposition(DaemonCollector(self.plane, ttl=600))
        self.now = 1000.0
        self.victim = Victim()
        self.cursors: Counter[int] = Counter()
        self.log: list[str] = []  # what was fed, for the failure message
        self.feed_victim(self.victim.hello())

    # inputs

    def deliver(self, identity: bytes, frames: list[bytes], hostile: bool) -> None:
        before = victim_state(self.plane) if hostile else None
        self.now += 0.001
        self.log.append(f"data {identity!r} {[f[:200] for f in frames]!r}")
        with bounded(lambda: self.log[-1]):
            out = self.plane.handle(identity, frames, self.now)
        INPUTS["data plane"] += hostile
        self.check_replies(out, hostile)
        if hostile:
            assert victim_state(self.plane) == before, f"the victim changed on {self.log[-1]}"
            self.check_everything()

    def feed_victim(self, frames: list[bytes]) -> None:
        self.deliver(Victim.IDENTITY, frames, hostile=False)

    def ask(self, raw: bytes) -> dict[str, Any]:
        before = victim_state(self.plane)
        self.log.append(f"control {raw[:300]!r}")
        with bounded(lambda: self.log[-1]):
            answer, outgoing = self.control.handle(raw)
        INPUTS["control plane"] += 1
        self.check_answer(answer)
        self.check_replies(outgoing, hostile=True)
        assert victim_state(self.plane) == before, f"the victim changed on {self.log[-1]}"
        self.check_everything()
        return answer

    def tick(self) -> None:
        self.plane.tick(self.now)
        self.check_replies(self.plane.persisted(), hostile=False)

    def clock(self, seconds: float) -> None:
        """Time passes (past a rank's takeover, or past the silence timeout);
        the victim speaks just before the sweep, so only the hostile senders
        that went quiet lose their sessions (a run left with none can be
        started afresh)."""
        self.now += seconds
        self.feed_victim(self.victim.batch(1))
        self.plane.sweep(self.now)

    # invariants

    def check_replies(self, out: list[tuple[bytes, list[bytes]]], hostile: bool) -> None:
        for to, frames in out:
            message = decode(frames)  # a reply the hook cannot read is a bug
            if to == Victim.IDENTITY:
                assert not hostile, f"a hostile input sent {message!r} to the victim"
                assert not isinstance(message, Error), f"the victim was refused: {message!r}"
                if isinstance(message, (LRCommand, Processed, Persisted)):
                    assert message.run == Victim.RUN

    def check_answer(self, answer: Any) -> None:
        assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
        raw = json.dumps(answer).encode()  # what the server sends
        if answer["ok"]:
            checked_answer("fuzz", raw)  # what the CLI makes of it
        else:
            assert isinstance(answer["error"], str) and "\n" not in answer["error"]

    def check_everything(self) -> dict[str, Any]:
        text = self.exposition.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert "lrpilot_group_lr" in families
        answer, _ = self.control.handle(b'{"op": "runs"}')
        assert answer["ok"], answer
        json.dumps(answer)
        for run_id, run in list(self.plane.registry.runs.items()):
            shown, _ = self.control.handle(json.dumps({"op": "show", "run": run_id}).encode())
            assert shown["ok"], shown
            json.loads(json.dumps(shown))
            lrs = run.engine.lrs
            # Whatever rebuilt the engine (a rewind, a regroup, a fresh start),
            # it steps through no more than --max-step-gap at a time.
            assert run.engine.max_gap == self.plane.config.max_step_gap, (run_id, self.log[-1])
            assert len(lrs) == len(run.group_names), (run_id, lrs, run.group_names)
            assert all(math.isfinite(lr) and lr >= 0 for lr in lrs), (run_id, lrs)
        return families

    def check_victim(self, restored: bool = False) -> None:
        self.victim.check(self.plane, restored)
        exported = {
            sample.labels["group"]: sample.value
            for sample in self.check_everything()["lrpilot_group_lr"].samples
            if sample.labels["run"] == Victim.RUN
        }
        assert exported == {f"g{i}": lr for i, lr in enumerate(self.victim.reference.lrs)}

    def finish(self) -> None:
        """The victim equals its reference, and /metrics says so; the store
        is sound; a daemon restarted on it serves, the victim still right."""
        self.check_victim()
        self.plane.close()
        assert integrity(self.state_dir) == "ok"
        with watchdog(lambda: "a restart on the fuzzed store"):
            self.plane = DataPlane(self.config)
        self.control = ControlPlane(self.plane)
        self.exposition = Exposition(DaemonCollector(self.plane, ttl=600))
        self.check_victim(restored=True)
        self.plane.close()

    def close(self) -> None:
        if self.plane.store._writer.is_alive():
            self.plane.close()


def integrity(state_dir: Path) -> str:
    db = sqlite3.connect(f"file:{state_dir / DB_NAME}?mode=ro", uri=True)
    try:
        return "; ".join(row[0] for row in db.execute("PRAGMA integrity_check"))
    finally:
        db.close()


IDENTITIES = [b"h0", b"h1", b"h2", uuid.UUID(int=7).bytes]


def plane_ops(corpus: Corpus) -> st.SearchStrategy:
    kinds, control = len(Corpus.grouped(corpus.data)), len(corpus.control)
    identity = st.integers(0, len(IDENTITIES) - 1)
    # Half the messages for one run: sessions of several senders meet there.
    run = st.one_of(st.just(0), st.integers(0, len(RUN_NAMES) - 1))
    how = st.sampled_from(MUTATIONS)
    persona = st.sampled_from(PERSONAS)
    index = st.integers(0, 10_000)  # into a type's messages, modulo their number
    return st.lists(
        st.one_of(
            # The identity's next captured message: hostile sessions that get far.
            st.tuples(st.just("next"), identity, run, persona, how),
            st.tuples(
                st.just("data"), identity, st.integers(0, kinds - 1), index, run, persona, how
            ),
            st.tuples(st.just("control"), st.integers(0, control - 1), run, how),
            st.tuples(st.just("victim"), st.integers(1, 6)),
            st.tuples(st.just("tick")),
            st.tuples(st.just("clock"), st.sampled_from([0.5, 11.0, 301.0])),
        ),
        min_size=20,
        max_size=80,
    )


@pytest.mark.parametrize("seed", [9363, 10448, 13557, 19959])
def test_a_mutation_stays_small_enough_to_send(seed):
    """Seeds whose mutation of a hello was, before the caps, 150-200 MB of
    JSON or more than 6 GB of lists (a test process was killed for memory):
    now a message a little over the daemon's limit, made in little memory."""
    import tracemalloc

    hello = {
        "v": 1, "t": "hello", "run": "r", "rank": 0, "world_size": 2,
        "groups": [{"name": "g0", "lr": 0.1}, {"name": "g1", "lr": 0.02}],
        "policy": {"kind": "plateau", "metric": "loss"}, "policy_base_lrs": [0.1, 0.02],
        "stats": {"a": 1},
    }  # fmt: skip
    tracemalloc.start()
    try:
        text = mutate_json(random.Random(seed), hello, [hello])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(text) <= OVERSIZED_BYTES + 100
    assert peak < 512 * 2**20, f"{peak / 2**20:.0f} MiB to make one message"


@FUZZ_SETTINGS
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_hostile_messages_never_hurt_the_daemon_or_another_run(corpus, data, rng, tmp_path_factory):
    ops = data.draw(plane_ops(corpus), label="ops")
    by_type, session = Corpus.grouped(corpus.data), corpus.session()
    harness = Harness(tmp_path_factory.mktemp("fuzz") / "state", corpus)
    try:
        for op in ops:
            kind = op[0]
            if kind in ("next", "data"):
                if kind == "next":
                    _, who, run, persona, how = op
                    frames = session[harness.cursors[who] % len(session)]
                    harness.cursors[who] += 1
                else:
                    _, who, group, index, run, persona, how = op
                    frames = by_type[group][index % len(by_type[group])]
                mutated = mutate_message(
                    rng, frames, how, RUN_NAMES[run], harness.donors, persona, who
                )
                harness.deliver(IDENTITIES[who], mutated, hostile=True)
            elif kind == "control":
                _, index, run, how = op
                raw = mutate_request(rng, corpus.control[index], how, RUN_NAMES[run], [])
                harness.ask(raw)
            elif kind == "victim":
                harness.feed_victim(harness.victim.batch(op[1]))
            elif kind == "tick":
                harness.tick()
            else:
                harness.clock(op[1])
        harness.finish()
    finally:
        harness.close()


# --- the hook's side: hostile "daemon" messages -------------------------------


@pytest.fixture(scope="module")
def sink() -> Iterator[tuple[str, zmq.Socket]]:
    """A ROUTER the fuzzed pilots connect to, so what they send leaves (a
    pilot's close() waits LINGER for messages nobody takes)."""
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield f"tcp://127.0.0.1:{port}", sock
    finally:
        sock.close()
        context.term()


def drained(sock: zmq.Socket) -> list[list[bytes]]:
    out = []
    while True:
        try:
            _, *frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return out
        out.append(frames)


def check_pilot(pilot: Any, groups: list[dict], what: str) -> None:
    lrs = pilot.lrs
    assert len(lrs) == len(groups), f"{len(lrs)} LRs for {len(groups)} groups after {what}"
    assert all(type(lr) is float and math.isfinite(lr) and lr >= 0 for lr in lrs), (lrs, what)
    assert [g["lr"] for g in groups] == lrs, what


def due(frames: list[bytes], step: int, version: int) -> list[bytes]:
    """A captured command (alone or in a welcome) made newer than any the
    pilot has and due at its next step, so that it is applied, not just
    queued: the pilot under fuzz is never as far as the captured one was."""
    envelope = json.loads(frames[0])
    command = envelope.get("command") if envelope["t"] == "welcome" else envelope
    if not isinstance(command, dict) or command.get("t") != "command":
        return frames
    command.update(
        version=version, effective_step=step + 1, state_step=min(command["state_step"], step)
    )
    return [json.dumps(envelope).encode()]


def hook_ops(corpus: Corpus) -> st.SearchStrategy:
    kinds = len(Corpus.grouped(corpus.replies))
    how = st.sampled_from(MUTATIONS)
    return st.lists(
        st.one_of(
            st.tuples(st.just("message"), st.integers(0, kinds - 1), st.integers(0, 10_000), how),
            st.tuples(st.just("step")),
            st.tuples(st.just("report"), st.sampled_from([0.5, 2.0, math.nan])),
        ),
        min_size=10,
        max_size=40,
    )


@FUZZ_SETTINGS
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_hostile_daemon_messages_never_break_the_hook(corpus, sink, data, rng):
    address, sock = sink
    ops = data.draw(hook_ops(corpus), label="ops")
    donors = envelopes(corpus.replies)
    by_type = Corpus.grouped(corpus.replies)
    groups = [{"params": [], "lr": lr} for lr in CAPTURE_LRS]
    log: list[str] = []
    version = 100  # above every captured command's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pilot warns on what it refuses: that is the point
        pilot = lrpilot_client.attach(
            FakeOptimizer(groups), run="captured", policy=CAPTURE_POLICY, daemon=address
        )
        try:
            for op in ops:
                if op[0] == "message":
                    _, kind, index, how = op
                    original = by_type[kind][index % len(by_type[kind])]
                    version += 1
                    original = due(original, pilot.step_count, version)
                    frames = mutate_message(rng, original, how, "captured", donors)
                    log.append(f"message {[f[:300] for f in frames]!r}")
                    INPUTS["hook"] += 1
                    with watchdog(lambda: log[-1]):
                        pilot._handle(frames)
                    continue
                log.append(repr(op))
                with watchdog(lambda: log[-1]):
                    if op[0] == "step":
                        pilot.step(loss=1.0)
                    else:
                        pilot.report(val_loss=op[1])
                check_pilot(pilot, groups, "\n".join(log))
            # What it would checkpoint loads back (into itself: a resume).
            state = json.loads(json.dumps(pilot.state_dict()))
            pilot.load_state_dict(state)
            pilot.step(loss=1.0)
            check_pilot(pilot, groups, "a load_state_dict of its own state_dict")
        finally:
            pilot.close()
    # Whatever it was told, what it said back is protocol (what is still on
    # its way is read with the next example's).
    for frames in drained(sock):
        decode(frames)


# --- both planes for real: a daemon process, real sockets ---------------------


LIVE_POLICY = {"kind": "plateau", "metric": "loss", "patience": 1, "factor": 0.5}
LIVE_LOSSES = [1.0, 0.9, 0.95, 0.97, 0.5, 0.6, 0.7, 0.8, 0.4, 0.41, 0.42, 0.43]


def live_inputs(
    corpus: Corpus, seed: int, n: int
) -> Iterator[tuple[str, int, list[bytes] | bytes]]:
    """(plane, sender, frames or request) from the same mutators, seeded."""
    rng = random.Random(seed)
    donors = envelopes(corpus.data) + envelopes(corpus.replies)
    cursors: Counter[int] = Counter()
    by_type, session = Corpus.grouped(corpus.data), corpus.session()
    for _ in range(n):
        how = rng.choice(MUTATIONS)
        run = rng.choice(RUN_NAMES)
        if rng.random() < 0.1:
            raw = mutate_request(rng, rng.choice(corpus.control), how, run, [])
            if how == "frames":  # a REQ sends one frame: other counts from a DEALER
                yield "control frames", 0, mutate_frames(rng, [b"", raw]) or [b""]
            else:
                yield "control", 0, raw
            continue
        who = rng.randrange(len(IDENTITIES))
        if rng.random() < 0.5:
            frames = session[cursors[who] % len(session)]
            cursors[who] += 1
        else:
            frames = rng.choice(rng.choice(by_type))
        persona = rng.choice(PERSONAS)
        yield "data", who, mutate_message(rng, frames, how, run, donors, persona, who) or [b""]


class LiveFuzz:
    """Sockets to a real daemon: a DEALER per hostile identity, a REQ for
    control requests (a new one when the daemon drops an oversized one), a
    DEALER for control frames a REQ does not send."""

    def __init__(self, address: str, control: str) -> None:
        self.context = zmq.Context()
        self.control_address = control
        self.dealers = []
        for _ in IDENTITIES:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
            sock.connect(address)
            self.dealers.append(sock)
        self.req = self._req()
        self.raw_control = self.context.socket(zmq.DEALER)
        self.raw_control.setsockopt(zmq.LINGER, 0)
        self.raw_control.connect(control)
        self.replies = 0

    def _req(self) -> zmq.Socket:
        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.control_address)
        return sock

    def send(self, who: int, frames: list[bytes]) -> None:
        self.dealers[who].send_multipart(frames)
        INPUTS["live data plane"] += 1

    def send_control_frames(self, frames: list[bytes]) -> None:
        self.raw_control.send_multipart(frames)
        INPUTS["live control plane"] += 1

    def drain(self) -> None:
        while True:  # the daemon answers a request it has whatever its frames
            try:
                answer = json.loads(self.raw_control.recv_multipart(zmq.NOBLOCK)[-1])
            except zmq.Again:
                break
            assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
        for sock in self.dealers:
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                decode(frames)
                self.replies += 1

    def ask(self, raw: bytes, timeout: float = 10.0) -> dict[str, Any] | None:
        """The daemon's answer, or None when it dropped the request (over its
        socket's MAXMSGSIZE: the connection goes, unanswered)."""
        self.req.send(raw)
        INPUTS["live control plane"] += 1
        if not self.req.poll(int(timeout * 1000)):
            self.req.close()
            self.req = self._req()
            return None
        answer = json.loads(self.req.recv())
        assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
        return answer

    def close(self) -> None:
        for sock in [*self.dealers, self.req, self.raw_control]:
            sock.close()
        self.context.term()


def test_a_real_daemon_serves_on_after_the_fuzz(corpus, lrpilot_exe, tmp_path):
    state = tmp_path / "state"
    with daemon_process(lrpilot_exe, state, tmp_path / "daemon.log") as daemon:
        fuzz = LiveFuzz(daemon.address, daemon.control)
        groups = [{"params": [], "lr": 0.1}, {"params": [], "lr": 0.02}]
        got: list[list[float]] = []
        inputs = live_inputs(corpus, seed=LIVE_SEED, n=LIVE_MESSAGES)
        try:
            with lrpilot_client.attach(
                FakeOptimizer(groups),
                run="live-victim",
                policy=LIVE_POLICY,
                daemon=daemon.address,
                sync=True,
                sync_timeout=10.0,
            ) as pilot:
                losses = iter(LIVE_LOSSES)
                for i, (plane, who, message) in enumerate(inputs):
                    if plane == "control":
                        answer = fuzz.ask(message, timeout=5.0)
                        # Unanswered only when the socket dropped it (over its limit).
                        assert answer is not None or len(message) > 4 * MAX_CONTROL_BYTES
                    elif plane == "control frames":
                        fuzz.send_control_frames(message)
                    else:
                        fuzz.send(who, message)
                    if i % max(1, LIVE_MESSAGES // 8) == 0:
                        # The victim trains between the fuzz, in lock-step:
                        # each step waits for the daemon to process it.
                        pilot.step(loss=next(losses))
                        got.append([g["lr"] for g in groups])
                        fuzz.drain()
                # What no mutator makes: messages over each socket's limits.
                fuzz.send(0, [b"{" + b" " * (MAX_MESSAGE_BYTES + 16)])
                assert fuzz.ask(b" " * (MAX_CONTROL_BYTES + 1))["ok"] is False
                assert fuzz.ask(b" " * (5 * MAX_CONTROL_BYTES), timeout=2.0) is None
                for loss in losses:
                    pilot.step(loss=loss)
                    got.append([g["lr"] for g in groups])
                stats = pilot.stats
            fuzz.drain()
            assert fuzz.replies > 0  # the hostile senders were answered, not ignored
        finally:
            fuzz.close()
        assert stats.sync_timeouts == 0 and stats.daemon_errors == 0, stats
        assert daemon.proc.poll() is None, daemon.log()

        # The operator's side: every run answers, on the wire and in the CLI.
        runs = control(daemon.control, {"op": "runs"})["runs"]
        assert "live-victim" in {r["run"] for r in runs}
        for run in runs:
            shown = control(daemon.control, {"op": "show", "run": run["run"]})
            assert shown["run"]["run"] == run["run"]
        ok(lrpilot(lrpilot_exe, "runs", "--control", daemon.control))
        json.loads(ok(lrpilot(lrpilot_exe, "runs", "--json", "--control", daemon.control)))
        ok(lrpilot(lrpilot_exe, "show", "live-victim", "--control", daemon.control))
        # What hostile senders named and filled: the CLI prints it all the same.
        hostile = [r["run"] for r in runs if r["run"] != "live-victim"]
        assert hostile, "the fuzz made no run: it reached nothing past the refusals"
        for run in [r for r in hostile if r.isprintable()][:3]:
            ok(lrpilot(lrpilot_exe, "show", "--control", daemon.control, "--", run))
            ok(lrpilot(lrpilot_exe, "history", "--control", daemon.control, "--", run))
        ok(lrpilot(lrpilot_exe, "top", "--control", daemon.control))
        with urllib.request.urlopen(daemon.metrics_url, timeout=10) as scrape:
            families = list(text_string_to_metric_families(scrape.read().decode()))
        assert any(f.name == "lrpilot_group_lr" for f in families)

        # The victim's LRs, step for step, are what simulate gives.
        stream = "".join(
            json.dumps({"step": k, "metrics": {"loss": loss}}) + "\n"
            for k, loss in enumerate(LIVE_LOSSES, start=1)
        )
        want = simulate(lrpilot_exe, LIVE_POLICY, stream, [0.1, 0.02])
        assert got == want
        assert len({tuple(lrs) for lrs in want}) >= 3  # the policy cut, twice

        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0, daemon.log()
    log = daemon.log()
    for bad in ("internal error", "Traceback"):
        assert bad not in log, log[max(0, log.index(bad) - 2000) : log.index(bad) + 3000]
    assert integrity(state) == "ok"
