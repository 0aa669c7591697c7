"""The command line's side of the control plane: one request, one answer."""

from __future__ import annotations

import json
import os
from typing import Any

import zmq

from lrpilot.protocol import CONTROL_ENV, DEFAULT_CONTROL


class ControlClientError(RuntimeError):
    """No answer, or a refusal; the message is one line for the user."""


def control_address(given: str | None = None) -> str:
    return given or os.environ.get(CONTROL_ENV) or DEFAULT_CONTROL


def request(address: str, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send ``payload`` to the daemon's control plane; its answer, or raise."""
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(json.dumps(payload).encode())
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise ControlClientError(
                f"no answer from a daemon at {address} within {timeout:g}s "
                "(is `lrpilot daemon` running? --control or $LRPILOT_CONTROL sets the address)"
            )
        answer = json.loads(sock.recv())
    finally:
        sock.close()
        context.term()
    if not answer.get("ok"):
        raise ControlClientError(answer.get("error", "the daemon refused without a reason"))
    return answer
