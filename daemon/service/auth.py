"""Who may talk to the daemon, and what each may do.

Keys are ZeroMQ CURVE keys (``zmq.auth``): the handshake itself proves that
a client holds the secret key of a public key the daemon allows, and
encrypts what follows. A connection with no key, or a key not allowed, never
gets a message through: ZeroMQ refuses it before the daemon sees a byte.

The daemon's key directory (``lrpilot keys init DIR``)::

    DIR/daemon.key_secret        the daemon's key pair (only the daemon reads it)
    DIR/daemon.key               its public key (every client has a copy)
    DIR/allowed/NAME.key         a client's public key, with its role and runs
    DIR/clients/NAME/            what that client needs: client.key_secret, daemon.key

Each allowed key has a name (its file's), a role and, for a trainer, the runs
it may speak for. Roles:

- ``trainer``: the data plane, for its runs only (a run id, or a prefix
  ending in ``*``; ``*`` is every run); on the control plane, the reads;
- ``operator``: everything: any run on the data plane, and the changes
  (set-lr, policy, range-test, pause, resume) on the control plane;
- ``viewer``: the control plane's reads (runs, show, history, top) only.

``allowed/`` is read again on SIGHUP: a key added or removed there takes
effect for new connections (a connection already made keeps its key's name;
its role is looked up again at every message).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from lrpilot.errors import LRPilotError
from lrpilot.keys import DAEMON_SECRET  # the file names, on both sides

log = logging.getLogger("lrpilot.daemon")

ROLES = ("trainer", "operator", "viewer")
ALLOWED = "allowed"
CLIENTS = "clients"
# A key's name is its file's stem: what the journal shows as the actor.
# (Use with fullmatch: "$" would let a trailing newline through.)
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Actors the daemon writes itself: a key may not pass for them in the journal.
RESERVED_NAMES = frozenset({"daemon", "policy"})
# A trainer's runs: "*", a run id, or a prefix ending in "*" (printable, no
# other "*": a "*" inside would read as a wildcard and match literally).
RUNS_RULE = re.compile(r"[^\x00-\x1f\x7f-\x9f*]{0,199}\*?")
# Control requests each role may make (the data plane is checked per run).
READS = frozenset({"runs", "show", "history", "store"})
CHANGES = frozenset({"set_lr", "policy", "range_test", "pause", "resume"})


class KeysError(LRPilotError, ValueError):
    """A key directory the daemon cannot use; the message is one line."""


@dataclass(frozen=True)
class Key:
    name: str
    role: str
    runs: str = "*"  # a trainer's runs: "*", a run id, or a prefix ending in "*"
    public: bytes = b""  # z85: what a connection proved it holds

    def may_train(self, run: str) -> bool:
        """May speak for ``run`` on the data plane."""
        if self.role == "operator":
            return True
        if self.role != "trainer":
            return False
        if self.runs.endswith("*"):
            return run.startswith(self.runs[:-1])
        return run == self.runs

    def may_ask(self, op: str) -> bool:
        """May make control request ``op``."""
        return op in READS or (op in CHANGES and self.role == "operator")


def data_refusal(key: Key | None, run: str | None) -> str | None:
    """Why a data-plane connection with ``key`` (None: taken out of allowed/
    since it connected) may not speak for ``run``, in one line; None when it
    may. One daemon and a sharded daemon's front say it in the same words."""
    if key is None:
        return "this connection's key is no longer allowed"
    if run is not None and not key.may_train(run):
        return f"key {key.name!r} ({key.role}, runs {key.runs!r}) may not speak for run {run!r}"
    return None


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata`` section of a ZeroMQ certificate file (name = value
    lines, values optionally quoted), which load_certificate leaves out."""
    found: dict[str, str] = {}
    section = ""
    for line in path.read_text(encoding="utf8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith((" ", "\t")):
            section = line.strip()
            continue
        if section == "metadata" and "=" in line:
            name, _, value = line.partition("=")
            found[name.strip()] = value.strip().strip('"')
    return found


def key_of(path: Path) -> tuple[bytes, Key]:
    """An allowed key file: (its z85 public key, the Key). KeysError for a
    name, role or runs the daemon must not take: a key file fails closed."""
    name = path.stem
    if not KEY_NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise KeysError(
            f"{path}: a key's name must be letters, digits, '.', '_' or '-' (up to 64), "
            f"and not {' or '.join(sorted(RESERVED_NAMES))}"
        )
    public, _ = zmq.auth.load_certificate(path)
    meta = read_metadata(path)
    role, runs = meta.get("role", ""), meta.get("runs", "")
    if role not in ROLES:
        raise KeysError(f"{path}: role must be one of {', '.join(ROLES)}, got {role!r}")
    if role == "trainer" and not (runs and RUNS_RULE.fullmatch(runs)):
        raise KeysError(
            f"{path}: a trainer key needs runs: a run id, a prefix ending in '*', or '*'; "
            f"got {runs!r}"
        )
    return public, Key(name, role, runs if role == "trainer" else "*", public)


class KeyRing:
    """The daemon's keys: its own pair and the allowed public keys by name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        secret = directory / DAEMON_SECRET
        if not secret.exists():
            raise KeysError(
                f"--keys {directory}: no {DAEMON_SECRET} there (`lrpilot keys init {directory}` "
                "makes the daemon's keys and a key for each client)"
            )
        try:
            public, secret_key = zmq.auth.load_certificate(secret)
        except (OSError, ValueError) as exc:
            raise KeysError(f"--keys {directory}: cannot read {DAEMON_SECRET}: {exc}") from None
        if secret_key is None:
            raise KeysError(f"--keys {directory}: {DAEMON_SECRET} holds no secret key")
        self.public, self.secret = public, secret_key
        self._lock = threading.Lock()
        self.by_public: dict[bytes, Key] = {}
        self.reload()

    def reload(self) -> None:
        """Read allowed/ again (at start and on SIGHUP). A file that does not
        read is left out and logged; the others stay allowed."""
        by_public: dict[bytes, Key] = {}
        allowed = self.directory / ALLOWED
        if not allowed.is_dir():
            log.warning("keys: no %s: no client can connect until it has keys", allowed)
        for path in sorted(allowed.glob("*.key")):
            try:
                public, key = key_of(path)
            except (OSError, ValueError) as exc:
                log.error("keys: %s is left out: %s", path, exc)
                continue
            if public in by_public:
                log.error(
                    "keys: %s holds the same public key as %s.key; it is left out",
                    path,
                    by_public[public].name,
                )
                continue
            by_public[public] = key
        with self._lock:
            self.by_public = by_public
        log.info("keys: %d allowed client keys from %s", len(by_public), self.directory / ALLOWED)

    def key(self, public: str) -> Key | None:
        """The allowed key with that (z85) public key now: None when it was
        removed since it connected. By public key, not name: a key removed
        and another added under its name must not hand the old one's open
        connections the new one's rights."""
        with self._lock:
            return self.by_public.get(public.encode())

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before bind) a CURVE server with the daemon's keys."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


