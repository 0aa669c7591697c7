"""``ShardFront``: ``lrpilot daemon --shards N``, one daemon on N cores.

One daemon is one loop on one core (server.py); past a few hundred ranks at
100 steps/s that core is the limit (docs/scaling.md). With ``--shards N`` the
front process starts N shard processes, each a whole daemon (its own loop,
store, writer thread and /metrics) for the runs that hash to it
(sharding.py), and keeps the addresses users know:

- **data**: the front answers a rank's hello with the address of its run's
  shard (``moved``), and the rank talks to that shard from then on: records,
  decisions and acks never pass through the front;
- **control**: operators' requests are forwarded to the shard of their run
  (``runs`` to every shard, the answers merged), on private ipc sockets in a
  directory only this user may enter; the front checks the client's key,
  the shard its role;
- **/metrics**: the shards' expositions merged, each series labelled with
  its ``shard`` (the front's own with ``shard="front"``): one scrape target.

A shard that dies is started again on the same addresses and store (its
runs' ranks reconnect and say hello again, as after a daemon restart), after
a pause that grows while it keeps dying. A shard whose front is gone stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from lrpilot.protocol import (
    Ack,
    Bye,
    Hello,
    MessageTooLarge,
    Moved,
    ProtocolError,
    decode,
    encode,
)

from ..control_protocol import MAX_CONTROL_BYTES, encode_answer, refusal
from ..observability.exporter import FrontExposition
from ..observability.metrics_server import MetricsServer
from ..observability.shard_exposition import merge
from .auth import Gatekeeper, KeyRing, KeysError, data_refusal, key_name
from .config import DaemonConfig
from .dataplane import error
from .server import (
    HARD_LIMIT_FACTOR,
    DaemonError,
    bind_router,
    close_planes,
    count_refused,
    loop_stalled,
    run_until_signalled,
    warn_if_insecure,
)
from .sharding import (
    ShardPlan,
    check_manifest,
    check_shard_ports,
    shard_data_address,
    shard_of,
    shard_state_dir,
)
from .state_lock import StateLock, StateLocked

log = logging.getLogger("lrpilot.daemon")

POLL_MS = 50
DRAIN_MAX = 500  # data messages per turn: hellos and strays, a few µs each
START_TIMEOUT_S = 60.0  # a shard restores its runs from its store before it is ready
FORWARD_TIMEOUT_S = 10.0  # a shard that has not answered a request by then is down
STOP_TIMEOUT_S = 30.0  # a stopping shard flushes its store first
SUPERVISE_EVERY = 0.5  # seconds between looks at the shards' processes
# A shard that dies within this long of its start counts as failing to start:
# the pause before the next try doubles (1, 2, 4 ... RESTART_MAX_S seconds);
# one that served longer is started again at once.
FAST_FAILURE_S = 10.0
RESTART_MAX_S = 30.0
SCRAPE_TIMEOUT_S = 10.0  # a shard's /metrics (1,000 runs: ~50 ms)


@dataclass
class Shard:
    plan: ShardPlan
    config: DaemonConfig
    ready_path: Path
    process: Any = None  # multiprocessing's Process (spawn context)
    dealer: zmq.Socket | None = None
    metrics_url: str | None = None
    up: bool = False
    started_at: float = 0.0
    restarts: int = 0
    fast_failures: int = 0
    restart_at: float | None = None  # when a dead shard is started again


@dataclass
class Pending:
    """A control request forwarded to shards, waiting for their answers."""

    identity: bytes
    envelope: list[bytes]
    op: str
    deadline: float
    waiting: set[int]
    answers: list[dict[str, Any]] = field(default_factory=list)


def run_shard(config: DaemonConfig, plan: ShardPlan, ready_path: str) -> None:
    """A shard process: a Daemon for its runs, until SIGTERM or its front is gone."""
    from .server import Daemon

    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[shard {plan.index}]: %(message)s",
    )
    front = os.getppid()
    with contextlib.suppress(OSError):  # `top` and `ps -o comm` show which shard it is
        Path("/proc/self/comm").write_text(f"lrpilot-shard{plan.index}")
    daemon = Daemon(config, shard=plan)
    # Ctrl-C reaches the whole process group: the front stops the shards in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_keys())

    def watch_front() -> None:
        # A front killed with -9 cannot stop its shards: they stop themselves.
        while os.getppid() == front:
            time.sleep(0.5)
        log.warning("the front process is gone; stopping")
        daemon.stop()

    try:
        daemon.start()
    except DaemonError as exc:
        log.error("%s", exc)
        sys.exit(2)
    threading.Thread(target=watch_front, name="lrpilot-front-watch", daemon=True).start()
    ready = {
        "data": daemon.bound_address,
        "metrics": daemon.metrics.url if daemon.metrics else None,
    }
    temporary = ready_path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(ready, f)
    os.replace(temporary, ready_path)
    try:
        daemon.serve()
    finally:
        daemon.close()


class ShardFront:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._stop = threading.Event()
        self._reload_keys = threading.Event()
        self._context: zmq.Context | None = None
        self._data: zmq.Socket | None = None
        self._control: zmq.Socket | None = None
        self._monitors: list[zmq.Socket] = []
        self.keys: KeyRing | None = None
        self.gate: Gatekeeper | None = None
        self.shards: list[Shard] = []
        self._pending: dict[bytes, Pending] = {}
        self._next_request = 0
        self._private: Path | None = None
        self.metrics: MetricsServer | None = None
        self._loop_at = time.monotonic()
        self.bound_address = self.bound_control_address = ""
        self.counts = {"moved": 0, "forwarded": 0, "timed_out": 0}
        # Clients refused for their key here (as DataPlane.auth_refused): the
        # handshakes the gate refused, and hellos outside the key's runs.
        self.auth_refused: Counter[str] = Counter()
        self._spawn = multiprocessing.get_context("spawn")
        self._state_lock: StateLock | None = None
        self._started = False  # every shard came up once

    # --- start and stop ---------------------------------------------------

    def start(self) -> None:
        c = self.config
        try:
            check_shard_ports(c.address, c.shards, c.shard_base_port)
            self._state_lock = StateLock(c.state_dir)
            check_manifest(c.state_dir, c.shards)
        except (ValueError, StateLocked) as exc:
            self.close()
            raise DaemonError(str(exc)) from None
        self._context = zmq.Context()
        if c.keys is not None:
            try:
                self.keys = KeyRing(c.keys)
            except KeysError as exc:
                self.close()
                raise DaemonError(str(exc)) from None
            self.gate = Gatekeeper(self._context, self.keys)
            self.auth_refused = self.gate.denied
        else:
            warn_if_insecure(c)  # the shards say it of their data planes
        try:
            self._data = bind_router(
                self._context,
                c.address,
                c.max_message_bytes * HARD_LIMIT_FACTOR,
                self.keys,
                self._monitors,
            )
            self._control = bind_router(
                self._context,
                c.control_address,
                MAX_CONTROL_BYTES * HARD_LIMIT_FACTOR,
                self.keys,
                self._monitors,
            )
        except DaemonError:
            self.close()
            raise
        self.bound_address = self._data.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bound_control_address = self._control.getsockopt_string(zmq.LAST_ENDPOINT)
        # Short: an ipc path is at most ~100 bytes. mkdtemp makes it 0700.
        self._private = Path(tempfile.mkdtemp(prefix="lrpilot-"))
        addresses = tuple(
            shard_data_address(c.address, k, c.shard_base_port) for k in range(c.shards)
        )
        for k in range(c.shards):
            plan = ShardPlan(k, c.shards, addresses, f"ipc://{self._private}/shard-{k}")
            config = c.model_copy(
                update={
                    "address": addresses[k],
                    "control_address": plan.control_address,
                    "state_dir": shard_state_dir(c.state_dir, k),
                    "metrics_addr": "off" if c.metrics_addr == "off" else "127.0.0.1:0",
                    "shards": 1,
                }
            )
            self.shards.append(Shard(plan, config, self._private / f"shard-{k}.json"))
        # Bound before the shards start: a port in use is refused before any
        # shard runs, and a shard's HTTP side (port 0) cannot take it meanwhile.
        self._serve_metrics()
        for shard in self.shards:
            self._launch(shard)
        deadline = time.monotonic() + START_TIMEOUT_S
        for shard in self.shards:
            while not self._came_up(shard):
                if not shard.process.is_alive() or time.monotonic() > deadline:
                    code = shard.process.exitcode
                    self.close()
                    raise DaemonError(
                        f"shard {shard.plan.index} did not start"
                        + (f" (exit code {code}; its log is above)" if code is not None else "")
                    )
                time.sleep(0.02)
                self._loop_at = time.monotonic()  # alive while it waits (/livez)
        self._started = True
        log.info(
            "lrpilot daemon listening on %s (control %s, metrics %s) with %d shards: data at %s, "
            "stores in %s",
            self.bound_address,
            self.bound_control_address,
            self.metrics.url if self.metrics else "off",
            c.shards,
            ", ".join(addresses),
            c.state_dir,
        )

    def _launch(self, shard: Shard) -> None:
        with contextlib.suppress(FileNotFoundError):
            shard.ready_path.unlink()
        shard.up, shard.metrics_url, shard.restart_at = False, None, None
        shard.process = self._spawn.Process(
            target=run_shard,
            args=(shard.config, shard.plan, str(shard.ready_path)),
            name=f"lrpilot-shard-{shard.plan.index}",
            daemon=False,
        )
        shard.process.start()
        shard.started_at = time.monotonic()

    def _came_up(self, shard: Shard) -> bool:
        """Whether a starting shard has written its ready file; then connect."""
        try:
            ready = json.loads(shard.ready_path.read_text())
        except (FileNotFoundError, ValueError):
            return False
        assert self._context is not None
        if shard.dealer is not None:
            shard.dealer.close(linger=0)
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(shard.plan.control_address)
        shard.dealer, shard.metrics_url, shard.up = dealer, ready.get("metrics"), True
        return True

    def _serve_metrics(self) -> None:
        where = self.config.metrics_host_port
        if where is None:
            return
        own = FrontExposition(self)

        def render() -> str:
            return merge([("front", own.text()), *self._shard_texts()])

        try:
            self.metrics = MetricsServer(render, *where, self.health, self.liveness)
        except OSError as exc:
            self.close()
            raise DaemonError(
                f"cannot serve metrics on {self.config.metrics_addr}: {exc.strerror or exc} "
                "(--metrics-addr HOST:PORT moves it, --metrics-addr off turns it off)"
            ) from None

    def _shard_texts(self) -> Iterator[tuple[str, str]]:
        for shard in list(self.shards):
            url = shard.metrics_url
            if not shard.up or url is None:
                continue
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as answer:
                    yield str(shard.plan.index), answer.read().decode()
            except OSError as exc:
                log.warning("shard %d: /metrics: %s", shard.plan.index, exc)

    def stop(self) -> None:
        self._stop.set()

    def reload_keys(self) -> None:
        self._reload_keys.set()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for shard in self.shards:
            if shard.process is not None and shard.process.is_alive():
                shard.process.terminate()
        for shard in self.shards:
            if shard.process is None:
                continue
            shard.process.join(STOP_TIMEOUT_S)
            if shard.process.is_alive():
                log.error(
                    "shard %d did not stop in %.0f s: killed", shard.plan.index, STOP_TIMEOUT_S
                )
                shard.process.kill()
                shard.process.join()
            if shard.dealer is not None:
                shard.dealer.close(linger=0)
                shard.dealer = None
        close_planes([self._data, self._control], self._monitors)
        self._data = self._control = None
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None
        if self._state_lock is not None:  # last: the shards have let go of theirs
            self._state_lock.release()
            self._state_lock = None

    def run(self) -> None:
        """start, serve until SIGINT/SIGTERM, close: `lrpilot daemon --shards N`."""
        run_until_signalled(self)

    # --- health -------------------------------------------------------------

    def liveness(self) -> str | None:
        return loop_stalled(self._loop_at, "front's")

    def health(self) -> str | None:
        """None when the front and every shard serve (and their stores take
        writes), else the first reason why not."""
        problem = self.liveness()
        for shard in list(self.shards):
            if problem is not None:
                break
            if not shard.up:
                state = "restarting" if self._started else "starting"
                problem = f"shard {shard.plan.index} is {state}"
            elif shard.metrics_url is not None:
                problem = shard_health(shard)
        return problem

    # --- the loop -------------------------------------------------------------

    def serve(self) -> None:
        data, control = self._data, self._control
        assert data is not None and control is not None, "start() first"
        poller = self._poller()
        next_look = time.monotonic()
        while not self._stop.is_set():
            ready = dict(poller.poll(POLL_MS))
            if data in ready:
                self._drain_data()
            if control in ready:
                self._drain_control()
            for shard in self.shards:
                if shard.dealer is not None and shard.dealer in ready:
                    self._drain_answers(shard)
            for monitor in self._monitors:
                if monitor in ready:
                    count_refused(monitor, self.gate)
            if self._reload_keys.is_set() and self.keys is not None:
                self._reload_keys.clear()
                self.keys.reload()
                for shard in self.shards:
                    if shard.process is not None and shard.process.is_alive():
                        os.kill(shard.process.pid, signal.SIGHUP)
            now = self._loop_at = time.monotonic()
            self._expire(now)
            if now >= next_look:
                if self._supervise(now):
                    poller = self._poller()
                next_look = now + SUPERVISE_EVERY

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (self._data, self._control, *self._monitors):
            poller.register(sock, zmq.POLLIN)
        for shard in self.shards:
            if shard.dealer is not None:
                poller.register(shard.dealer, zmq.POLLIN)
        return poller

    def _receive(self, sock: zmq.Socket) -> tuple[bytes, list[bytes], str | None]:
        """(routing id, frames, the client's z85 public key or None)."""
        identity, *parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        public = key_name(parts[-1]) if parts and self.keys is not None else None
        return identity.bytes, [part.bytes for part in parts], public

    def _reply(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        with contextlib.suppress(zmq.ZMQError):  # a peer gone or not reading
            sock.send_multipart(frames, zmq.NOBLOCK)

    def _drain_data(self) -> None:
        """Hellos get their run's shard; anything else is a rank that has
        not said hello here (it does, and is moved)."""
        sock, keys = self._data, self.keys
        assert sock is not None
        for _ in range(DRAIN_MAX):
            try:
                identity, frames, public = self._receive(sock)
            except zmq.Again:
                return
            try:
                message = decode(frames, self.config.max_message_bytes)
            except MessageTooLarge as exc:
                self._reply(sock, [identity, *error("oversized", str(exc))])
                continue
            except ProtocolError as exc:
                self._reply(sock, [identity, *error("malformed", str(exc))])
                continue
            if isinstance(message, Hello):
                if keys is not None:
                    why = data_refusal(keys.key(public) if public else None, message.run)
                    if why is not None:
                        self.auth_refused["forbidden"] += 1
                        self._reply(sock, [identity, *error("forbidden", why)])
                        continue
                home = self.shards[shard_of(message.run, len(self.shards))]
                self.counts["moved"] += 1
                moved = Moved(run=message.run, address=home.plan.data_addresses[home.plan.index])
                self._reply(sock, [identity, encode(moved)])
            elif not isinstance(message, (Ack, Bye)):
                self._reply(sock, [identity, *error("unknown_session", "say hello first")])

    def _drain_control(self) -> None:
        sock = self._control
        assert sock is not None
        while True:
            try:
                identity, frames, public = self._receive(sock)
            except zmq.Again:
                return
            # The shard checks the key (still allowed, and its role) as one
            # daemon does; CURVE has proved the client holds it.
            envelope, raw = frames[:-1], frames[-1] if frames else b""
            op, targets = request_targets(raw, len(self.shards))
            down = [k for k in targets if not self.shards[k].up]
            if down:
                answer = refusal(
                    f"shard {down[0]} of this daemon is restarting; try again in a few seconds"
                )
                self._reply(sock, [identity, *envelope, encode_answer(answer)])
                continue
            if op == "store" and len(targets) > 1:
                answer = refusal(
                    f"this daemon runs {len(self.shards)} shards, each with a store: ask for a "
                    "run's (store with its run)"
                )
                self._reply(sock, [identity, *envelope, encode_answer(answer)])
                continue
            self._next_request += 1
            request_id = self._next_request.to_bytes(8, "big")
            for k in targets:
                dealer = self.shards[k].dealer
                assert dealer is not None
                dealer.send_multipart([request_id, (public or "").encode(), raw])
            self.counts["forwarded"] += 1
            self._pending[request_id] = Pending(
                identity, envelope, op, time.monotonic() + FORWARD_TIMEOUT_S, set(targets)
            )

    def _drain_answers(self, shard: Shard) -> None:
        assert shard.dealer is not None
        while True:
            try:
                request_id, raw = shard.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            pending = self._pending.get(request_id)
            if pending is None or shard.plan.index not in pending.waiting:
                continue  # answered by a timeout already
            pending.waiting.discard(shard.plan.index)
            pending.answers.append(json.loads(raw))
            if not pending.waiting:
                del self._pending[request_id]
                self._answer(pending, merged(pending))

    def _answer(self, pending: Pending, answer: bytes) -> None:
        assert self._control is not None
        self._reply(self._control, [pending.identity, *pending.envelope, answer])

    def _expire(self, now: float) -> None:
        for request_id, pending in list(self._pending.items()):
            if now >= pending.deadline:
                del self._pending[request_id]
                self.counts["timed_out"] += 1
                late = ", ".join(str(k) for k in sorted(pending.waiting))
                answer = refusal(
                    f"shard {late} did not answer within {FORWARD_TIMEOUT_S:.0f} s; the request "
                    "may or may not have been carried out (lrpilot history shows)"
                )
                self._answer(pending, encode_answer(answer))

    def _supervise(self, now: float) -> bool:
        """Start again what died; True when a shard's socket changed."""
        changed = False
        for shard in self.shards:
            process = shard.process
            if shard.restart_at is None and not process.is_alive():
                shard.up = False
                lived = now - shard.started_at
                shard.fast_failures = shard.fast_failures + 1 if lived < FAST_FAILURE_S else 0
                # At once after a long life; 1, 2, 4 ... s while it keeps dying young.
                failures = shard.fast_failures
                pause = min(RESTART_MAX_S, 2.0 ** (failures - 1)) if failures else 0.0
                log.error(
                    "shard %d stopped (exit code %s) after %.0f s; starting it again in %.0f s",
                    shard.plan.index,
                    process.exitcode,
                    lived,
                    pause,
                )
                shard.restart_at = now + pause
                # Requests queued for the dead one would reach the new one
                # after their answer timed out, and act unseen: drop them.
                if shard.dealer is not None:
                    shard.dealer.close(linger=0)
                    shard.dealer = None
                    changed = True
            elif shard.restart_at is not None and now >= shard.restart_at:
                shard.restarts += 1
                self._launch(shard)
            elif not shard.up and shard.restart_at is None and self._came_up(shard):
                log.info("shard %d is serving again", shard.plan.index)
                changed = True
        return changed


def request_targets(raw: bytes, count: int) -> tuple[str, list[int]]:
    """A control request's op and the shards that answer it: its run's,
    every shard for ``runs`` (and ``store`` without a run, refused); shard 0
    for one the front cannot read, to be refused there in the words one
    daemon uses. Any bytes: they come from the network."""
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "", [0]
    if not isinstance(request, dict):
        return "", [0]
    op, run = request.get("op"), request.get("run")
    op = op if isinstance(op, str) else ""
    if op == "runs" or (op == "store" and run is None):
        return op, list(range(count))
    if isinstance(run, str):
        return op, [shard_of(run, count)]
    return op, [0]


def merged(pending: Pending) -> bytes:
    """One answer from the shards': the first refusal, or every shard's runs."""
    for answer in pending.answers:
        if answer.get("ok") is not True:
            return json.dumps(answer).encode()
    if pending.op == "runs" and len(pending.answers) > 1:
        runs = [run for answer in pending.answers for run in answer.get("runs", [])]
        runs.sort(key=lambda run: run.get("created", 0))
        return json.dumps({**pending.answers[0], "runs": runs}).encode()
    return json.dumps(pending.answers[0]).encode()


def shard_health(shard: Shard) -> str | None:
    url = (shard.metrics_url or "").rsplit("/", 1)[0] + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as answer:
            return None if answer.status == 200 else f"shard {shard.plan.index}: {answer.status}"
    except urllib.error.HTTPError as exc:
        return f"shard {shard.plan.index}: {exc.read().decode(errors='replace').strip()}"
    except OSError as exc:
        return f"shard {shard.plan.index}: /healthz: {exc}"
