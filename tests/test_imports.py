"""Which part may import which (docs/architecture.md), read from the source:
the training side never imports the daemon, policies are pure, and the
daemon's layers point one way."""

from __future__ import annotations

import ast
import sys

from conftest import ROOT

# Pure: no I/O, clock, threads or sockets; the standard library's modules of
# that kind are not allowed either.
IMPURE = {"os", "socket", "time", "threading", "subprocess", "sqlite3", "zmq", "random", "io"}


def imports_of(path) -> set[str]:
    """Top-level module names a file imports, with relative imports as
    ``.name`` (one dot per level)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


def daemon_module(path, name: str) -> str | None:
    """What ``path`` (a file under daemon/) imports as ``name``, as a module
    of lrpilot.daemon without that prefix (``service.engine``, ``cli``; the
    package itself is ``""``), or None for a module outside the daemon."""
    if name == "lrpilot.daemon" or name.startswith("lrpilot.daemon."):
        return name.removeprefix("lrpilot.daemon").lstrip(".")
    level = len(name) - len(name.lstrip("."))
    if not level:
        return None
    package = path.relative_to(ROOT / "daemon").parent.parts
    base = package[: max(0, len(package) - (level - 1))]
    return ".".join([*base, name[level:]]).strip(".")


# The page's "Inside the daemon, layers point one way", per module of
# daemon/service: the siblings it may import, and where the page says "only",
# all it may import from outside the standard library (None: not said).
SERVICE_LAYERS: dict[str, tuple[set[str], set[str] | None]] = {
    "engine": (set(), {"lrpilot.policies", "lrpilot.protocol"}),
    "ledger": (set(), {"lrpilot.protocol"}),
    "reduction": (set(), {"lrpilot.protocol"}),
    "records": (set(), {"lrpilot.errors"}),
    "schema": (set(), {"lrpilot.errors"}),
    "store_ops": ({"schema"}, {"lrpilot.protocol"}),
    "store": ({"schema", "store_ops", "records"}, {"lrpilot.protocol"}),
    "registry": ({"engine", "ledger", "reduction"}, None),
    "dataplane": ({"engine", "ledger", "reduction", "registry", "store", "config", "auth"}, None),
    "control": ({"dataplane", "engine", "registry", "auth", "control_protocol"}, None),
    "auth": (set(), {"lrpilot.errors", "lrpilot.keys", "zmq", "zmq.auth", "zmq.auth.thread"}),
    "gc_pacing": (set(), set()),
    "sharding": ({"schema"}, {"lrpilot.errors"}),
    "state_lock": (set(), {"lrpilot.errors"}),
}


def test_the_client_never_imports_the_daemon_nor_heavy_libraries():
    for path in sorted((ROOT / "client").rglob("*.py")):
        for name in imports_of(path):
            assert not name.startswith(("lrpilot.daemon", "..daemon", ".daemon")), (path, name)
            top = name.split(".")[0]
            assert top not in ("torch", "prometheus_client", "grafana_client", "rich"), (path, name)


def test_policies_import_only_each_other_pydantic_and_the_standard_library():
    for path in sorted((ROOT / "client" / "policies").glob("*.py")):
        for name in imports_of(path):
            top = name.split(".")[0]
            # Siblings, and the package's errors module (pure: class definitions).
            relative_sibling = name == "..errors" or (
                name.startswith(".") and not name.startswith("..")
            )
            pure_stdlib = top in sys.stdlib_module_names and top not in IMPURE
            assert relative_sibling or pure_stdlib or top == "pydantic", (path, name)


def test_the_daemon_s_layers_point_one_way():
    service = ROOT / "daemon" / "service"
    for path in sorted(service.glob("*.py")):
        for name in imports_of(path):
            layer = (daemon_module(path, name) or "").split(".")[0]
            assert layer != "cli", (path, name)
            # The processes' tops (one daemon; the front of several shards)
            # serve /metrics; nothing below them knows of it.
            assert layer != "observability" or path.name in ("server.py", "front.py"), (path, name)
    for stem, (siblings, outside) in SERVICE_LAYERS.items():
        path = service / f"{stem}.py"
        for name in imports_of(path):
            module = daemon_module(path, name)
            if module is not None:
                # A sibling by its name; the control protocol, above the service, by its own.
                assert module.removeprefix("service.") in siblings, (path, name)
            elif outside is not None:
                stdlib = name.split(".")[0] in sys.stdlib_module_names
                assert stdlib or name in outside, (path, name)
    # Shared by the daemon and its command line, so it stands below both.
    control_protocol = ROOT / "daemon" / "control_protocol.py"
    for name in imports_of(control_protocol):
        assert not name.startswith("."), name
        assert daemon_module(control_protocol, name) is None, name
        stdlib = name.split(".")[0] in sys.stdlib_module_names
        assert stdlib or name in ("pydantic", "lrpilot.errors", "lrpilot.protocol"), name
        stdlib = name.split(".")[0] in sys.stdlib_module_names
        assert stdlib or name in ("pydantic", "lrpilot.errors", "lrpilot.protocol"), name


def test_every_error_a_user_sees_is_an_lrpilot_error():
    """The CLI prints an LRPilotError as one line; anything else is a bug and
    shows its traceback. Each keeps its builtin base for `except ValueError`."""
    from lrpilot.daemon.cli.control_client import ControlClientError
    from lrpilot.daemon.cli.main import CommandError
    from lrpilot.daemon.cli.simulate import ReplayError
    from lrpilot.daemon.control_protocol import ControlError
    from lrpilot.daemon.observability.dashboards import DashboardError
    from lrpilot.daemon.observability.grafana import GrafanaError
    from lrpilot.daemon.service.schema import StoreError
    from lrpilot.daemon.service.server import DaemonError
    from lrpilot.daemon.service.store import StoreWriteError
    from lrpilot.errors import LRPilotError, UsageError
    from lrpilot.policies import ScheduleExhausted, SpecError
    from lrpilot.protocol import ProtocolError

    seen = [
        CommandError, ControlError, ControlClientError, DashboardError, GrafanaError,
        DaemonError, ReplayError, StoreError, StoreWriteError, UsageError, ScheduleExhausted,
        SpecError, ProtocolError,
    ]  # fmt: skip
    assert all(issubclass(error, LRPilotError) for error in seen)
    assert issubclass(SpecError, ValueError) and issubclass(UsageError, ValueError)


def test_attach_raises_a_usage_error_naming_what_is_wrong():
    import pytest
    from procs import FakeOptimizer

    import lrpilot
    from lrpilot.errors import UsageError

    with pytest.raises(UsageError, match=r"rank 3 is not in 0\.\.world_size-1 \(2\)"):
        lrpilot.attach(
            FakeOptimizer([{"params": [], "lr": 0.1}]),
            run="x",
            rank=3,
            world_size=2,
            daemon="tcp://127.0.0.1:1",
        )
