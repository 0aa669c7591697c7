"""``DaemonConfig``: every option of the daemon, its default and its check.

The command line maps its flags one to one onto these fields; tests build a
config directly and run a :class:`~lrpilot.daemon.server.Daemon` with it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lrpilot.protocol import DEFAULT_CONTROL, DEFAULT_DAEMON, MAX_MESSAGE_BYTES

from .store import default_state_dir


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(DEFAULT_DAEMON, description="ZeroMQ address the data plane (ROUTER) binds")
    control_address: str = Field(
        DEFAULT_CONTROL,
        description="ZeroMQ address of the control plane (lrpilot runs, set-lr, policy, ...); "
        "loopback only until control traffic can be authenticated",
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="where the store (SQLite) lives; $LRPILOT_STATE_DIR, else "
        "$XDG_STATE_HOME/lrpilot, else ~/.local/state/lrpilot",
    )
    durability: Literal["normal", "full"] = Field(
        "normal",
        description="normal: a journal entry survives the daemon being killed; full: it "
        "also survives power loss (an fsync per commit)",
    )
    silence_timeout: float = Field(
        300.0, gt=0, description="seconds without a message after which a session ends"
    )
    max_message_bytes: int = Field(
        MAX_MESSAGE_BYTES, ge=1024, description="larger messages are refused with an error"
    )
    command_lead_steps: int = Field(
        0,
        ge=0,
        description="a metric-driven command takes effect this many steps after the record "
        "that caused it (more gives every rank time to apply it at the same step)",
    )
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("address", "control_address")
    @classmethod
    def _zmq_address(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(f"expected a ZeroMQ address like tcp://127.0.0.1:7311, got {value!r}")
        return value

    @field_validator("control_address")
    @classmethod
    def _loopback(cls, value: str) -> str:
        """Anyone who reaches the control plane can steer every run."""
        parts = urlsplit(value)
        if parts.scheme == "tcp":
            host = parts.hostname or ""
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(
                    f"the control plane must be on loopback (127.0.0.1), got {value!r}"
                )
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"expected debug, info, warning or error, got {value!r}")
        return value.lower()
