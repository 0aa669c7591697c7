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
  (set-lr, policy, pause, resume) on the control plane;
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

log = logging.getLogger("lrpilot.daemon")

ROLES = ("trainer", "operator", "viewer")
DAEMON_SECRET = "daemon.key_secret"
DAEMON_PUBLIC = "daemon.key"
ALLOWED = "allowed"
CLIENTS = "clients"
# A key's name is its file's stem: what the journal shows as the actor.
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Control requests each role may make (the data plane is checked per run).
READS = frozenset({"runs", "show", "history", "store"})
CHANGES = frozenset({"set_lr", "policy", "pause", "resume"})


class KeysError(LRPilotError, ValueError):
    """A key directory the daemon cannot use; the message is one line."""


@dataclass(frozen=True)
class Key:
    name: str
    role: str
    runs: str = "*"  # a trainer's runs: "*", a run id, or a prefix ending in "*"

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
    """An allowed key file: (its z85 public key, the Key)."""
    public, _ = zmq.auth.load_certificate(path)
    meta = read_metadata(path)
    role, runs = meta.get("role", ""), meta.get("runs", "*") or "*"
    if role not in ROLES:
        raise KeysError(f"{path}: role must be one of {', '.join(ROLES)}, got {role!r}")
    return public, Key(path.stem, role, runs)


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
        self.by_name: dict[str, Key] = {}
        self.reload()

    def reload(self) -> None:
        """Read allowed/ again (at start and on SIGHUP). A file that does not
        read is left out and logged; the others stay allowed."""
        by_public: dict[bytes, Key] = {}
        for path in sorted((self.directory / ALLOWED).glob("*.key")):
            try:
                public, key = key_of(path)
            except (OSError, ValueError) as exc:
                log.error("keys: %s is left out: %s", path, exc)
                continue
            by_public[public] = key
        with self._lock:
            self.by_public = by_public
            self.by_name = {key.name: key for key in by_public.values()}
        log.info("keys: %d allowed client keys from %s", len(by_public), self.directory / ALLOWED)

    def key(self, name: str) -> Key | None:
        """The allowed key of that name now (None: removed since it connected)."""
        with self._lock:
            return self.by_name.get(name)

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before bind) a CURVE server with the daemon's keys."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


class Gatekeeper:
    """ZeroMQ's ZAP handler for the daemon's context: allows the keys of the
    ring, names each connection by its key (the messages' User-Id), and
    counts the handshakes it refuses (logged once per key)."""

    def __init__(self, context: zmq.Context, ring: KeyRing) -> None:
        self.ring = ring
        self.denied: Counter[str] = Counter()  # refused handshakes, by reason
        self._logged: set[bytes] = set()
        gate = self

        class Authenticator(ThreadAuthenticator):
            def curve_user_id(self, client_public_key: bytes) -> str:
                from zmq.utils import z85

                key = ring.by_public.get(z85.encode(client_public_key))
                return key.name if key is not None else ""

        class Provider:
            def callback(self, domain: str, key: bytes) -> bool:
                return gate.allows(key)

        self._auth = Authenticator(context)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=Provider())

    def refused_handshake(self, endpoint: bytes) -> None:
        """A handshake a plane refused before ZAP: no key (a keyless client)
        or a broken one; logged once per endpoint the daemon bound."""
        self.denied["no_key"] += 1
        if endpoint not in self._logged:
            self._logged.add(endpoint)
            log.warning(
                "keys: refused a connection on %s that offered no key (a client without "
                "--keys / $LRPILOT_KEYS?)",
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
    """The key name ZeroMQ attached to a received message (None: no keys)."""
    try:
        return frame.get("User-Id") or None
    except (zmq.ZMQError, AttributeError):
        return None
