"""Talking to Grafana (grafana-client): connect, push the datasource, folder
and dashboards idempotently, post an annotation.

Every call goes through :meth:`Grafana.call`, which turns what grafana-client
and its HTTP library raise into one :class:`GrafanaError` line that names the
Grafana and what went wrong (no credentials in it). Pushing reads what
Grafana has first and writes only what differs, so a second push with
nothing changed sends no write at all.

Only the daemon imports this module (docs/architecture.md); the CLI and the server
import it lazily, so `lrpilot daemon` without ``--grafana-url`` never loads
grafana-client.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from grafana_client import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaServerError,
    GrafanaTimeoutError,
    GrafanaUnauthorizedError,
)

from lrpilot.errors import LRPilotError

from ..service.config import (
    GRAFANA_PASSWORD_ENV,
    GRAFANA_TOKEN_ENV,
    GRAFANA_USER_ENV,
    check_http_url,
)

DATASOURCE_UID = "lrpilot-prometheus"  # the dashboards' panels name this uid
DATASOURCE_NAME = "lrpilot-prometheus"  # as deploy/grafana/provisioning names it
FOLDER_UID = "lrpilot"
DEFAULT_FOLDER_TITLE = "lrpilot"
DEFAULT_PROMETHEUS_URL = "http://127.0.0.1:9090"
# Grafana adds these to a dashboard when it saves one; they are not ours to compare.
GRAFANA_OWNED_KEYS = ("id", "version")
# Fields of a datasource as Grafana answers it that an update does not take
# (the server sets them; secureJsonFields only says which secrets are set).
DATASOURCE_SERVER_KEYS = (
    "id",
    "orgId",
    "readOnly",
    "typeName",
    "typeLogoUrl",
    "secureJsonFields",
)

Credential = str | tuple[str, str] | None
T = TypeVar("T")


class GrafanaError(LRPilotError):
    """Grafana cannot be reached, refused us, or failed: one line for the user."""


@dataclass(frozen=True)
class Change:
    """What a push did to one object: created, updated or unchanged."""

    kind: str  # datasource, folder, dashboard
    uid: str
    title: str
    outcome: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def credential(
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Credential:
    """A bearer token, or (user, password) for basic auth, or None. Flags win
    over the environment; a token wins over a user and password."""
    token = token or environ.get(GRAFANA_TOKEN_ENV) or None
    if token:
        return token
    user = user or environ.get(GRAFANA_USER_ENV) or None
    password = password or environ.get(GRAFANA_PASSWORD_ENV) or None
    if user and password:
        return (user, password)
    if user or password:
        raise GrafanaError(
            "basic auth needs both a user and a password "
            f"(--user/--password or ${GRAFANA_USER_ENV}/${GRAFANA_PASSWORD_ENV})"
        )
    return None


class Grafana:
    """One Grafana, by URL, with its credential and a timeout per request."""

    def __init__(self, url: str, credential: Credential = None, timeout: float = 5.0) -> None:
        try:
            self.url = check_http_url(url, "Grafana URL")
        except ValueError as exc:
            raise GrafanaError(str(exc)) from None
        self.timeout = timeout
        self.api = GrafanaApi.from_url(self.url, credential=credential, timeout=timeout)

    # --- errors -----------------------------------------------------------

    def call(self, what: str, request: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``request(*args, **kwargs)``, its failures as one GrafanaError line."""
        try:
            return request(*args, **kwargs)
        except (GrafanaException, OSError, ValueError) as exc:
            raise self._error(what, exc) from None

    def _get(self, what: str, path: str) -> dict[str, Any] | None:
        """GET an object; None when Grafana says 404 (it does not exist)."""
        try:
            return self.api.client.GET(path)
        except GrafanaClientError as exc:
            if exc.status_code == 404:
                return None
            raise self._error(what, exc) from None
        except (GrafanaException, OSError, ValueError) as exc:
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: Exception) -> GrafanaError:
        if isinstance(exc, GrafanaUnauthorizedError):
            return GrafanaError(
                f"Grafana at {self.url} refused the credentials (401) on {what}: check the "
                f"token (${GRAFANA_TOKEN_ENV}) or the user and password"
            )
        if isinstance(exc, GrafanaTimeoutError):
            return GrafanaError(
                f"no answer from Grafana at {self.url} within {self.timeout:g}s on {what}"
            )
        if isinstance(exc, (GrafanaClientError, GrafanaServerError)):
            return GrafanaError(
                f"Grafana at {self.url} answered {exc.status_code} on {what}: {_message(exc)}"
            )
        if isinstance(exc, GrafanaException):
            return GrafanaError(f"Grafana at {self.url} failed on {what}: {_first_line(exc)}")
        if isinstance(exc, OSError):  # niquests' ConnectionError and its kin are OSErrors
            return GrafanaError(f"cannot reach Grafana at {self.url}: {_reason(exc)}")
        # A body that is not JSON: something else listens there.
        return GrafanaError(f"{self.url} does not answer like Grafana on {what}")

    # --- reads ------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """GET /api/health: reachable and a Grafana (it needs no credentials)."""
        answer = self.call("GET /api/health", self.api.client.GET, "/health")
        if not isinstance(answer, dict) or "version" not in answer:
            raise GrafanaError(f"{self.url} does not answer like Grafana on GET /api/health")
        return answer

    # --- push -------------------------------------------------------------

    def push(
        self,
        dashboards: Sequence[dict[str, Any]],
        prometheus_url: str = DEFAULT_PROMETHEUS_URL,
        folder_title: str = DEFAULT_FOLDER_TITLE,
    ) -> list[Change]:
        """The datasource, the folder, then every dashboard in it."""
        self.health()
        changes = [self.ensure_datasource(prometheus_url), self.ensure_folder(folder_title)]
        changes += [self.ensure_dashboard(d, FOLDER_UID) for d in dashboards]
        return changes

    def ensure_datasource(self, prometheus_url: str) -> Change:
        try:
            prometheus_url = check_http_url(prometheus_url, "Prometheus URL")
        except ValueError as exc:
            raise GrafanaError(str(exc)) from None
        wanted: dict[str, Any] = {
            "uid": DATASOURCE_UID,
            "name": DATASOURCE_NAME,
            "type": "prometheus",
            "access": "proxy",
            "url": prometheus_url,
            # POST: long PromQL from the run dashboard's templates fits in a body;
            # timeInterval: Prometheus's scrape interval (deploy/prometheus), the
            # smallest step Grafana asks for, so rate() windows hold two samples.
            "jsonData": {"httpMethod": "POST", "timeInterval": "15s"},
        }
        path = f"/datasources/uid/{DATASOURCE_UID}"
        have = self._get(f"GET /api{path}", path)
        if have is None:
            self.call("POST /api/datasources", self.api.datasource.create_datasource, wanted)
            return Change("datasource", DATASOURCE_UID, DATASOURCE_NAME, "created")
        if _covers(have, wanted):
            return Change("datasource", DATASOURCE_UID, DATASOURCE_NAME, "unchanged")
        if have.get("readOnly"):
            raise GrafanaError(
                f"the datasource {DATASOURCE_UID} in Grafana at {self.url} is provisioned from "
                "files (read-only) and differs: change it in the provisioning file"
            )
        # Grafana's PUT replaces the whole datasource: send back what it has
        # (less the fields only it sets) with ours changed, so what others set
        # (basicAuth, isDefault, jsonData keys we do not own...) is kept. Secrets
        # are kept by Grafana when secureJsonData is not sent. The version we
        # read: Grafana answers 409 if someone updated it since.
        body = {
            **{k: v for k, v in have.items() if k not in DATASOURCE_SERVER_KEYS},
            **wanted,
            "jsonData": {**(have.get("jsonData") or {}), **wanted["jsonData"]},
        }
        self.call(
            f"PUT /api{path}", self.api.datasource.update_datasource_by_uid, DATASOURCE_UID, body
        )
        return Change("datasource", DATASOURCE_UID, DATASOURCE_NAME, "updated")

    def ensure_folder(self, title: str) -> Change:
        path = f"/folders/{FOLDER_UID}"
        have = self._get(f"GET /api{path}", path)
        if have is None:
            self.call("POST /api/folders", self.api.folder.create_folder, title, uid=FOLDER_UID)
            return Change("folder", FOLDER_UID, title, "created")
        if have.get("title") == title:
            return Change("folder", FOLDER_UID, title, "unchanged")
        # The version we read: Grafana answers 412 if someone changed it since.
        self.call(
            f"PUT /api{path}",
            self.api.folder.update_folder,
            FOLDER_UID,
            title=title,
            version=have.get("version"),
        )
        return Change("folder", FOLDER_UID, title, "updated")

    def ensure_dashboard(self, dashboard: dict[str, Any], folder_uid: str) -> Change:
        uid, title = dashboard["uid"], dashboard.get("title", dashboard["uid"])
        path = f"/dashboards/uid/{uid}"
        have = self._get(f"GET /api{path}", path)
        ours = {k: v for k, v in dashboard.items() if k not in GRAFANA_OWNED_KEYS}
        body: dict[str, Any] = {
            "folderUid": folder_uid,
            "message": "lrpilot dashboards push",
            "overwrite": False,
        }
        if have is None:
            body["dashboard"] = {**ours, "id": None}
            outcome = "created"
        else:
            theirs = {k: v for k, v in have["dashboard"].items() if k not in GRAFANA_OWNED_KEYS}
            meta = have.get("meta", {})
            if theirs == ours and meta.get("folderUid") == folder_uid:
                return Change("dashboard", uid, title, "unchanged")
            if meta.get("provisioned"):
                raise GrafanaError(
                    f"the dashboard {uid} in Grafana at {self.url} is provisioned from files "
                    "and differs: update those files (lrpilot dashboards export DIR)"
                )
            # Saved over the version we read: a 412 if someone saved in between.
            body["dashboard"] = {
                **ours,
                "id": have["dashboard"].get("id"),
                "version": have["dashboard"].get("version"),
            }
            outcome = "updated"
        self.call("POST /api/dashboards/db", self.api.dashboard.update_dashboard, body)
        return Change("dashboard", uid, title, outcome)

    # --- annotations ------------------------------------------------------

    def annotate(self, time_ms: int, tags: list[str], text: str) -> None:
        """POST /api/annotations: an organisation-wide point annotation (a
        dashboard shows it through an annotation query on its tags)."""
        self.call(
            "POST /api/annotations",
            self.api.annotations.add_annotation,
            time_from=time_ms,
            time_to=time_ms,
            tags=tags,
            text=text,
        )


def _covers(have: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Every field we set has our value in what Grafana has (dicts: every key)."""
    for key, value in wanted.items():
        if isinstance(value, dict):
            if not _covers(have.get(key) or {}, value):
                return False
        elif have.get(key) != value:
            return False
    return True


def _message(exc: GrafanaException) -> str:
    """Grafana's own words: the body's "message", else the body's first line."""
    body = exc.response
    if isinstance(body, dict) and body.get("message"):
        return _first_line(body["message"])
    return _first_line(body) if body else _first_line(exc.message)


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:200] if lines else ""


def _reason(exc: OSError) -> str:
    """The root cause of a connection failure, short (niquests nests them)."""
    seen: BaseException | None = exc
    text = str(exc)
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "refused" in str(seen).lower():
            return "connection refused"
        if "Name or service not known" in str(seen) or "resolve" in str(seen).lower():
            return "unknown host"
        seen = seen.__cause__ or seen.__context__
    return _first_line(text) or type(exc).__name__
