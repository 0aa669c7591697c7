"""The command line's side of the control plane: one request, one answer."""

from __future__ import annotations

import json
import os
from typing import Any

import zmq

from lrpilot.errors import LRPilotError
from lrpilot.protocol import CONTROL_ENV, DEFAULT_CONTROL

from ..service.control import MAX_CONTROL_BYTES


class ControlClientError(LRPilotError, RuntimeError):
    """No answer, or a refusal; the message is one line for the user."""


def control_address(given: str | None = None) -> str:
    return given or os.environ.get(CONTROL_ENV) or DEFAULT_CONTROL


def printable(text: object) -> str:
    """``text`` as a terminal should show it: every character Python does not
    count as printable (C0 and C1 controls such as ESC and newline, DEL, bidi
    overrides, line separators, lone surrogates) written as its ``\\xNN``,
    ``\\uNNNN`` or ``\\UNNNNNNNN`` escape. Run and group names, hosts, reasons
    and errors are chosen by whoever talks to the daemon: printed raw, they
    could recolour the terminal, move the cursor or forge a line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def request(address: str, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send ``payload`` to the daemon's control plane; its answer, or raise."""
    data = json.dumps(payload).encode()
    if len(data) > MAX_CONTROL_BYTES:
        # The daemon's socket drops a larger message unanswered: say why here.
        raise ControlClientError(
            f"the request is {len(data)} bytes, over the {MAX_CONTROL_BYTES} the daemon takes"
        )
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            raise ControlClientError(
                f"--control or ${CONTROL_ENV}: cannot connect to {address!r} ({exc.strerror}); "
                f"an address is like {DEFAULT_CONTROL}"
            ) from None
        sock.send(data)
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise ControlClientError(
                f"no answer from a daemon at {address} within {timeout:g}s "
                "(is `lrpilot daemon` running? --control or $LRPILOT_CONTROL sets the address)"
            )
        raw = sock.recv()
    finally:
        sock.close()
        context.term()
    return checked_answer(address, raw)


def checked_answer(address: str, raw: bytes) -> dict[str, Any]:
    """The daemon's answer as a JSON object, or the ControlClientError it is."""
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlClientError(f"the daemon at {address} answered something not a JSON object")
    if not answer.get("ok"):
        raise ControlClientError(str(answer.get("error") or "the daemon refused without a reason"))
    return answer
