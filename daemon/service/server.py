"""``Daemon``: the lifecycle of the service: bind, serve, shut down cleanly.

One loop, two ROUTER sockets (the data plane for training processes, the
control plane for operators): the work per message is a few microseconds, so
a single thread keeps every run's records in order without locks. The store's
writer thread commits in the background. SIGINT/SIGTERM end the loop at the
next poll (within 100 ms); the store is flushed before the daemon exits.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from lrpilot.errors import LRPilotError, UsageError

from ..control_protocol import MAX_CONTROL_BYTES, Answer, Refusal, encode_answer, refusal
from ..observability.annotations import AnnotationPoster
from ..observability.exporter import DaemonCollector, Exposition
from ..observability.metrics_server import MetricsServer
from .auth import Gatekeeper, KeyRing, KeysError, key_name
from .config import DaemonConfig, is_loopback
from .control import ControlPlane
from .dataplane import DataPlane
from .gc_pacing import CollectorPacing
from .schema import StoreError
from .sharding import ShardPlan, check_manifest
from .state_lock import StateLock, StateLocked

log = logging.getLogger("lrpilot.daemon")

POLL_MS = 20
TICK_EVERY = 0.1  # seconds between store batches (and persisted acks)
SWEEP_EVERY = 1.0  # seconds between looks for silent sessions
# /healthz fails when the loop has not turned for this long (a wedged loop; a
# start that restores many runs happens before /metrics is served at all).
LOOP_STALL_S = 10.0
# Data-plane messages handled in one turn of the loop (a few ms of work)
# before it answers the control plane, ticks and sends persisted acks: an
# operator's command waits for at most one turn (bench/load.py).
DRAIN_MAX = 200
CONTROL_EVERY = 25  # data messages between two looks at the control plane in a drain
SWITCH_INTERVAL = 0.0005  # seconds: see serve()
ACKS_PER_LOOK = 100  # persisted acks sent between two looks at the control plane
# A shard's front started it again after the front itself was: the shard it
# replaces stops within a second of seeing its front gone, flushing its store.
SHARD_LOCK_WAIT_S = 15.0
# Handshake failures the sockets' monitors report: the peer spoke another
# mechanism (no key, on a daemon with keys) or broke the protocol. A key the
# daemon does not allow fails in ZAP (counted by the Gatekeeper) and shows
# here as FAILED_AUTH, which is not counted twice.
HANDSHAKE_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
# libzmq drops a peer that sends more than this; below it the data plane
# answers an oversized message with an error instead.
HARD_LIMIT_FACTOR = 4


class DaemonError(LRPilotError, RuntimeError):
    """The daemon cannot start (address in use, bad address)."""


def bind_router(
    context: zmq.Context,
    address: str,
    max_bytes: int,
    keys: KeyRing | None,
    monitors: list[zmq.Socket],
) -> zmq.Socket:
    """A plane's ROUTER, bound: with keys, every connection does the CURVE
    handshake, and a monitor for refused handshakes is added to ``monitors``."""
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.secure(sock)  # before bind: every connection does the CURVE handshake
        monitors.append(sock.get_monitor_socket(HANDSHAKE_REFUSED))
    # Before bind: libzmq applies it to connections as they are accepted,
    # and drops a peer whose message grows past it before it is buffered
    # whole (set after bind it did not hold).
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    # Replies to a peer whose pipe is full are dropped, never block the loop.
    sock.setsockopt(zmq.SNDHWM, 10_000)
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close()
        raise DaemonError(f"cannot bind {address}: {exc}") from None
    return sock


def warn_if_insecure(config: DaemonConfig) -> None:
    """A plane off loopback without keys (--insecure): said at every start."""
    for plane, address in (("data", config.address), ("control", config.control_address)):
        if not is_loopback(address):
            log.warning(
                "the %s plane is bound to %s with --insecure and no keys: anyone who can "
                "connect can report for any run, steer its decisions and set its LRs",
                plane,
                address,
            )


def count_refused(monitor: zmq.Socket, gate: Gatekeeper | None) -> None:
    """A handshake a plane refused before ZAP: a client with no key (or keys
    of another daemon). Unknown keys are counted by the gate."""
    while True:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return
        if gate is not None and event["event"] & HANDSHAKE_REFUSED:
            gate.refused_handshake(event["endpoint"])


def close_planes(socks: list[zmq.Socket | None], monitors: list[zmq.Socket]) -> None:
    """Close the planes' sockets and their monitors (emptying ``monitors``)."""
    for sock in socks:
        if sock is not None:
            if monitors:
                sock.disable_monitor()
            sock.close()
    for monitor in monitors:
        monitor.close()
    monitors.clear()


