"""A run across "nodes", with keys, through a non-loopback address: two
torchrun agents (``--nnodes 2``, two ranks each, c10d rendezvous on this
host) start four ranks of tests/live/train_ddp.py, which reach a daemon bound
only to this machine's network address with --keys, each with the trainer
key; an operator steers the run with the operator key, over the same
address. Every rank applies every change at the same step, the parameters
are bit-identical at the end, and the policy decided on the mean of the four
ranks' validation losses (docs/distributed.md)."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

from procs import (
    DIGITS_PLATEAU,
    DaemonProcess,
    ddp_ranks_agree,
    free_port,
    lrpilot,
    mean_val_losses,
    ok,
    ok_json,
    read_jsonl,
    start_train_ddp,
    stored_val_losses,
    wait_for,
)

NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE
HOLD_LR = 0.003


def network_address() -> str:
    """An IPv4 address of this machine that is not loopback: the one its
    default route leaves by (a UDP connect sends nothing), else one its host
    name resolves to."""
    import socket

    found: set[str] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, suppress(OSError):
        probe.connect(("198.51.100.1", 9))  # TEST-NET-2: routed, never sent to
        found.add(probe.getsockname()[0])
    with suppress(OSError):
        names = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        found |= {info[4][0] for info in names}
    usable = sorted(a for a in found if not a.startswith(("127.", "0.")))
    assert usable, f"this test needs a network address besides loopback; found {sorted(found)}"
    return usable[0]


def torchrun_node(
    where: Path, config: dict, node: int, rendezvous: str, run: str, keys: Path, daemon: str
):
    torchrun = [
        *("--nnodes", str(NODES), "--nproc-per-node", str(PER_NODE)),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous, "--rdzv-id", run),
        # One agent hosts the rendezvous store: both would match this host.
        *("--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}"),
    ]
    env = {"LRPILOT_DAEMON": daemon, "LRPILOT_KEYS": str(keys / "clients" / "trainer")}
    return start_train_ddp(where, config, torchrun, env, out=f"node{node}")


def test_four_ranks_on_two_nodes_reach_a_keyed_daemon_off_loopback(
    lrpilot_exe, digits, tmp_path, processes, monkeypatch
):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no stray default key
    monkeypatch.delenv("LRPILOT_KEYS", raising=False)
    keys = tmp_path / "keys"
    ok(lrpilot(lrpilot_exe, "keys", "init", str(keys)))
    host = network_address()
    daemon = DaemonProcess(
        lrpilot_exe,
        tmp_path / "state",
        tmp_path / "daemon.log",
        "--keys",
        str(keys),
        address=f"tcp://{host}:{free_port()}",
        control=f"tcp://{host}:{free_port()}",
    )
    processes.append(daemon)
    daemon.wait_ready()
    operator = ("--control", daemon.control, "--keys", str(keys / "clients" / "operator"))

    def as_operator(*args: str):
        return ok_json(lrpilot(lrpilot_exe, *args, *operator, "--json"))

    run = f"multinode-{free_port()}"
    config = {
        "data": str(digits),
        "policy": DIGITS_PLATEAU,
        "sync": False,
        "report_every": 10,
        "max_steps": 20_000,
        "stop_file": str(tmp_path / "stop"),
        "step_sleep": 0.003,  # pace only: leaves CPU to the daemon and this test
        "out_dir": str(tmp_path),
        "deadline_s": 150,
    }
    rendezvous = f"127.0.0.1:{free_port()}"
    nodes = [
        torchrun_node(tmp_path, config, node, rendezvous, run, keys, daemon.address)
        for node in range(NODES)
    ]

    def output() -> str:
        return "\n".join(
            [(tmp_path / f"node{n}.out").read_text() for n in range(NODES)] + [daemon.log()[-3000:]]
        )

    def applied_everywhere(by_policy: bool) -> bool:
        for node in nodes:
            if node.poll() is not None:
                raise AssertionError(f"a torchrun agent exited with {node.returncode}:\n{output()}")
        ranks = [tmp_path / f"rank{r}.jsonl" for r in range(WORLD)]
        return all(
            path.exists()
            and any(
                line.get("event") == "change" and (line["actor"] == "policy") == by_policy
                for line in read_jsonl(path)
            )
            for path in ranks
        )

    try:
        wait_for(lambda: applied_everywhere(True), 90, "a plateau cut on all four ranks", output)
        [summary] = as_operator("runs")
        assert (summary["run"], summary["ranks"], summary["world_size"]) == (
            run,
            list(range(WORLD)),
            WORLD,
        )
        as_operator("set-lr", run, str(HOLD_LR))
        wait_for(lambda: applied_everywhere(False), 30, "the set-lr on all four ranks", output)
        (tmp_path / "stop").touch()
        for node in nodes:
            node.wait(60)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait(10)
    assert [node.returncode for node in nodes] == [0, 0], output()
    history = as_operator("history", run)
    ddp_ranks_agree(tmp_path, run, history, world=WORLD)
    # The journal names the key that made the operator's change.
    assert [e["actor"] for e in history if e["actor"] != "policy"] == ["operator"], history
    want = mean_val_losses(tmp_path, world=WORLD)
    assert stored_val_losses(daemon, run, len(want)) == want
