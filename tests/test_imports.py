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
            relative_sibling = name.startswith(".") and not name.startswith("..")
            pure_stdlib = top in sys.stdlib_module_names and top not in IMPURE
            assert relative_sibling or pure_stdlib or top == "pydantic", (path, name)
