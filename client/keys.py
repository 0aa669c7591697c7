"""A client's CURVE keys: how a training process or an operator's command
proves who it is to the daemon, and knows the daemon is the real one.

A client's key directory (``lrpilot keys init`` makes one per client under
the daemon's ``clients/``) holds two ZeroMQ certificate files:

- ``client.key_secret``: this client's key pair (keep it private);
- ``daemon.key``: the daemon's public key.

Where a client finds it: the ``keys=`` argument of ``lrpilot.attach`` (or the
``--keys`` flag of the command line), else ``$LRPILOT_KEYS``, else the default
key directory (``$XDG_CONFIG_HOME/lrpilot/keys``, else ``~/.config/lrpilot/keys``)
when it exists. With none of them the client speaks without keys, which a
daemon with keys refuses in ZeroMQ's handshake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from .errors import UsageError

KEYS_ENV = "LRPILOT_KEYS"
CLIENT_SECRET = "client.key_secret"
DAEMON_PUBLIC = "daemon.key"
DAEMON_SECRET = "daemon.key_secret"  # in the daemon's key directory, never a client's


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the daemon's public key, z85-encoded."""

    public: bytes
    secret: bytes
    server: bytes
    where: Path

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before connect) a CURVE client of the daemon."""
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)


def default_keys_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lrpilot" / "keys"


def find_client_keys(given: str | os.PathLike[str] | None = None) -> ClientKeys | None:
    """The client keys from ``given``, else ``$LRPILOT_KEYS``, else the default
    key directory when it exists; None when there are none to use. A
    directory named but unusable is a UsageError naming what is missing."""
    named = given if given is not None else os.environ.get(KEYS_ENV) or None
    if named is None:
        default = default_keys_dir()
        if not (default / CLIENT_SECRET).exists():
            return None
        named = default
    return load_client_keys(Path(named))


def load_client_keys(where: Path) -> ClientKeys:
    secret_file, server_file = where / CLIENT_SECRET, where / DAEMON_PUBLIC
    if not where.is_dir():
        raise UsageError(f"lrpilot keys: {where} is not a directory (a client's key directory)")
    if not secret_file.exists():
        hint = (
            " (this is the daemon's key directory: give a client's, under its clients/)"
            if (where / DAEMON_SECRET).exists()
            else " (`lrpilot keys init` makes one per client)"
        )
        raise UsageError(f"lrpilot keys: no {CLIENT_SECRET} in {where}{hint}")
    if not server_file.exists():
        raise UsageError(f"lrpilot keys: no {DAEMON_PUBLIC} (the daemon's public key) in {where}")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
        server, _ = zmq.auth.load_certificate(server_file)
    except (OSError, ValueError) as exc:
        raise UsageError(f"lrpilot keys: cannot read the keys in {where}: {exc}") from None
    if secret is None or len(public) != 40 or len(secret) != 40 or len(server) != 40:
        raise UsageError(f"lrpilot keys: {where} does not hold a CURVE key pair and a public key")
    return ClientKeys(public, secret, server, where)
