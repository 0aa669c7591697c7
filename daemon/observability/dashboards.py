"""The dashboard JSON files: where they are, reading them, copying them out,
and `lrpilot dashboards push` / `export`.

Where the files are, in order: ``--dir``; the checkout's ``dashboards/``
next to the daemon package (a source or editable install); the wheel's data
files, ``<sys.prefix>/share/lrpilot/dashboards`` (pyproject's
``[tool.setuptools.data-files]``). ``dashboards/`` is data, not a Python
package (docs/architecture.md), so it is found by path, not by import.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any

from lrpilot.errors import LRPilotError

from ..service.config import check_http_url


class DashboardError(LRPilotError, ValueError):
    """A push or export that cannot be done (a file that is not a dashboard,
    a Grafana that refuses): one line for the user, exit status 1."""


def dashboard_dirs() -> list[Path]:
    """Where the dashboards may be, in the order they are looked for."""
    import lrpilot.daemon

    # A wheel's data files go under the prefix of the scheme pip installed
    # it with: the environment's (sys.prefix), or the user's (`pip install
    # --user`: site.USER_BASE), or a distribution's own (sysconfig's data).
    prefixes = [Path(sys.prefix), Path(site.getuserbase())]
    prefixes += [Path(sysconfig.get_paths(scheme)["data"]) for scheme in data_schemes()]
    seen: list[Path] = [Path(lrpilot.daemon.__file__).resolve().parents[1] / "dashboards"]
    for prefix in prefixes:
        where = prefix / "share" / "lrpilot" / "dashboards"
        if where not in seen:
            seen.append(where)
    return seen


def data_schemes() -> list[str]:
    schemes = [sysconfig.get_default_scheme()]
    user = f"{os.name}_user"
    if user in sysconfig.get_scheme_names():
        schemes.append(user)
    return schemes


def find_dashboard_dir(explicit: Path | None = None) -> Path:
    if explicit is not None:
        if not explicit.is_dir():
            raise DashboardError(f"--dir {explicit}: not a directory")
        return explicit
    for candidate in dashboard_dirs():
        if any(candidate.glob("*.json")):
            return candidate
    looked = ", ".join(str(d) for d in dashboard_dirs())
    raise DashboardError(f"no dashboard JSON found (looked in {looked}); give --dir")


def dashboard_files(where: Path) -> list[Path]:
    files = sorted(where.glob("*.json"))
    if not files:
        raise DashboardError(f"no *.json dashboard in {where}")
    return files


def load_dashboard(path: Path) -> dict[str, Any]:
    """A dashboard model: a JSON object with a fixed ``uid`` and a ``title``
    (the uid is what makes a push an update, never a duplicate)."""
    try:
        model = json.loads(path.read_text())
    except OSError as exc:
        raise DashboardError(f"{path}: cannot read: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DashboardError(f"{path}: not JSON: {exc}") from None
    if not isinstance(model, dict):
        raise DashboardError(f"{path}: a dashboard is a JSON object, got {type(model).__name__}")
    for key in ("uid", "title"):
        if not isinstance(model.get(key), str) or not model[key]:
            raise DashboardError(f"{path}: the dashboard has no {key!r}")
    return model


def load_dashboards(where: Path) -> list[dict[str, Any]]:
    models = [load_dashboard(p) for p in dashboard_files(where)]
    uids = [m["uid"] for m in models]
    twice = sorted({u for u in uids if uids.count(u) > 1})
    if twice:
        raise DashboardError(f"{where}: two dashboards have the uid {twice[0]!r}")
    return models


# --- commands --------------------------------------------------------------


def cmd_push(args: argparse.Namespace) -> None:
    check_http_url(args.grafana_url, "Grafana URL")  # bad input fails before the imports
    check_http_url(args.prometheus_url, "Prometheus URL")
    dashboards = load_dashboards(find_dashboard_dir(args.dir))
    from .grafana import Grafana, GrafanaError, credential

    try:
        auth = credential(args.token, args.user, args.password)
        grafana = Grafana(args.grafana_url, auth, timeout=args.timeout)
        changes = grafana.push(dashboards, args.prometheus_url, args.folder)
    except GrafanaError as exc:
        raise DashboardError(str(exc)) from None
    if args.json:
        print(json.dumps({"grafana": grafana.url, "objects": [c.as_dict() for c in changes]}))
        return
    for c in changes:
        print(f"{c.kind:<11} {c.uid:<22} {c.outcome:<10} {c.title}")
    tally = {o: sum(c.outcome == o for c in changes) for o in ("created", "updated", "unchanged")}
    print(f"Grafana at {grafana.url}: " + ", ".join(f"{n} {o}" for o, n in tally.items()))


def cmd_export(args: argparse.Namespace) -> None:
    """Copy the dashboard JSON into DIR, for Grafana's file provisioning."""
    source = find_dashboard_dir(args.dir)
    load_dashboards(source)  # never hand Grafana a file it cannot load, nor a uid twice
    files = dashboard_files(source)
    try:
        args.dest.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copyfile(path, args.dest / path.name)
    except OSError as exc:
        raise DashboardError(f"{args.dest}: cannot write: {exc.strerror}") from None
    if args.json:
        print(json.dumps([str(args.dest / p.name) for p in files]))
        return
    for path in files:
        print(args.dest / path.name)