def loop_stalled(loop_at: float, what: str) -> str | None:
    """Why a loop that last turned at ``loop_at`` is wedged (/livez), or None."""
    silent = time.monotonic() - loop_at
    if silent > LOOP_STALL_S:
        return f"the {what} loop has not turned for {silent:.0f} s"
    return None


def run_until_signalled(service: Any) -> None:
    """start, serve until SIGINT/SIGTERM (SIGHUP: read the keys again),
    close: what `lrpilot daemon` does, with one process or several."""
    service.start()
    previous = {
        sig: signal.signal(sig, lambda *_: service.stop())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: service.reload_keys())
    try:
        service.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.close()
        log.info("lrpilot daemon stopped")


class Daemon:
    def __init__(self, config: DaemonConfig | None = None, shard: ShardPlan | None = None) -> None:
        self.config = config or DaemonConfig()
        # One of the shards of `lrpilot daemon --shards N` (daemon/service/front.py):
        # hellos of other shards' runs are sent there, and the control plane
        # is a private socket the front forwards requests to.
        self.shard = shard
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._context: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._control_sock: zmq.Socket | None = None
        self.plane: DataPlane | None = None
        self.control: ControlPlane | None = None
        self.metrics: MetricsServer | None = None
        self._loop_at = time.monotonic()  # the serve loop's last turn
        self.annotations: AnnotationPoster | None = None
        self.bound_address = ""
        self.bound_control_address = ""
        self.keys: KeyRing | None = None
        self.gate: Gatekeeper | None = None
        self._reload_keys = threading.Event()  # SIGHUP: read allowed/ again
        # Handshakes a plane refused before ZAP (a client with no key, or a
        # key on a keyless daemon), from the sockets' monitors.
        self._monitors: list[zmq.Socket] = []
        # Full garbage collections once per FULL_EVERY_S, not every few seconds.
        self.collector = CollectorPacing()
        self._state_lock: StateLock | None = None  # this process serves the state dir

    def start(self) -> None:
        """Open the store (restoring its runs) and bind both sockets."""
        try:
            # A shard started again may wait for the one it replaces to let go.
            wait = SHARD_LOCK_WAIT_S if self.shard is not None else 0.0
            self._state_lock = StateLock(self.config.state_dir, wait)
            if self.shard is None:  # a state dir of several shards needs them all
                check_manifest(self.config.state_dir, 1)
            self.plane = DataPlane(self.config)
        except (StoreError, UsageError, StateLocked) as exc:
            self._release_state()
            raise DaemonError(str(exc)) from None
        self.control = ControlPlane(self.plane)
        self.plane.send_now = self._send
        if self.shard is not None:
            self.plane.elsewhere = self.shard.elsewhere
        self._post_annotations()
        self._context = zmq.Context()
        if self.config.keys is not None:
            try:
                self.keys = KeyRing(self.config.keys)
            except KeysError as exc:
                self.close()
                raise DaemonError(str(exc)) from None
            self.gate = Gatekeeper(self._context, self.keys)
            self.plane.auth_refused = self.gate.denied
        else:
            warn_if_insecure(self.config)
        try:
            hard_limit = self.config.max_message_bytes * HARD_LIMIT_FACTOR
            self._sock = self._bind(self.config.address, hard_limit)
            # A reply to a peer whose pipe is full (a client that stopped
            # reading) or that is gone raises instead of vanishing, so that
            # _send counts it (reply_dropped) rather than nobody knowing.
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            control_limit = MAX_CONTROL_BYTES * HARD_LIMIT_FACTOR
            if self.shard is None:
                self._control_sock = self._bind(self.config.control_address, control_limit)
            else:
                self._control_sock = self._bind_private(self.shard.control_address)
        except DaemonError:
            self.close()
            raise
        self.bound_address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bound_control_address = self._control_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._serve_metrics()
        log.info(
            "lrpilot daemon listening on %s (control %s, metrics %s, store %s, %d runs restored)",
            self.bound_address,
            self.bound_control_address,
            self.metrics.url if self.metrics else "off",
            self.plane.store.path,
            len(self.plane.registry.runs),
        )

    def _serve_metrics(self) -> None:
        where = self.config.metrics_host_port
        if where is None:
            return
        self._loop_at = time.monotonic()  # healthy until serve() has had time to turn
        counts = self.annotations.counts if self.annotations else None
        assert self.plane is not None, "start() made it"
        collector = DaemonCollector(self.plane, self.config.metrics_ttl, annotations=counts)
        try:
            self.metrics = MetricsServer(
                Exposition(collector).text, *where, self.health, self.liveness
            )
        except OSError as exc:
            self.close()
            raise DaemonError(
                f"cannot serve metrics on {self.config.metrics_addr}: {exc.strerror or exc} "
                "(--metrics-addr HOST:PORT moves it, --metrics-addr off turns it off)"
            ) from None

    def _post_annotations(self) -> None:
        """With --grafana-url, every journaled LR change becomes a Grafana
        annotation, posted off the loop (daemon/observability/annotations.py)."""
        c = self.config
        if c.grafana_url is None:
            return
        from ..observability.grafana import credential  # grafana-client only when asked for

        secret = (c.grafana_token, c.grafana_password)
        token, password = (s.get_secret_value() if s else None for s in secret)
        auth = credential(token, c.grafana_user, password, environ={})
        self.annotations = AnnotationPoster.for_grafana(
            c.grafana_url, auth, timeout=c.grafana_timeout, capacity=c.grafana_queue_size
        )
        assert self.plane is not None, "start() made it"
        self.plane.change_listeners.append(self.annotations.on_change)
        log.info("posting LR changes to Grafana at %s as annotations", c.grafana_url)

    def _bind(self, address: str, max_bytes: int) -> zmq.Socket:
        assert self._context is not None
        return bind_router(self._context, address, max_bytes, self.keys, self._monitors)

    def _bind_private(self, address: str) -> zmq.Socket:
        """A shard's control socket: an ipc path in a directory only the
        daemon's user may enter (front.py makes it), which only the front
        connects to; the front has checked the client's key."""
        assert self._context is not None
        return bind_router(self._context, address, MAX_CONTROL_BYTES * HARD_LIMIT_FACTOR, None, [])

    def serve(self) -> None:
        """Run the loop until stop() or a signal."""
        data, control, plane = self._sock, self._control_sock, self.plane
        assert data is not None and control is not None and plane is not None, "start() first"
        poller = zmq.Poller()
        poller.register(data, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        next_tick = next_sweep = time.monotonic()
        # The loop shares the interpreter with the store's writer thread (and
        # /metrics' HTTP thread). CPython hands the GIL to a waiting thread
        # after the switch interval, 5 ms by default: a message that woke the
        # loop while the writer ran Python waited that long. 0.5 ms brought a
        # decision's p50 from 1.5 to 0.75 ms at 1 kHz (bench/latency.py). The
        # host's own setting comes back when the loop ends (a program that
        # runs the daemon in a thread keeps its own once the daemon is gone).
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, SWITCH_INTERVAL))
        self.collector.start(next_sweep)
        try:
            self._serve(data, control, plane, poller, next_tick, next_sweep)
        finally:
            self.collector.stop()
            sys.setswitchinterval(switch_interval)

    def _serve(
        self,
        data: zmq.Socket,
        control: zmq.Socket,
        plane: DataPlane,
        poller: zmq.Poller,
        next_tick: float,
        next_sweep: float,
    ) -> None:
        self.ready.set()
        while not self._stop.is_set():
            ready = dict(poller.poll(POLL_MS))
            if data in ready:
                self._drain_data(time.monotonic())
            if control in ready:
                self._drain_control()
            for monitor in self._monitors:
                if monitor in ready:
                    count_refused(monitor, self.gate)
            if self._reload_keys.is_set() and self.keys is not None:
                self._reload_keys.clear()
                self.keys.reload()
            now = self._loop_at = time.monotonic()
            self._send(plane.due(now))
            if now >= next_tick:
                plane.tick(now)
                next_tick = now + TICK_EVERY
            self._send_acks(plane.persisted())
            if now >= next_sweep:
                plane.sweep(now)
                self.collector.tick(now)
                next_sweep = now + SWEEP_EVERY

    def _drain_data(self, now: float) -> None:
        """Handle what is waiting, before looking at the clock again: at
        most DRAIN_MAX messages, so that clients sending faster than the
        loop handles them cannot keep it from the control plane, the store
        and its persisted acks (what they sent waits in ZeroMQ's bounded
        pipes, and then in theirs, rather than in the daemon's memory).
        Every CONTROL_EVERY messages it answers the control plane, if a
        request waits: an operator's set-lr does not wait for a whole drain
        of a busy daemon (bench/load.py)."""
        sock, plane = self._sock, self.plane
        assert sock is not None and plane is not None, "start() first"
        keys = self.keys
        for i in range(DRAIN_MAX):
            if i and not i % CONTROL_EVERY:
                self._control_if_waiting()
            try:
                if keys is None:
                    identity, *frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                    key = None
                else:
                    identity, frames, key = self._receive_keyed(sock, keys)
            except zmq.Again:
                return
            try:
                replies = plane.handle(identity, frames, now, key=key)
            except Exception:  # a bug must not take every run down with it
                log.exception("internal error handling a message; it was dropped")
                plane.rejected["internal_error"] += 1
                continue
            self._send(replies)

    def _drain_control(self) -> None:
        if self.shard is not None:
            self._drain_forwarded()
            return
        sock = self._control_sock
        assert sock is not None and self.control is not None, "start() first"
        keys = self.keys
        while True:
            try:
                if keys is None:
                    identity, *frames = sock.recv_multipart(zmq.NOBLOCK)
                    key = None
                else:
                    identity, frames, key = self._receive_keyed(sock, keys)
            except zmq.Again:
                return
            # A REQ client puts an empty delimiter frame before its request.
            envelope, raw = frames[:-1], frames[-1] if frames else b""
            answer, outgoing = self._answer(raw, key)
            sock.send_multipart([identity, *envelope, encode_answer(answer)])
            self._send(outgoing)

    def _drain_forwarded(self) -> None:
        """A shard's control requests, as the front forwards them: [request
        id, the client's public key (empty without keys), request]."""
        sock, keys = self._control_sock, self.keys
        assert sock is not None, "start() first"
        while True:
            try:
                identity, *frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                continue  # not the front's: nothing else can reach this socket
            request_id, public, raw = frames
            key = keys.key(public.decode()) if keys is not None and public else None
            answer, outgoing = self._answer(raw, key)
            sock.send_multipart([identity, request_id, encode_answer(answer)])
            self._send(outgoing)

    def _answer(self, raw: bytes, key: Any) -> tuple[Answer | Refusal, list]:
        """The answer to one request; with keys, ``key`` None is a key taken
        out of allowed/ since the client connected (then SIGHUP)."""
        assert self.control is not None, "start() first"
        if self.keys is not None and key is None:
            return refusal("forbidden: this client's key is no longer allowed"), []
        try:
            return self.control.answer(raw, key=key)
        except Exception:
            log.exception("internal error handling a control request")
            return refusal("internal error; see the daemon log"), []

    @staticmethod
    def _receive_keyed(sock: zmq.Socket, keys: KeyRing) -> tuple[bytes, list[bytes], Any]:
        """One message and the allowed key it came with (ZeroMQ names the
        connection by its key: the handshake's User-Id); the key is None if
        it was removed from allowed/ since the connection was made."""
        identity, *parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        name = key_name(parts[-1]) if parts else None
        key = keys.key(name) if name else None
        return identity.bytes, [part.bytes for part in parts], key

    def _send_acks(self, replies: list) -> None:
        """The persisted acks of a commit, one per rank that sent records
        (1,000 at 1,000 ranks, ~10 ms of sends): the control plane is
        answered between slices of them, as within a drain."""
        for start in range(0, len(replies), ACKS_PER_LOOK):
            if start:
                self._control_if_waiting()
            self._send(replies[start : start + ACKS_PER_LOOK])

    def _control_if_waiting(self) -> None:
        """Answer the control plane now if a request waits (a getsockopt: the
        look costs a microsecond, between pieces of a long turn)."""
        control = self._control_sock
        assert control is not None, "start() first"
        if cast(int, control.get(zmq.EVENTS)) & zmq.POLLIN:
            self._drain_control()

    def _send(self, replies: list) -> None:
        assert self._sock is not None and self.plane is not None, "start() first"
        for to, out in replies:
            try:
                self._sock.send_multipart([to, *out], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                # A peer that is gone (a client that closed before its last
                # persisted ack) is not news; one whose pipe is full is.
                if exc.errno != zmq.EHOSTUNREACH:
                    self.plane.rejected["reply_dropped"] += 1

    def liveness(self) -> str | None:
        """None while the loop goes round (it does at least every POLL_MS),
        else why not: what /livez answers, for liveness probes (a restart
        mends a wedged loop)."""
        return loop_stalled(self._loop_at, "daemon")

    def health(self) -> str | None:
        """None when the daemon serves and its store takes writes, else why
        not: what /healthz answers (readiness, alerting). A failing store is
        not a reason to restart: the daemon steers from memory and keeps
        what waits, which a restart would lose."""
        problem = self.liveness()
        if problem is None and self.plane is not None:
            problem = self.plane.store.error
        return problem

    def stop(self) -> None:
        self._stop.set()

    def reload_keys(self) -> None:
        """Read allowed/ again at the loop's next turn (SIGHUP)."""
        self._reload_keys.set()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        close_planes([self._sock, self._control_sock], self._monitors)
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
        self._sock = self._control_sock = None
        if self.annotations is not None:
            self.annotations.close()
            self.annotations = None
        if self.plane is not None:
            self.plane.close()
            self.plane = None
        self._release_state()
        if self._context is not None:
            self._context.term()
            self._context = None

    def _release_state(self) -> None:
        if self._state_lock is not None:
            self._state_lock.release()
            self._state_lock = None

    def run(self) -> None:
        """start, serve until SIGINT/SIGTERM, close: what `lrpilot daemon` does."""
        run_until_signalled(self)

    def serve_in_thread(self) -> threading.Thread:
        """Start and serve in a daemon thread (the store's connection belongs
        to the thread that opens it, so start() runs there too). Raises what
        start() raised."""
        failure: list[BaseException] = []

        def target() -> None:
            try:
                self.start()
            except BaseException as exc:
                failure.append(exc)
                self.ready.set()
                return
            try:
                self.serve()
            finally:
                self.close()

        thread = threading.Thread(target=target, name="lrpilot-daemon", daemon=True)
        thread.start()
        self.ready.wait(30)
        if failure:
            raise failure[0]
        return thread
