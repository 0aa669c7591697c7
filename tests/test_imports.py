"""Which part may import which (docs/architecture.md), read from the source:
the training side never imports the daemon, and policies are pure."""

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


def test_every_error_a_user_sees_is_an_lrpilot_error():
    """The CLI prints an LRPilotError as one line; anything else is a bug and
    shows its traceback. Each keeps its builtin base for `except ValueError`."""
    from lrpilot.daemon.cli.control_client import ControlClientError
    from lrpilot.daemon.cli.main import CommandError
    from lrpilot.daemon.cli.simulate import ReplayError
    from lrpilot.daemon.control_protocol import ControlError
    from lrpilot.daemon.observability.dashboards import DashboardError
    from lrpilot.daemon.observability.grafana import GrafanaError
    from lrpilot.daemon.service.server import DaemonError
    from lrpilot.daemon.service.store import StoreError, StoreWriteError
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
