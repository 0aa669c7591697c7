"""The command line's side of the control plane: :class:`ControlClient`."""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

import zmq
from pydantic import ValidationError

from lrpilot.errors import LRPilotError
from lrpilot.keys import ClientKeys
from lrpilot.protocol import CONTROL_ENV, DEFAULT_CONTROL, LRCommand, describe

from ..control_protocol import (
    MAX_CONTROL_BYTES,
    Answer,
    CommandAnswer,
    HistoryAnswer,
    JournalEntry,
    RunDetail,
    RunsAnswer,
    RunSummary,
    ShowAnswer,
    StoreAnswer,
)

A = TypeVar("A", bound=Answer)


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


class ControlClient:
    """The operator's side of the control plane, for the ``lrpilot`` commands
    and ``top``: one REQ socket to the daemon's control address, one request
    at a time, answers read into the control protocol's models.

    Blocking: ``runs()``, ``show()``, ``history()``, ``set_lr()``,
    ``pause()``, ``resume()``, ``policy()``, ``range_test()``, ``store()``, each its answer or a
    ControlClientError (no answer within ``timeout``, or the daemon's one-line
    refusal). Without blocking (``top``): :meth:`send`, poll :attr:`socket`,
    :meth:`receive`; a request that got no answer is dropped with its socket
    (:meth:`reset`), since a REQ socket cannot send again before it hears back.
    """

    def __init__(
        self,
        address: str,
        timeout: float = 5.0,
        actor: str | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.actor = actor  # who a change is journaled as (a daemon with keys: the key's name)
        self.keys = keys
        self._context = zmq.Context()
        self.socket: zmq.Socket | None = None
        self._op = ""

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- typed requests ----------------------------------------------------

    def runs(self) -> list[RunSummary]:
        return self._ask(RunsAnswer, op="runs").runs

    def show(self, run: str) -> RunDetail:
        return self._ask(ShowAnswer, op="show", run=run).run

    def history(self, run: str, limit: int | None = None) -> list[JournalEntry]:
        return self._ask(HistoryAnswer, op="history", run=run, limit=limit).history

    def set_lr(self, run: str, lr: float, group: str | None = None) -> LRCommand:
        return self._ask(CommandAnswer, op="set_lr", run=run, lr=lr, group=group).command

    def pause(self, run: str) -> LRCommand:
        return self._ask(CommandAnswer, op="pause", run=run).command

    def resume(self, run: str) -> LRCommand:
        return self._ask(CommandAnswer, op="resume", run=run).command

    def policy(self, run: str, policy: dict[str, Any] | None) -> LRCommand:
        """Switch the run to ``policy``; None gives back the script's own."""
        return self._ask(CommandAnswer, op="policy", run=run, policy=policy).command

    def range_test(self, run: str, sweep: dict[str, Any], suggest_only: bool = False) -> LRCommand:
        """Start an LR range test on the run (``sweep``: the range_test fields
        to set); the run's policy, or ``then``, follows it."""
        return self._ask(
            CommandAnswer, op="range_test", run=run, sweep=sweep, suggest_only=suggest_only
        ).command

    def store(self, run: str | None = None) -> str:
        """The daemon's store path, once the daemon has committed what it has:
        of ``run``'s shard, for a daemon of several shards."""
        fields = {"run": run} if run is not None else {}
        return self._ask(StoreAnswer, op="store", **fields).path

    def _ask(self, kind: type[A], **fields: Any) -> A:
        if self.actor is not None:
            fields["actor"] = self.actor
        return self.read(kind, self.call(fields))

    def read(self, kind: type[A], answer: dict[str, Any]) -> A:
        try:
            return kind.model_validate(answer)
        except ValidationError as exc:
            raise ControlClientError(
                f"the daemon at {self.address} answered with something this lrpilot cannot "
                f"read as {kind.__name__} ({describe(exc)}); is it another version?"
            ) from None

    # --- one request, raw --------------------------------------------------

    def call(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send ``payload`` (a request as a JSON object) and wait for the
        answer: the answer as a JSON object, or ControlClientError."""
        self.send(payload)
        assert self.socket is not None
        if not self.socket.poll(int(self.timeout * 1000), zmq.POLLIN):
            self.reset()
            keys = (
                f"with the keys in {self.keys.where}"
                if self.keys is not None
                else "without keys (a daemon with --keys refuses those: --keys or $LRPILOT_KEYS)"
            )
            raise ControlClientError(
                f"no answer from a daemon at {self.address} within {self.timeout:g}s, asked "
                f"{keys} (is `lrpilot daemon` running? --control or $LRPILOT_CONTROL sets the "
                "address)"
            )
        return self.receive()

    def send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        if len(data) > MAX_CONTROL_BYTES:
            # The daemon's socket drops a larger message unanswered: say why here.
            raise ControlClientError(
                f"the request is {len(data)} bytes, over the {MAX_CONTROL_BYTES} the daemon takes"
            )
        if self.socket is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            if self.keys is not None:
                self.keys.apply(sock)
            try:
                sock.connect(self.address)
            except zmq.ZMQError as exc:
                sock.close()
                raise ControlClientError(
                    f"--control or ${CONTROL_ENV}: cannot connect to {self.address!r} "
                    f"({exc.strerror}); an address is like {DEFAULT_CONTROL}"
                ) from None
            self.socket = sock
        self.socket.send(data)

    def receive(self) -> dict[str, Any]:
        """The answer to the request sent (the socket has it: poll first)."""
        assert self.socket is not None, "send() first"
        return checked_answer(self.address, self.socket.recv())

    def reset(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def close(self) -> None:
        self.reset()
        self._context.term()


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
