"""`lrpilot keys`: make and manage the CURVE keys of a daemon and its clients.

The daemon's key directory is laid out as daemon/service/auth.py describes
it, and each folder under its ``clients/`` is a client's key directory as
``lrpilot.keys`` reads it. Everything written here is made with a umask of
077: zmq.auth.create_certificates opens its files with the process's umask,
so a secret key would otherwise be readable by every user until a chmod.

A key is allowed by the daemon when its public certificate is in
``allowed/``; that file is written last when a key is added and removed
first when it is removed, so an interrupted command never leaves a key
allowed whose client folder was not made (or was already deleted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from lrpilot.keys import CLIENT_SECRET, DAEMON_PUBLIC, DAEMON_SECRET

from ..service.auth import ALLOWED, CLIENTS, KEY_NAME, ROLES, key_of
from .control_client import printable
from .main import CommandError

# Actors the daemon itself writes in the journal: a key of that name would
# make an operator's change look like the policy's or the daemon's own.
RESERVED_NAMES = frozenset({"daemon", "policy"})
MAX_RUNS = 200  # characters: a run id's bound (lrpilot.protocol.MAX_NAME)
# The certificate files create_certificates makes in a client's folder.
CLIENT_CERT = CLIENT_SECRET.removesuffix("_secret")
# The two clients `init` makes, so that a daemon is usable at once.
FIRST_CLIENTS = (("operator", "operator", None), ("trainer", "trainer", "*"))
SIGHUP_HINT = (
    "a running daemon takes it when it reads allowed/ again: kill -HUP <its pid> (or restart it)"
)


def cmd_keys(args: argparse.Namespace) -> None:
    if args.action in ("init", "add") and not zmq.has("curve"):
        # A libzmq built without libsodium/tweetnacl cannot make keys (nor use them).
        raise CommandError(f"this libzmq ({zmq.zmq_version()}) has no CURVE support")
    actions = {"init": cmd_init, "add": cmd_add, "remove": cmd_remove, "list": cmd_list}
    actions[args.action](args)


# --- what a name, a role and runs may be -------------------------------------


def check_name(name: str) -> str:
    # fullmatch: KEY_NAME ends in `$`, which also matches before a trailing newline.
    if not KEY_NAME.fullmatch(name):
        raise CommandError(
            f"bad key name '{printable(name)}': 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (the journal shows it as the actor)"
        )
    if name in RESERVED_NAMES:
        raise CommandError(
            f"bad key name {name!r}: the journal already uses it for the daemon's own changes "
            f"({', '.join(sorted(RESERVED_NAMES))}); pick another"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise CommandError(
            f"--role '{printable(role)}': must be one of {', '.join(ROLES)} "
            "(trainer: its runs' data; operator: everything; viewer: reads only)"
        )
    return role


def check_runs(runs: str) -> str:
    """What a trainer may speak for: ``*``, a run id, or a prefix ending in
    ``*``. It is stored as a certificate's metadata value, whose reader strips
    spaces and quotes at either end and stops at the line's end: a value it
    would read back differently is refused rather than silently changed."""
    problem = ""
    if not runs or len(runs) > MAX_RUNS:
        problem = f"1 to {MAX_RUNS} characters"
    elif not runs.isprintable() or runs != runs.strip() or '"' in runs:
        problem = "printable, without quotes or spaces at either end"
    elif "*" in runs[:-1]:
        problem = "'*' only at the end (a prefix), or '*' alone (every run)"
    if problem:
        raise CommandError(f"--runs '{printable(runs)}': {problem}")
    return runs


# --- the files -----------------------------------------------------------------


@contextmanager
def private_files() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def write_allowed(path: Path, public: bytes, metadata: dict[str, str]) -> None:
    """The daemon's copy of a client's public key, with its role (and runs) in
    the certificate's metadata section, which auth.key_of reads back.
    create_certificates writes metadata into the secret file only, so this
    file is written here, in the same format."""
    lines = [
        f"#   ****  Generated on {datetime.now()} by lrpilot keys  ****",
        "#   ZeroMQ CURVE Public Certificate: a client the lrpilot daemon allows.",
        "#   Its name (this file's) is the actor the journal shows.",
        "",
        "metadata",
        *(f"    {name} = {value}" for name, value in metadata.items()),
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
        "",
    ]
    # Written aside, then linked into place: the daemon may read allowed/ at any
    # moment (SIGHUP), and link, unlike rename, refuses to replace a key of the
    # same name that appeared meanwhile.
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    partial.write_text("\n".join(lines), encoding="utf8")
    try:
        os.link(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def daemon_dir(where: Path) -> Path:
    """``where``, checked to be a daemon's key directory that clients can be
    added to."""
    if not where.is_dir():
        raise CommandError(f"{where}: no such directory (`lrpilot keys init {where}` makes one)")
    missing = [
        f"{name}/" if folder else name
        for name, folder in ((DAEMON_SECRET, False), (DAEMON_PUBLIC, False), (ALLOWED, True))
        if not ((where / name).is_dir() if folder else (where / name).is_file())
    ]
    if missing:
        hint = (
            " (this is a client's folder: give the daemon's key directory)"
            if (where / CLIENT_SECRET).exists()
            else " (`lrpilot keys init DIR` makes one)"
        )
        raise CommandError(
            f"{where} is not a daemon's key directory: no {', '.join(missing)}{hint}"
        )
    return where


def make_client(where: Path, name: str, role: str, runs: str | None) -> None:
    """clients/NAME/ (the client's key pair and the daemon's public key), then
    allowed/NAME.key."""
    allowed, folder = where / ALLOWED / f"{name}.key", where / CLIENTS / name
    if allowed.exists() or folder.exists():
        raise CommandError(
            f"a key named {name!r} exists already in {where}; `lrpilot keys remove {where} "
            f"{name}` first to replace it"
        )
    metadata = {"role": role} if runs is None else {"role": role, "runs": runs}
    (where / CLIENTS).mkdir(exist_ok=True)
    # Made aside and renamed into place: no half-made folder under its name.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=where / CLIENTS))
    try:
        zmq.auth.create_certificates(staging, "client", metadata)
        (staging / CLIENT_SECRET).chmod(0o600)
        shutil.copyfile(where / DAEMON_PUBLIC, staging / DAEMON_PUBLIC)
        public, _ = zmq.auth.load_certificate(staging / CLIENT_CERT)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        write_allowed(allowed, public, metadata)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def cannot_write(where: Path, exc: OSError) -> CommandError:
    what = exc.strerror or str(exc)
    return CommandError(
        f"cannot write the keys in {where}: {what}" + (f" ({exc.filename})" if exc.filename else "")
    )


# --- the commands ----------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    where: Path = args.dir
    if (where / DAEMON_SECRET).exists():
        raise CommandError(
            f"{where} already holds a daemon's keys ({DAEMON_SECRET}); nothing changed. To "
            "rotate them: `lrpilot keys init NEWDIR`, give every client its new folder, and "
            "restart the daemon with --keys NEWDIR (docs/security.md)"
        )
    if where.exists() and not where.is_dir():
        raise CommandError(f"{where} exists and is not a directory")
    if where.is_dir() and any(where.iterdir()):
        # Keys left in an allowed/ here would stay allowed under the new daemon key.
        raise CommandError(f"{where} is not empty: give a new or an empty directory")
    made = not where.exists()
    try:
        with private_files():
            where.mkdir(parents=True, exist_ok=True)
            where.chmod(0o700)
            zmq.auth.create_certificates(where, "daemon")
            (where / DAEMON_SECRET).chmod(0o600)
            (where / ALLOWED).mkdir()
            (where / CLIENTS).mkdir()
            for name, role, runs in FIRST_CLIENTS:
                make_client(where, name, role, runs)
    except BaseException as exc:
        # Everything in it is ours (it was new or empty): leave nothing half-made.
        if made:
            shutil.rmtree(where, ignore_errors=True)
        elif where.is_dir():
            for child in where.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise cannot_write(where, exc) from None
        raise
    operator, trainer = where / CLIENTS / "operator", where / CLIENTS / "trainer"
    made_files = aligned(
        [
            (where / DAEMON_SECRET, "the daemon's key pair: only the daemon reads it"),
            (where / DAEMON_PUBLIC, "its public key (every client has a copy)"),
            (f"{where / ALLOWED}/", "the client keys the daemon allows, with their roles"),
            (f"{operator}/", "a client: role operator"),
            (f"{trainer}/", "a client: role trainer, for every run"),
        ]
    )
    folders = aligned(
        [
            (
                f"{operator}/",
                "to operators: lrpilot runs --keys FOLDER, LRPILOT_KEYS=FOLDER, "
                "or copy it to ~/.config/lrpilot/keys",
            ),
            (
                f"{trainer}/",
                "to trainings: lrpilot.attach(..., keys=FOLDER) or LRPILOT_KEYS=FOLDER",
            ),
        ],
        indent="     ",
    )
    print(
        f"made the daemon's key directory {where} (only its owner can read it):",
        *made_files,
        "next:",
        f"  1. start the daemon with --keys {where} (or $LRPILOT_DAEMON_KEYS); it reads "
        f"{DAEMON_SECRET} and {ALLOWED}/ only",
        f"  2. give each client its own folder from {CLIENTS}/, and nothing else:",
        *folders,
        f"  3. more clients: lrpilot keys add {where} NAME --role {'|'.join(ROLES)} [--runs RUNS]",
        sep="\n",
    )


def aligned(rows: Sequence[tuple[object, str]], indent: str = "  ") -> list[str]:
    width = max(len(str(path)) for path, _ in rows)
    return [f"{indent}{str(path).ljust(width)}  {text}" for path, text in rows]


def cmd_add(args: argparse.Namespace) -> None:
    name, role = check_name(args.name), check_role(args.role)
    if args.runs is not None and role != "trainer":
        raise CommandError(
            f"--runs is for a trainer's key only (an operator may speak for every run, a "
            f"viewer for none), got --role {role}"
        )
    runs = check_runs("*" if args.runs is None else args.runs) if role == "trainer" else None
    where = daemon_dir(args.dir)
    try:
        with private_files():
            make_client(where, name, role, runs)
    except OSError as exc:
        raise cannot_write(where, exc) from None
    scope = "" if runs is None else f", runs {'every run' if runs == '*' else repr(runs)}"
    print(
        f"added {name!r} (role {role}{scope}):",
        *aligned(
            [
                (where / ALLOWED / f"{name}.key", "its public key and role: the daemon allows it"),
                (
                    f"{where / CLIENTS / name}/",
                    "give this folder to that client, and no one else (keys=, --keys or "
                    "LRPILOT_KEYS)",
                ),
            ]
        ),
        SIGHUP_HINT,
        sep="\n",
    )


def cmd_remove(args: argparse.Namespace) -> None:
    name = args.name
    if not KEY_NAME.fullmatch(name):
        raise CommandError(f"bad key name '{printable(name)}': no key can have that name")
    where = daemon_dir(args.dir)
    allowed, folder = where / ALLOWED / f"{name}.key", where / CLIENTS / name
    if not allowed.exists() and not folder.exists():
        names = sorted(p.stem for p in (where / ALLOWED).glob("*.key"))
        raise CommandError(
            f"no key named {name!r} in {where} (keys: {printable(', '.join(names) or 'none')})"
        )
    try:
        allowed.unlink(missing_ok=True)  # first: this is what the daemon allows
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink(missing_ok=True)
    except OSError as exc:
        raise cannot_write(where, exc) from None
    print(
        f"removed {name!r}: {allowed} and {folder}/\n"
        + SIGHUP_HINT.replace("takes it", "refuses it")
    )


def runs_of(role: str, runs: str) -> str | None:
    """The runs a key may speak for on the data plane (None: none)."""
    return {"trainer": runs, "operator": "*"}.get(role)


def listing(where: Path) -> list[dict[str, Any]]:
    """Each file in allowed/ as the daemon reads it: name, role and runs, or
    the error for which the daemon leaves it out."""
    rows: list[dict[str, Any]] = []
    seen: dict[bytes, str] = {}
    for path in sorted((where / ALLOWED).glob("*.key")):
        try:
            public, key = key_of(path)
        except (OSError, ValueError) as exc:
            rows.append({"name": path.stem, "error": str(exc)})
            continue
        row: dict[str, Any] = {
            "name": key.name,
            "role": key.role,
            "runs": runs_of(key.role, key.runs),
        }
        if public in seen:
            # The daemon maps each public key to one name: the last one read.
            row["error"] = (
                f"the same public key as {seen[public]!r}: the daemon keeps one of the two names"
            )
        seen[public] = key.name
        rows.append(row)
    return rows


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(headers), *([printable(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def cmd_list(args: argparse.Namespace) -> None:
    where: Path = args.dir
    if not (where / ALLOWED).is_dir():
        raise CommandError(
            f"{where} is not a daemon's key directory: no {ALLOWED}/ "
            "(`lrpilot keys init DIR` makes one)"
        )
    rows = listing(where)
    if args.json:
        print(json.dumps(rows))
        return
    if not rows:
        print(f"no keys in {where / ALLOWED}: the daemon allows no client")
        return
    cells = [
        (r["name"], r.get("role", "-"), r.get("runs") or "-", r.get("error", "")) for r in rows
    ]
    headers = (
        ("NAME", "ROLE", "RUNS", "ERROR") if any(c[3] for c in cells) else ("NAME", "ROLE", "RUNS")
    )
    print(table(headers, [c[: len(headers)] for c in cells]))
