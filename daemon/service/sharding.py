"""Which shard serves a run, where each shard listens, and the state
directory's record of how many shards it holds.

With ``--shards N`` the daemon is N worker processes, each a whole daemon
for the runs that hash to it (its own loop, store and core), behind one front
process that owns the public addresses (daemon/service/front.py). A run's
shard is a hash of its id: every process computes it the same way and no
table has to be kept or shared. A rank says hello to the front and is told
where its run's shard listens (the data plane's ``moved`` answer), then
talks to that shard directly, so the data plane never goes through the front.

The count is fixed for a state directory: a run's history is in the store of
the shard it hashed to, so another count would look for it in the wrong one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lrpilot.errors import UsageError

from .schema import DB_NAME

MAX_SHARDS = 64  # more than the cores of any machine the daemon runs on
MANIFEST = "shards.json"
# The shards' data ports follow the public one at this distance by default
# (7311 -> 8311, 8312, ...): far from the control (7313) and metrics (9317)
# defaults, so that neither is taken by a shard of a small count.
SHARD_PORT_OFFSET = 1000


def shard_of(run_id: str, count: int) -> int:
    """The shard that serves ``run_id``: stable across processes, restarts and
    Python versions (``hash()`` is salted per process)."""
    if count <= 1:
        return 0
    digest = hashlib.blake2b(run_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def shard_state_dir(state_dir: Path, index: int) -> Path:
    return state_dir / f"shard-{index}"


def shard_data_address(public: str, index: int, base_port: int | None) -> str:
    """Where shard ``index`` binds its data plane, from the public address:
    the same host at ``base_port + index`` (tcp), or the same path with a
    suffix (ipc)."""
    scheme, _, rest = public.partition("://")
    if scheme == "ipc":
        return f"ipc://{rest}-shard-{index}"
    if scheme != "tcp":
        raise UsageError(f"--shards needs a tcp:// or ipc:// --address, not {public!r}")
    host, _, port = rest.rpartition(":")
    if base_port is None:
        if not (port.isascii() and port.isdigit()) or int(port) == 0:
            raise UsageError(
                f"--shards with --address {public!r}: give --shard-base-port (the shards' data "
                "ports are the address's port + 1000 by default)"
            )
        base_port = int(port) + SHARD_PORT_OFFSET
    return f"tcp://{host}:{base_port + index}"


def check_shard_ports(public: str, count: int, base_port: int | None) -> None:
    """Refuse a layout the shards cannot bind: an address of another kind, a
    last shard port past 65535."""
    if count <= 1:
        return
    last = shard_data_address(public, count - 1, base_port)
    if last.startswith("tcp://") and int(last.rpartition(":")[2]) > 65535:
        raise UsageError(f"--shards {count}: shard port {last.rpartition(':')[2]} is past 65535")


@dataclass(frozen=True)
class ShardPlan:
    """What one shard process is told: which shard it is, where every shard's
    data plane listens (to send a rank of another shard's run there), and the
    private address the front forwards control requests to."""

    index: int
    count: int
    data_addresses: tuple[str, ...]
    control_address: str

    def elsewhere(self, run_id: str) -> str | None:
        """The address of the shard that serves ``run_id``, or None for this one."""
        home = shard_of(run_id, self.count)
        return None if home == self.index else self.data_addresses[home]


def check_manifest(state_dir: Path, count: int) -> None:
    """Refuse a shard count other than the one ``state_dir`` was written with
    (one line, with what to do); record it on the first sharded start."""
    path = state_dir / MANIFEST
    try:
        recorded = int(json.loads(path.read_text())["shards"])
    except FileNotFoundError:
        recorded = 1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"{path}: unreadable ({exc}); it says how many shards hold the runs"
        ) from None
    if recorded == 1 and count > 1 and (state_dir / DB_NAME).exists():
        raise UsageError(
            f"--shards {count}: {state_dir} holds the store of an unsharded daemon; its runs "
            "would not be found by their shards (start without --shards, or with a new "
            "--state-dir)"
        )
    if recorded != count:
        if recorded > 1:
            raise UsageError(
                f"--shards {count}: {state_dir} holds {recorded} shards (runs are in the store "
                f"of the shard they hash to); start with --shards {recorded}, or a new "
                "--state-dir"
            )
        state_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"shards": count}) + "\n")
        os.replace(temporary, path)


def store_dir_of(state_dir: Path, run_id: str) -> Path:
    """The directory whose store holds ``run_id``: the state directory, or
    its shard's when the daemon there runs shards."""
    try:
        count = int(json.loads((state_dir / MANIFEST).read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return state_dir
    return shard_state_dir(state_dir, shard_of(run_id, count)) if count > 1 else state_dir
