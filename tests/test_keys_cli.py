"""`lrpilot keys` as a user runs it: the daemon's key directory it makes, the
client folders it hands out, and what it refuses. The files are read back
the way the daemon (auth.KeyRing) and the clients (lrpilot.keys) read them,
and a key it made is put through a real CURVE handshake."""

from __future__ import annotations

import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq
import zmq.auth
from procs import lrpilot, ok, ok_json, one_line_error

from lrpilot.daemon.service.auth import Gatekeeper, KeyRing, key_name
from lrpilot.keys import load_client_keys

FIRST = [
    {"name": "operator", "role": "operator", "runs": "*"},
    {"name": "trainer", "role": "trainer", "runs": "*"},
]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(where: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and folder under ``where``: its mode and its bytes."""
    return {
        str(p.relative_to(where)): (mode(p), b"" if p.is_dir() else p.read_bytes())
        for p in sorted(where.rglob("*"))
    }


def init(exe: str, where: Path) -> str:
    return ok(lrpilot(exe, "keys", "init", str(where)))


def listed(exe: str, where: Path) -> list[dict]:
    return ok_json(lrpilot(exe, "keys", "list", str(where), "--json"))


def test_init_makes_the_daemons_directory_private_and_refuses_to_run_twice(lrpilot_exe, tmp_path):
    where = tmp_path / "keys"
    said = init(lrpilot_exe, where)
    assert mode(where) == 0o700
    assert mode(where / "daemon.key_secret") == 0o600
    assert (where / "daemon.key").is_file()
    for folder in ("allowed", "clients"):
        assert (where / folder).is_dir() and mode(where / folder) == 0o700
    for name in ("operator", "trainer"):
        client = where / "clients" / name
        assert mode(client) == 0o700
        assert mode(client / "client.key_secret") == 0o600
        assert (client / "client.key").is_file() and (client / "daemon.key").is_file()
        assert (where / "allowed" / f"{name}.key").is_file()
    # What to do next: the daemon's flag and the folder each client gets.
    assert f"--keys {where}" in said
    assert f"{where}/clients/operator/" in said and f"{where}/clients/trainer/" in said
    assert "lrpilot keys add" in said
    assert listed(lrpilot_exe, where) == FIRST

    before = snapshot(where)
    again = lrpilot(lrpilot_exe, "keys", "init", str(where))
    one_line_error(again, "keys", "already holds a daemon's keys", "rotate", "NEWDIR")
    assert snapshot(where) == before, "a second init changed the keys"


def test_init_takes_an_empty_directory_and_refuses_one_with_files(lrpilot_exe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    init(lrpilot_exe, empty)
    assert mode(empty) == 0o700 and (empty / "daemon.key_secret").is_file()
    used = tmp_path / "used"
    (used / "allowed").mkdir(parents=True)
    (used / "allowed" / "old.key").write_text("an old key")
    done = lrpilot(lrpilot_exe, "keys", "init", str(used))
    one_line_error(done, "keys", str(used), "not empty")
    assert sorted(p.name for p in used.rglob("*")) == ["allowed", "old.key"]


def test_add_list_remove_round_trip_as_the_daemon_reads_it(lrpilot_exe, tmp_path):
    where = tmp_path / "keys"
    init(lrpilot_exe, where)
    trainer = ("--role", "trainer", "--runs", "team-a-*")
    said = ok(lrpilot(lrpilot_exe, "keys", "add", str(where), "team-a", *trainer))
    assert "kill -HUP" in said and f"{where}/clients/team-a/" in said
    ok(lrpilot(lrpilot_exe, "keys", "add", str(where), "alice", "--role", "operator"))
    ok(lrpilot(lrpilot_exe, "keys", "add", str(where), "grafana.viewer", "--role", "viewer"))
    client = where / "clients" / "team-a"
    assert mode(client) == 0o700 and mode(client / "client.key_secret") == 0o600
    assert listed(lrpilot_exe, where) == [
        {"name": "alice", "role": "operator", "runs": "*"},
        {"name": "grafana.viewer", "role": "viewer", "runs": None},
        *FIRST[:1],
        {"name": "team-a", "role": "trainer", "runs": "team-a-*"},
        *FIRST[1:],
    ]
    table = ok(lrpilot(lrpilot_exe, "keys", "list", str(where)))
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["NAME", "ROLE", "RUNS"]
    assert ["team-a", "trainer", "team-a-*"] in rows and ["grafana.viewer", "viewer", "-"] in rows

    # The daemon's reading of allowed/: each key with its role and runs.
    ring = KeyRing(where)
    keys = {key.name: key for key in ring.by_public.values()}
    assert {n: (k.role, k.runs) for n, k in keys.items() if n != "operator"} == {
        "alice": ("operator", "*"),
        "grafana.viewer": ("viewer", "*"),
        "team-a": ("trainer", "team-a-*"),
        "trainer": ("trainer", "*"),
    }
    assert keys["team-a"].may_train("team-a-7") and not keys["team-a"].may_train("team-b-1")
    assert keys["team-a"].may_ask("show") and not keys["team-a"].may_ask("set_lr")
    assert keys["alice"].may_ask("set_lr") and keys["alice"].may_train("anything")
    assert not keys["grafana.viewer"].may_train("team-a-7")
    assert not keys["grafana.viewer"].may_ask("pause")
    assert ring.public == zmq.auth.load_certificate(where / "daemon.key")[0]

    said = ok(lrpilot(lrpilot_exe, "keys", "remove", str(where), "team-a"))
    assert "kill -HUP" in said
    assert not client.exists() and not (where / "allowed" / "team-a.key").exists()
    assert "team-a" not in {row["name"] for row in listed(lrpilot_exe, where)}
    ring.reload()
    names = {key.name for key in ring.by_public.values()}
    assert "team-a" not in names and "alice" in names
    again = lrpilot(lrpilot_exe, "keys", "remove", str(where), "team-a")
    one_line_error(again, "keys", "no key named 'team-a'", "alice")
    # A removed name can be given again, with a new key.
    ok(lrpilot(lrpilot_exe, "keys", "add", str(where), "team-a", "--role", "viewer"))


def test_a_client_folder_loads_as_the_clients_read_it_and_names_the_daemon(lrpilot_exe, tmp_path):
    where = tmp_path / "keys"
    init(lrpilot_exe, where)
    daemon_public, _ = zmq.auth.load_certificate(where / "daemon.key")
    _, daemon_secret = zmq.auth.load_certificate(where / "daemon.key_secret")
    assert daemon_secret is not None
    for name in ("operator", "trainer"):
        keys = load_client_keys(where / "clients" / name)
        assert keys.server == daemon_public
        allowed, _ = zmq.auth.load_certificate(where / "allowed" / f"{name}.key")
        assert keys.public == allowed, "allowed/NAME.key is not that client's public key"
        _, none = zmq.auth.load_certificate(where / "allowed" / f"{name}.key")
        assert none is None, "the daemon's copy holds the client's secret key"
    assert b"secret-key" not in (where / "daemon.key").read_bytes()


def test_the_keys_made_pass_a_curve_handshake_and_a_removed_one_does_not(lrpilot_exe, tmp_path):
    """A ROUTER secured with the daemon's KeyRing and Gatekeeper (what the
    daemon uses) takes a client folder `keys add` made, tagged with its key
    public key (its name in the ring), and refuses it once `keys remove` and a reload have run."""
    where = tmp_path / "keys"
    init(lrpilot_exe, where)
    ok(lrpilot(lrpilot_exe, "keys", "add", str(where), "bob", "--role", "viewer"))
    ring = KeyRing(where)
    context = zmq.Context()
    gate = Gatekeeper(context, ring)
    server = context.socket(zmq.ROUTER)
    clients: list[zmq.Socket] = []
    try:
        ring.secure(server)
        server.setsockopt(zmq.RCVTIMEO, 5000)
        address = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"

        def send_as(folder: Path, text: bytes) -> zmq.Socket:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            load_client_keys(folder).apply(sock)
            sock.connect(address)
            sock.send(text)
            clients.append(sock)
            return sock

        given = tmp_path / "bob"  # the copy of its folder bob was given
        shutil.copytree(where / "clients" / "bob", given)
        bob = send_as(given, b"hello")
        _, message = server.recv_multipart(copy=False)
        assert (message.bytes, ring.key(key_name(message)).name) == (b"hello", "bob")
        bob.close()

        ok(lrpilot(lrpilot_exe, "keys", "remove", str(where), "bob"))
        ring.reload()  # what SIGHUP makes the daemon do
        bob = send_as(given, b"again")
        operator = send_as(where / "clients" / "operator", b"operator")
        _, message = server.recv_multipart(copy=False)
        assert (message.bytes, ring.key(key_name(message)).name) == (b"operator", "operator")
        assert server.poll(500) == 0, "a removed key's message got through"
        assert gate.denied["unknown_key"] >= 1
        bob.close()
        operator.close()
    finally:
        for sock in clients:
            sock.close(linger=0)  # a failed assertion must not leave term() waiting
        server.close(linger=0)
        gate.stop()
        context.term()


BAD_INPUT = [
    # (arguments after `lrpilot keys`, with {dir} for the key directory; words of the error)
    (("add", "{dir}", "carol", "--role", "admin"), ["--role 'admin'", "trainer, operator, viewer"]),
    (("add", "{dir}", "bad name", "--role", "viewer"), ["bad key name 'bad name'"]),
    (("add", "{dir}", "nl\n", "--role", "viewer"), ["bad key name 'nl\\x0a'"]),
    (("add", "{dir}", "x" * 65, "--role", "viewer"), ["bad key name", "64"]),
    (("add", "{dir}", "policy", "--role", "operator"), ["bad key name 'policy'", "journal"]),
    (("add", "{dir}", "watcher", "--role", "viewer", "--runs", "r1"), ["--runs", "trainer"]),
    (("add", "{dir}", "boss", "--role", "operator", "--runs", "*"), ["--runs", "trainer"]),
    (("add", "{dir}", "trainer", "--role", "trainer"), ["'trainer' exists already", "remove"]),
    (("add", "{dir}", "t2", "--role", "trainer", "--runs", "a*b"), ["--runs 'a*b'", "end"]),
    (("add", "{dir}", "t3", "--role", "trainer", "--runs", ""), ["--runs ''"]),
    (("add", "{dir}", "t4", "--role", "trainer", "--runs", " r"), ["--runs ' r'"]),
    (("add", "{dir}/clients/trainer", "t5", "--role", "viewer"), ["client's folder"]),
    (("add", "{dir}/nowhere", "t6", "--role", "viewer"), ["no such directory"]),
    (("remove", "{dir}", "nobody"), ["no key named 'nobody'", "operator, trainer"]),
    (("remove", "{dir}", "../daemon"), ["bad key name '../daemon'"]),
    (("list", "{dir}/clients"), ["not a daemon's key directory", "allowed/"]),
]


def test_bad_input_is_refused_in_one_line_and_changes_nothing(lrpilot_exe, tmp_path):
    where = tmp_path / "keys"
    init(lrpilot_exe, where)
    before = snapshot(where)

    def attempt(case):
        args, says = case
        return lrpilot(lrpilot_exe, "keys", *(a.format(dir=where) for a in args)), says

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(attempt, BAD_INPUT))
    for result, says in done:
        one_line_error(result, "keys", *says)
    assert snapshot(where) == before


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("not a certificate\n", "No public key found"),
        ('metadata\ncurve\n    public-key = "{key}"\n', "role must be one of"),
        ('metadata\n    role = admin\ncurve\n    public-key = "{key}"\n', "got 'admin'"),
    ],
    ids=["junk", "no-role", "bad-role"],
)
def test_a_key_file_that_does_not_read_is_an_error_line_in_the_list(
    lrpilot_exe, tmp_path, content, says
):
    where = tmp_path / "keys"
    init(lrpilot_exe, where)
    public, _ = zmq.auth.load_certificate(where / "clients" / "trainer" / "client.key")
    (where / "allowed" / "broken.key").write_text(content.format(key=public.decode()))
    rows = listed(lrpilot_exe, where)
    (broken,) = [row for row in rows if row["name"] == "broken"]
    assert says in broken["error"] and "role" not in broken
    assert [row for row in rows if row["name"] != "broken"] == FIRST
    table = ok(lrpilot(lrpilot_exe, "keys", "list", str(where))).splitlines()
    assert table[0].split() == ["NAME", "ROLE", "RUNS", "ERROR"]
    (line,) = [line for line in table if line.startswith("broken ")]
    assert says in line
    # The daemon leaves the file out and keeps the others.
    ring = KeyRing(where)
    names = {key.name for key in ring.by_public.values()}
    assert "broken" not in names and "operator" in names
