"""``DaemonConfig``: every option of the daemon, its default and its check.

The command line maps its flags one to one onto these fields; tests build a
config directly and run a :class:`~lrpilot.daemon.service.server.Daemon` with it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lrpilot.errors import UsageError
from lrpilot.protocol import (
    CONTROL_ENV,
    DAEMON_ENV,
    DEFAULT_CONTROL,
    DEFAULT_DAEMON,
    MAX_MESSAGE_BYTES,
)

from .schema import default_state_dir

DEFAULT_METRICS_ADDR = "127.0.0.1:9317"
METRICS_ADDR_ENV = "LRPILOT_METRICS_ADDR"


def default_metrics_addr() -> str:
    return os.environ.get(METRICS_ADDR_ENV) or DEFAULT_METRICS_ADDR


# Grafana credentials come from the environment (a flag would show in `ps`);
# `lrpilot dashboards push` reads the same variables.
# The daemon's key directory (a client's is $LRPILOT_KEYS: lrpilot.keys).
DAEMON_KEYS_ENV = "LRPILOT_DAEMON_KEYS"
GRAFANA_TOKEN_ENV = "LRPILOT_GRAFANA_TOKEN"
GRAFANA_USER_ENV = "LRPILOT_GRAFANA_USER"
GRAFANA_PASSWORD_ENV = "LRPILOT_GRAFANA_PASSWORD"
# Fields whose value is never printed (--help) nor logged: add_config_flags
# masks them, and SecretStr hides them from repr().
SECRET: dict[str, Any] = {"secret": True}


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def check_http_url(value: str, what: str = "URL") -> str:
    """An http(s) URL with a host and no credentials in it (they would end up
    in logs and in `ps`); the trailing slash dropped."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"expected a {what} like http://127.0.0.1:3000, got {value!r}")
    if parts.username or parts.password:
        raise UsageError(
            f"put no credentials in the {what}: use ${GRAFANA_TOKEN_ENV}, or "
            f"${GRAFANA_USER_ENV} and ${GRAFANA_PASSWORD_ENV}"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise UsageError(f"expected a {what} like http://127.0.0.1:3000, got {value!r}") from None
    return value.rstrip("/")


def is_loopback(address: str) -> bool:
    """A tcp:// address on this machine only, or an ipc:// / inproc:// one."""
    parts = urlsplit(address)
    if parts.scheme != "tcp":
        return parts.scheme in ("ipc", "inproc")
    host = parts.hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(
        default_factory=lambda: _env(DAEMON_ENV) or DEFAULT_DAEMON,
        description="ZeroMQ address the data plane (ROUTER) binds ($LRPILOT_DAEMON, which the "
        "hook reads too); off loopback only with --keys (or --insecure)",
    )
    control_address: str = Field(
        default_factory=lambda: _env(CONTROL_ENV) or DEFAULT_CONTROL,
        description="ZeroMQ address of the control plane (lrpilot runs, set-lr, policy, ...; "
        "$LRPILOT_CONTROL, which the CLI reads too); off loopback only with --keys (or "
        "--insecure)",
    )
    keys: Path | None = Field(
        default_factory=lambda: Path(found) if (found := _env(DAEMON_KEYS_ENV)) else None,
        description="the daemon's key directory (`lrpilot keys init DIR` makes it; "
        "$LRPILOT_DAEMON_KEYS): both planes then take only CURVE clients whose public key is "
        "in DIR/allowed/, each with its role (docs/security.md); SIGHUP reads allowed/ again",
    )
    insecure: bool = Field(
        default=False,
        description="let a plane bind an address other machines reach without --keys: anyone "
        "who can connect can report for any run, steer its decisions and (control plane) "
        "set its LRs (a warning is logged at every start)",
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=64,
        description="processes that serve the runs, each a whole daemon (loop, store, core) "
        "for the runs that hash to it, behind these same addresses: more than 1 for ~800 "
        "ranks or more at 100 steps/s (docs/scaling.md); fixed for a --state-dir",
    )
    shard_base_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="with --shards: shard k's data plane listens on this port + k, on the host "
        "of --address; ranks connect there once told to",
        json_schema_extra={"shown_default": "--address's port + 1000"},
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="where the store (SQLite) lives; $LRPILOT_STATE_DIR, else "
        "$XDG_STATE_HOME/lrpilot, else ~/.local/state/lrpilot",
    )
    durability: Literal["normal", "full"] = Field(
        default="normal",
        description="normal: a journal entry survives the daemon being killed; full: it "
        "also survives power loss (an fsync per commit)",
    )
    silence_timeout: float = Field(
        default=300.0,
        gt=0,
        le=7 * 86400,
        description="seconds without a message after which a session ends",
    )
    max_message_bytes: int = Field(
        default=MAX_MESSAGE_BYTES,
        ge=1024,
        le=256 << 20,
        description="larger messages are refused with an error (4 times this, the "
        "connection is dropped before the message is read whole)",
    )
    command_lead_steps: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="extra steps between a command and the step it takes effect (a policy's "
        "decision or an operator's): more gives every rank of a slow or far run time to apply "
        "it at the same step",
    )
    max_step_gap: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="steps a run's driver may skip between two records before the daemon "
        "takes the policy's step-driven state from the client instead of stepping through "
        "the gap (stepping through costs the daemon's one loop up to ~1 us a step: "
        "10,000 is ~10 ms)",
    )
    rank_wait_timeout: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="seconds a metric-driven decision of a run with several ranks waits for "
        "every connected rank's value of the step (the policy's reduce: mean, min, max); a "
        "rank silent for longer is left out of decisions, logged and shown, until it sends again",
    )
    rank_takeover_after: float = Field(
        default=10.0,
        gt=0,
        description="seconds a rank's session must have been silent before a new connection "
        "may take that rank over (a restarted process); a second live claim is refused",
    )
    max_runs: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="active runs (with a connected rank); a hello for more is refused (each "
        "shard's, with --shards)",
    )
    max_ended_runs: int = Field(
        default=10_000,
        ge=0,
        le=10_000_000,
        description="ended runs kept in memory (lrpilot runs, show); older ones are let go of "
        "and read back from the store if their training returns (each shard's, with --shards)",
    )
    max_metric_names: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="distinct metric names a run may report; values of more are not kept "
        "(counted as too_many_metrics)",
    )
    log_level: str = Field(default="info", description="debug, info, warning or error")
    metrics_addr: str = Field(
        default_factory=default_metrics_addr,
        description="HOST:PORT where Prometheus scrapes /metrics ($LRPILOT_METRICS_ADDR, else "
        f"{DEFAULT_METRICS_ADDR}; port 0 picks a free one; 'off' serves none)",
    )
    metrics_ttl: float = Field(
        default=600.0,
        ge=0,
        description="seconds the series of a run stay in /metrics after its last rank left",
    )
    grafana_url: str | None = Field(
        default=None,
        description="post a Grafana annotation for every LR change to this Grafana "
        "(http://HOST:3000); credentials from $LRPILOT_GRAFANA_TOKEN, or $LRPILOT_GRAFANA_USER "
        "and $LRPILOT_GRAFANA_PASSWORD",
    )
    grafana_token: SecretStr | None = Field(
        default_factory=lambda: _env(GRAFANA_TOKEN_ENV),
        validate_default=True,  # the environment's str becomes a SecretStr
        description="Grafana service account token ($LRPILOT_GRAFANA_TOKEN)",
        json_schema_extra=SECRET,
    )
    grafana_password: SecretStr | None = Field(
        default_factory=lambda: _env(GRAFANA_PASSWORD_ENV),
        validate_default=True,  # the environment's str becomes a SecretStr
        description="Grafana password for basic auth ($LRPILOT_GRAFANA_PASSWORD)",
        json_schema_extra=SECRET,
    )
    grafana_user: str | None = Field(
        default_factory=lambda: _env(GRAFANA_USER_ENV),
        validate_default=True,  # checked against the password, below
        description="Grafana user for basic auth ($LRPILOT_GRAFANA_USER)",
    )
    grafana_timeout: float = Field(
        default=2.0, gt=0, description="seconds to wait for Grafana to take one annotation"
    )
    grafana_queue_size: int = Field(
        default=1000,
        ge=1,
        description="LR changes waiting to be posted to Grafana; more are dropped and counted",
    )

    @field_validator("address", "control_address")
    @classmethod
    def _zmq_address(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(f"expected a ZeroMQ address like tcp://127.0.0.1:7311, got {value!r}")
        return value

    @model_validator(mode="after")
    def _exposed_without_keys(self) -> DaemonConfig:
        """Off loopback, anyone who reaches a plane could report for any run
        (data) or set its LRs (control): keys, or a deliberate --insecure."""
        if self.keys is not None or self.insecure:
            return self
        for flag, address in (("address", self.address), ("control-address", self.control_address)):
            if not is_loopback(address):
                raise ValueError(
                    f"--{flag} {address!r} is reachable from other machines and the daemon has "
                    "no keys: anyone could report for, steer and set the LRs of any run; give "
                    "--keys DIR (`lrpilot keys init DIR` makes them), or --insecure to bind it "
                    "anyway on a network you trust, or bind 127.0.0.1"
                )
        return self

    @model_validator(mode="after")
    def _shard_layout(self) -> DaemonConfig:
        if self.shards > 1:
            from .sharding import check_shard_ports

            check_shard_ports(self.address, self.shards, self.shard_base_port)
        return self

    @field_validator("metrics_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value == "off":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise ValueError(f"expected HOST:PORT like 127.0.0.1:9317 (or 'off'), got {value!r}")
        return value

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        """(host, port) to serve /metrics on, or None when it is off."""
        if self.metrics_addr == "off":
            return None
        host, _, port = self.metrics_addr.rpartition(":")
        return host.strip("[]"), int(port)

    @field_validator("grafana_url")
    @classmethod
    def _grafana_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "Grafana URL")

    @field_validator("grafana_user")
    @classmethod
    def _grafana_basic_auth(cls, value: str | None, info: ValidationInfo) -> str | None:
        """On the user, which comes after the secrets: an error shows the value
        it was given, and that must not be the password."""
        given = info.data
        half = bool(value) != bool(given.get("grafana_password"))
        if given.get("grafana_url") and half and not given.get("grafana_token"):
            raise ValueError(
                f"Grafana basic auth needs both ${GRAFANA_USER_ENV} and ${GRAFANA_PASSWORD_ENV}"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"expected debug, info, warning or error, got {value!r}")
        return value.lower()
