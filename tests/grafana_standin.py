"""A local stand-in for Grafana's HTTP API, for the tests of daemon/observability/grafana.py,
`lrpilot dashboards push` and the daemon's annotations.

No Grafana server can be installed in the test environment, so this follows
Grafana's documented HTTP API (grafana.com/docs/grafana/latest/developers/
http_api/) for the endpoints lrpilot uses, with the status codes and bodies
documented there:

- ``GET /api/health`` (no auth): ``{"commit", "database", "version"}``;
- ``GET /api/datasources``, ``GET /api/datasources/uid/:uid`` (404
  ``{"message": "Data source not found"}``), ``POST /api/datasources`` (409
  when the name or uid is taken), ``PUT /api/datasources/uid/:uid``: the body
  *replaces* the datasource, as Grafana's does (a field left out is reset to
  its default; only the secrets of ``secureJsonData`` already set are kept),
  version bumped; 409 when ``version`` is sent and differs, 403 on a
  read-only (provisioned) one;
- ``GET /api/folders``, ``GET /api/folders/:uid`` (404 ``Folder not found``),
  ``POST /api/folders`` (409 when the uid is taken), ``PUT /api/folders/:uid``
  (412 when ``version`` differs and ``overwrite`` is not set);
- ``GET /api/dashboards/uid/:uid`` (``{"dashboard", "meta"}``, 404
  ``Dashboard not found``), ``POST /api/dashboards/db`` (version bumped on
  each save; 412 ``version-mismatch`` when the uid exists with another
  version and ``overwrite`` is false; 400 when the folder does not exist);
- ``GET /api/annotations`` (``tags`` all match, ``from``/``to``, ``limit``,
  newest first), ``POST /api/annotations`` (``{"id", "message"}``);
- 401 ``{"message": "Unauthorized"}`` on any other endpoint when the
  Authorization header is not the configured bearer token or basic auth.

It records every request (method, path, query, Authorization, JSON body), and
a test can make it fail (``fail_with = 503``) or hang (``hang()``: requests
wait until ``release()`` or ``close()``).
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    body: Any


@dataclass
class State:
    datasources: dict[str, dict] = field(default_factory=dict)  # by uid
    folders: dict[str, dict] = field(default_factory=dict)  # by uid
    dashboards: dict[str, dict] = field(default_factory=dict)  # uid -> {"dashboard", "folderUid"}
    annotations: list[dict] = field(default_factory=list)
    next_id: int = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


# A datasource as GET /api/datasources/uid/:uid answers it (Grafana's
# DataSource DTO), with the values a field not given takes (copied on use).
DATASOURCE_DEFAULTS: dict[str, Any] = {
    "orgId": 1,
    "name": "",
    "type": "",
    "access": "proxy",
    "url": "",
    "user": "",
    "database": "",
    "basicAuth": False,
    "basicAuthUser": "",
    "withCredentials": False,
    "isDefault": False,
    "jsonData": {},
    "secureJsonFields": {},
    "version": 1,
    "readOnly": False,
}
# What a POST or PUT body sets (Grafana's Add/UpdateDataSourceCommand); the
# rest of a body (id, orgId, readOnly, secureJsonFields...) is ignored.
DATASOURCE_WRITABLE = (
    "name",
    "type",
    "access",
    "url",
    "user",
    "database",
    "basicAuth",
    "basicAuthUser",
    "withCredentials",
    "isDefault",
    "jsonData",
)


def datasource_fields(body: dict) -> dict:
    """The fields a write sets, and which secrets it sets (never stored in clear)."""
    fields = {k: body[k] for k in DATASOURCE_WRITABLE if body.get(k) is not None}
    secrets = {k: True for k in body.get("secureJsonData") or {}}
    return {**fields, "secureJsonFields": secrets}


class Answer(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


def not_found(what: str) -> Answer:
    return Answer(404, {"message": f"{what} not found"})


class GrafanaStandIn:
    """Serves on a free loopback port until ``close()``; ``url`` is its base URL."""

    def __init__(
        self,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        version: str = "11.3.0",
    ) -> None:
        self.token, self.user, self.password, self.version = token, user, password, version
        self.state = State()
        self.requests: list[Request] = []
        self.fail_with: int | None = None  # answer every /api request with this status
        self._released = threading.Event()
        self._released.set()
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in._serve(self, "GET")

            def do_POST(self) -> None:
                stand_in._serve(self, "POST")

            def do_PUT(self) -> None:
                stand_in._serve(self, "PUT")

            def do_DELETE(self) -> None:
                stand_in._serve(self, "DELETE")

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    # --- the test's hand ------------------------------------------------------

    def hang(self) -> None:
        """Every request from now on waits (unanswered) until release()."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method != "GET"]

    def annotations(self) -> list[dict]:
        with self._lock:
            return list(self.state.annotations)

    # --- serving --------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode(errors="replace")
        request = Request(
            method, parts.path, parse_qs(parts.query), handler.headers.get("Authorization"), body
        )
        with self._lock:
            self.requests.append(request)
        self._released.wait()
        try:
            if self.fail_with is not None:
                raise Answer(self.fail_with, {"message": "stand-in told to fail"})
            if parts.path != "/api/health" and not self._authorized(request.authorization):
                raise Answer(401, {"message": "Unauthorized"})
            with self._lock:
                status, answer = 200, self._route(request)
        except Answer as exc:
            status, answer = exc.status, exc.body
        data = json.dumps(answer).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:  # the client gave up (its timeout) while we hung
            pass

    def _authorized(self, header: str | None) -> bool:
        if self.token is None and self.user is None:
            return True
        if self.token is not None and header == f"Bearer {self.token}":
            return True
        if self.user is not None:
            basic = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            return header == f"Basic {basic}"
        return False

    def _route(self, r: Request) -> Any:
        segments = r.path.strip("/").split("/")
        if segments[0] != "api":
            raise not_found("Page")
        match r.method, segments[1:]:
            case "GET", ["health"]:
                return {"commit": "stand-in", "database": "ok", "version": self.version}
            case "GET", ["datasources"]:
                return list(self.state.datasources.values())
            case "GET", ["datasources", "uid", uid]:
                return self._datasource(uid)
            case "POST", ["datasources"]:
                return self._create_datasource(r.body)
            case "PUT", ["datasources", "uid", uid]:
                return self._update_datasource(uid, r.body)
            case "GET", ["folders"]:
                return [{"id": f["id"], "uid": u, "title": f["title"]} for u, f in self._folders()]
            case "GET", ["folders", uid]:
                return self._folder(uid)
            case "POST", ["folders"]:
                return self._create_folder(r.body)
            case "PUT", ["folders", uid]:
                return self._update_folder(uid, r.body)
            case "GET", ["dashboards", "uid", uid]:
                return self._dashboard(uid)
            case "POST", ["dashboards", "db"]:
                return self._save_dashboard(r.body)
            case "GET", ["annotations"]:
                return self._find_annotations(r.query)
            case "POST", ["annotations"]:
                return self._add_annotation(r.body)
        raise not_found("Page")

    # --- datasources ------------------------------------------------------------

    def _datasource(self, uid: str) -> dict:
        if uid not in self.state.datasources:
            raise Answer(404, {"message": "Data source not found"})
        return self.state.datasources[uid]

    def _create_datasource(self, body: dict) -> dict:
        if not body.get("name") or not body.get("type"):
            raise Answer(400, {"message": "bad request data"})
        taken = any(d["name"] == body["name"] for d in self.state.datasources.values())
        if taken or body.get("uid") in self.state.datasources:
            raise Answer(409, {"message": "data source with the same name already exists"})
        uid = body.get("uid") or f"ds{self.state.next_id}"
        stored = {
            **copy.deepcopy(DATASOURCE_DEFAULTS),
            "id": self.state.new_id(),
            "uid": uid,
            **datasource_fields(body),
        }
        self.state.datasources[uid] = stored
        return {"datasource": stored, "id": stored["id"], "message": "Datasource added"}

    def _update_datasource(self, uid: str, body: dict) -> dict:
        """Grafana's update replaces the datasource with the body: a field the
        body leaves out gets its default, not the value it had."""
        have = self._datasource(uid)
        if have["readOnly"]:
            raise Answer(403, {"message": "Cannot update read-only data source"})
        if not body.get("name") or not body.get("type") or not body.get("access"):
            raise Answer(400, {"message": "bad request data"})
        if "version" in body and body["version"] != have["version"]:
            raise Answer(409, {"message": "Datasource has already been updated by someone else"})
        fields = datasource_fields(body)
        stored = {
            **copy.deepcopy(DATASOURCE_DEFAULTS),
            **fields,
            "id": have["id"],
            "uid": uid,
            "orgId": have["orgId"],
            "secureJsonFields": {**have["secureJsonFields"], **fields["secureJsonFields"]},
            "version": have["version"] + 1,
        }
        self.state.datasources[uid] = stored
        return {"datasource": stored, "id": stored["id"], "message": "Datasource updated"}

    # --- folders --------------------------------------------------------------

    def _folders(self) -> list[tuple[str, dict]]:
        return list(self.state.folders.items())

    def _folder(self, uid: str) -> dict:
        if uid not in self.state.folders:
            raise not_found("Folder")
        return self.state.folders[uid]

    def _create_folder(self, body: dict) -> dict:
        if not body.get("title"):
            raise Answer(400, {"message": "folder title cannot be empty"})
        uid = body.get("uid") or f"f{self.state.next_id}"
        if uid in self.state.folders:
            raise Answer(409, {"message": "a folder with the same uid already exists"})
        stored = {"id": self.state.new_id(), "uid": uid, "title": body["title"], "version": 1}
        self.state.folders[uid] = stored
        return stored

    def _update_folder(self, uid: str, body: dict) -> dict:
        have = self._folder(uid)
        if not body.get("overwrite") and body.get("version") != have["version"]:
            raise Answer(
                412, {"message": "the folder has been changed by someone else", "status": "x"}
            )
        stored = {**have, "title": body.get("title", have["title"]), "version": have["version"] + 1}
        self.state.folders[uid] = stored
        return stored

    # --- dashboards -----------------------------------------------------------

    def _dashboard(self, uid: str) -> dict:
        if uid not in self.state.dashboards:
            raise not_found("Dashboard")
        saved = self.state.dashboards[uid]
        folder = self.state.folders.get(saved["folderUid"] or "", {})
        return {
            "dashboard": saved["dashboard"],
            "meta": {
                "type": "db",
                "slug": saved["dashboard"]["title"].lower().replace(" ", "-"),
                "url": f"/d/{uid}",
                "version": saved["dashboard"]["version"],
                "folderUid": saved["folderUid"] or "",
                "folderTitle": folder.get("title", "General"),
                "provisioned": False,
            },
        }

    def _save_dashboard(self, body: dict) -> dict:
        dashboard = dict(body.get("dashboard") or {})
        if not dashboard.get("title"):
            raise Answer(
                400, {"message": "Dashboard title cannot be empty", "status": "empty-name"}
            )
        folder_uid = body.get("folderUid") or None
        if folder_uid is not None and folder_uid not in self.state.folders:
            raise Answer(400, {"message": "folder not found", "status": "folder-not-found"})
        uid = dashboard.get("uid") or f"d{self.state.next_id}"
        have = self.state.dashboards.get(uid)
        stale = have is not None and dashboard.get("version") != have["dashboard"]["version"]
        if stale and not body.get("overwrite"):
            raise Answer(
                412,
                {
                    "message": "The dashboard has been changed by someone else",
                    "status": "version-mismatch",
                },
            )
        dashboard["uid"] = uid
        dashboard["id"] = have["dashboard"]["id"] if have else self.state.new_id()
        dashboard["version"] = have["dashboard"]["version"] + 1 if have else 1
        self.state.dashboards[uid] = {"dashboard": dashboard, "folderUid": folder_uid}
        return {
            "id": dashboard["id"],
            "uid": uid,
            "url": f"/d/{uid}",
            "status": "success",
            "version": dashboard["version"],
            "slug": dashboard["title"].lower().replace(" ", "-"),
        }

    # --- annotations ----------------------------------------------------------

    def _add_annotation(self, body: dict) -> dict:
        if not isinstance(body, dict) or not body.get("text"):
            raise Answer(400, {"message": "Failed to save annotation: text is empty"})
        now = int(time.time() * 1000)
        stored = {
            "id": self.state.new_id(),
            "dashboardUID": body.get("dashboardUID") or "",
            "panelId": body.get("panelId") or 0,
            "time": body.get("time") or now,
            "timeEnd": body.get("timeEnd") or body.get("time") or now,
            "tags": list(body.get("tags") or []),
            "text": body["text"],
        }
        self.state.annotations.append(stored)
        return {"id": stored["id"], "message": "Annotation added"}

    def _find_annotations(self, query: dict[str, list[str]]) -> list[dict]:
        tags = set(query.get("tags", []))
        start = int(query.get("from", ["0"])[0])
        end = int(query.get("to", [str(2**62)])[0])
        limit = int(query.get("limit", ["100"])[0])
        found = [
            a
            for a in self.state.annotations
            if tags <= set(a["tags"]) and start <= a["time"] <= end
        ]
        return sorted(found, key=lambda a: a["time"], reverse=True)[:limit]