class Gatekeeper:
    """ZeroMQ's ZAP handler for the daemon's context: allows the keys of the
    ring (each connection's messages then carry its public key as User-Id),
    and counts the handshakes it refuses (logged once per key)."""

    def __init__(self, context: zmq.Context, ring: KeyRing) -> None:
        self.ring = ring
        self.denied: Counter[str] = Counter()  # refused handshakes, by reason
        self._logged: set[bytes] = set()
        gate = self

        class Provider:
            def callback(self, domain: str, key: bytes) -> bool:
                return gate.allows(key)

        # ZeroMQ's User-Id of each message is then the client's z85 public
        # key (pyzmq's default), which the server looks up at every message.
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=Provider())

    def refused_handshake(self, endpoint: bytes) -> None:
        """A handshake a plane refused before ZAP: no key (a keyless client),
        or a client holding another daemon's public key (it cannot complete
        the handshake); logged once per endpoint the daemon bound."""
        self.denied["no_key"] += 1
        if endpoint not in self._logged:
            self._logged.add(endpoint)
            log.warning(
                "keys: refused a connection on %s whose handshake failed: it offered no key (a "
                "client without --keys / $LRPILOT_KEYS?) or keys made for another daemon",
                endpoint.decode(errors="replace"),
            )

    def allows(self, public: bytes) -> bool:
        if public in self.ring.by_public:
            return True
        self.denied["unknown_key"] += 1
        if public not in self._logged and len(self._logged) < 10_000:
            self._logged.add(public)
            log.warning(
                "keys: refused a connection with a key not in allowed/: %s", public.decode()
            )
        return False

    def stop(self) -> None:
        self._auth.stop()


def key_name(frame: Any) -> str | None:
    """The User-Id ZeroMQ attached to a received message: the client's z85
    public key (None: no keys)."""
    try:
        return frame.get("User-Id") or None
    except (zmq.ZMQError, AttributeError):
        return None
