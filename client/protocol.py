"""The wire protocol between the training hook and the daemon: the one place
that builds and parses frames.

Every message is a ZeroMQ multipart message whose first frame is a UTF-8 JSON
envelope ``{"v": PROTOCOL_VERSION, "t": TYPE, ...content}``. Control messages
(hello, welcome, command, processed, ack, bye, error) are that one frame.
A metrics batch adds a second, binary frame: the records packed as
little-endian ``int64`` step plus one ``float64`` per metric, in blocks of
records that share a shape (kind and metric names, listed once in the
envelope). Measured in bench/encoding.py: packing a batch costs about a third
of ``json.dumps`` of the same records and decoding it about half of
``json.loads`` (floats' text form is what JSON spends its time on).

Message types and their fields are the pydantic models below; receivers
validate every message with them and answer a bad one with an ``error``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from .errors import LRPilotError
from .policies.base import MAX_COUNT

PROTOCOL_VERSION: Final = 1
DEFAULT_DAEMON = "tcp://127.0.0.1:7311"
DAEMON_ENV = "LRPILOT_DAEMON"
DEFAULT_CONTROL = "tcp://127.0.0.1:7313"
CONTROL_ENV = "LRPILOT_CONTROL"
# A batch of 4096 records of 8 metrics packs to ~300 KiB; 4 MiB leaves room
# for the largest hello (policy state of a long sequential) with a margin.
MAX_MESSAGE_BYTES = 4 << 20
# Seconds an async client may hold its step records before it sends them (a
# report, a step with a metric its policy decides on, and lock-step records
# go at once): a message per rank and step would be what limits one daemon.
# The daemon's view of a rank's step is this much behind at most, which the
# lead of a command for several ranks covers.
SEND_INTERVAL = 0.1
# Every integer on the wire is bounded by MAX_COUNT (2**53, the policies'
# bound on step counts too): steps, seq numbers and versions fit a float64
# exactly (JSON readers elsewhere) and SQLite's int64 with room; a step count
# no training reaches (2**53 at 1 MHz is 285 years).
MAX_RANKS = 1 << 20  # world sizes: far above any cluster, far below a hostile int
MAX_GROUPS = 1024  # param groups per optimizer
MAX_METRICS = 256  # metric names in one record
MAX_SHAPES = 64  # record shapes (kind + names) in one batch
MAX_NAME = 200  # characters of a run, group, metric or host name
# Names a client chooses end up in terminals, logs and Prometheus labels:
# no control characters (ANSI escapes, newlines), C0, DEL or C1.
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]+$"
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=PRINTABLE)]
FiniteLR = Annotated[float, Field(ge=0, allow_inf_nan=False)]

STEP = "s"  # a record that is one optimizer step
REPORT = "r"  # metrics that are not a new step (pilot.report)


class ProtocolError(LRPilotError, ValueError):
    """A frame that does not follow the protocol; the message says how."""


class MessageTooLarge(ProtocolError):
    """A message over the receiver's size limit (refused before parsing)."""


class Message(BaseModel):
    # Policy state holds infinities (plateau's best before the first value):
    # write them as JSON's de-facto Infinity, which Python and pydantic read,
    # rather than pydantic's default null, which would lose them.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    v: Literal[1] = PROTOCOL_VERSION


class GroupInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    lr: FiniteLR


@dataclass(slots=True)
class ClientStats:
    """What the hook counts (``pilot.stats``) and reports with every batch.
    A plain dataclass: the hook bumps these on its hot path; pydantic
    validates it on the daemon's side all the same."""

    records_sent: Count = 0
    records_dropped: Count = 0
    sync_timeouts: Count = 0
    foreign_lr_writes: Count = 0
    commands_applied: Count = 0
    commands_late: Count = 0
    daemon_errors: Count = 0


STAT_FIELDS = tuple(ClientStats.__dataclass_fields__)


def stats_json(stats: ClientStats | Mapping[str, int]) -> str:
    if isinstance(stats, Mapping):
        return json.dumps(dict(stats))
    return "{" + ",".join(f'"{k}":{getattr(stats, k)}' for k in STAT_FIELDS) + "}"


class Hello(Message):
    """Client → daemon, first message of a session (and again after the daemon
    says it does not know the session, e.g. it was restarted)."""

    t: Literal["hello"] = "hello"
    run: Name
    rank: int = Field(0, ge=0, lt=MAX_RANKS)
    world_size: int = Field(1, ge=1, le=MAX_RANKS)
    host: str = Field("", max_length=MAX_NAME, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$")
    pid: int = Field(0, ge=0, le=2**31)
    groups: list[GroupInfo] = Field(min_length=1, max_length=MAX_GROUPS)
    policy: dict[str, Any] | None = None
    # When an operator's switch rebased it; a policy is built from these, so
    # they are LRs a policy takes (checked there, with the spec).
    policy_base_lrs: list[FiniteLR] | None = Field(None, max_length=MAX_GROUPS)
    policy_state: dict[str, Any] | None = None
    step: Count = 0
    # The client's last record (seq) that its policy state has taken in, and
    # the LRs an operator holds it at: what a daemon that lost its state
    # (a store that could not write, then a restart) takes the run back from.
    seq: Count = 0
    applied_version: Count = 0
    held: list[FiniteLR] | None = Field(None, max_length=MAX_GROUPS)
    sync: bool = False
    client_version: str = Field("", max_length=MAX_NAME, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$")
    # torchrun's restart count ($TORCHELASTIC_RESTART_COUNT): torchrun stops
    # every worker before it starts the next attempt, so a rank of a later
    # attempt takes its rank at once from a session of an earlier one.
    attempt: Count = 0

    @model_validator(mode="after")
    def _rank_in_world(self) -> Hello:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        return self


class LRCommand(Message):
    """Daemon → client: from ``effective_step`` on, the run's policy is in
    ``policy_state`` as of record ``state_step`` (with ``policy`` when the
    policy itself changes). ``lrs`` are the LRs that state gives."""

    t: Literal["command"] = "command"
    run: str
    version: Annotated[int, Field(ge=1, le=MAX_COUNT)]
    effective_step: Count
    state_step: Count
    lrs: list[FiniteLR]  # written into the optimizer as they are
    policy: dict[str, Any] | None = None
    # Whether this command sets the policy: then ``policy`` null means "no
    # policy"; otherwise null means "the policy the client runs".
    policy_set: bool = False
    # The LRs ``policy`` is built from (an operator's switch starts the new
    # policy from the LRs in effect, not the run's first ones).
    base_lrs: list[FiniteLR] | None = None
    policy_state: dict[str, Any] | None = None
    # An operator holds the LRs at ``lrs`` (set-lr, pause): the client keeps
    # stepping its policy but writes ``lrs`` until a command without hold.
    hold: bool = False
    reason: str = ""
    actor: str = "policy"


class Welcome(Message):
    """Daemon → client, the answer to hello; ``command`` when the daemon's
    state for the run differs from what the client said it has."""

    t: Literal["welcome"] = "welcome"
    run: str
    version: int = 0
    command: LRCommand | None = None


class Moved(Message):
    """Daemon → client, the answer to hello from a daemon of several shards:
    ``run`` is served at ``address``; say hello there. The client keeps the
    host it was given and takes only the port (tcp), so that the shard is
    reached the way the daemon was."""

    t: Literal["moved"] = "moved"
    run: str
    address: str = Field(max_length=1024, pattern=r"^(tcp|ipc)://[^\x00-\x1f\x7f-\x9f]+$")


class Processed(Message):
    """Daemon → a sync-mode client: every record up to ``seq`` is processed."""

    t: Literal["processed"] = "processed"
    run: str
    seq: Count


class Persisted(Message):
    """Daemon → client: records up to ``seq`` are in the daemon's store; the
    client keeps later ones to send again if the daemon restarts."""

    t: Literal["persisted"] = "persisted"
    run: str
    seq: Count

    @staticmethod
    def frame(run: str, seq: int) -> bytes:
        """``encode(Persisted(run=run, seq=seq))``, without building the model:
        the daemon sends one per client and tick."""
        # A run id came in a hello pydantic parsed: no lone surrogate in it.
        name = json.dumps(run, ensure_ascii=False).encode()
        return b'{"v":%d,"t":"persisted","run":%s,"seq":%d}' % (PROTOCOL_VERSION, name, seq)


class Ack(Message):
    """Client → daemon: command ``version`` was applied before optimizer step
    ``applied_step``; ``late`` when that is after its effective step."""

    t: Literal["ack"] = "ack"
    run: Name
    rank: int = Field(0, ge=0, lt=MAX_RANKS)
    version: Count
    applied_step: Count
    late: bool


class Bye(Message):
    t: Literal["bye"] = "bye"
    run: Name
    rank: int = Field(0, ge=0, lt=MAX_RANKS)
    step: Count = 0
    stats: ClientStats = Field(default_factory=ClientStats)


class Error(Message):
    t: Literal["error"] = "error"
    code: str
    message: str


class MetricsHeader(Message):
    """Envelope of a metrics batch. ``shapes[i]`` is ``[kind, names]``;
    ``blocks`` is ``[[shape, count], ...]`` in record order; ``first_seq`` is
    the client's sequence number of the first record."""

    t: Literal["metrics"] = "metrics"
    run: Name
    rank: int = Field(0, ge=0, lt=MAX_RANKS)
    first_seq: Annotated[int, Field(ge=1, le=MAX_COUNT)]
    shapes: list[tuple[Literal["s", "r"], Annotated[list[Name], Field(max_length=MAX_METRICS)]]] = (
        Field(max_length=MAX_SHAPES)
    )
    blocks: list[tuple[Annotated[int, Field(ge=0, lt=MAX_SHAPES)], Annotated[int, Field(ge=1)]]]
    stats: ClientStats | None = None


ControlMessage = Annotated[
    Hello | Welcome | Moved | LRCommand | Processed | Persisted | Ack | Bye | Error | MetricsHeader,
    Field(discriminator="t"),
]
_CONTROL: TypeAdapter[Any] = TypeAdapter(ControlMessage)


def encode(message: Message) -> bytes:
    return message.model_dump_json(exclude_defaults=False).encode()


def decode(frames: Sequence[bytes], max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate the first frame of a message; ProtocolError if bad,
    MessageTooLarge if the frames add up to more than ``max_bytes``."""
    if not frames:
        raise ProtocolError("empty message")
    size = sum(len(f) for f in frames)
    if size > max_bytes:
        raise MessageTooLarge(f"message of {size} bytes exceeds the limit of {max_bytes}")
    try:
        message = _CONTROL.validate_json(frames[0])
    except ValidationError as exc:
        raise ProtocolError(describe(exc)) from None
    if isinstance(message, MetricsHeader) and len(frames) != 2:
        raise ProtocolError(f"metrics: expected 2 frames (header, records), got {len(frames)}")
    if not isinstance(message, MetricsHeader) and len(frames) != 1:
        raise ProtocolError(f"{message.t}: expected 1 frame, got {len(frames)}")
    return message


def describe(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "message"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


# --- metrics batches -------------------------------------------------------

# (seq, step, STEP | REPORT, metrics): seq numbers every record a pilot sends.
Record = tuple[int, int, str, Mapping[str, Any]]


class BatchEncoder:
    """Packs records into (header, body) frames for the hook. The header is
    written by hand from pre-rendered parts: ``json.dumps`` of the header was
    ~50 µs of every send at 1 kHz, pydantic more. The daemon validates it with
    :class:`MetricsHeader`. Struct packers and shape lists are cached across
    batches: a loop reports the same metric names every step."""

    def __init__(self, run: str, rank: int) -> None:
        self._prefix = (
            f'{{"v":{PROTOCOL_VERSION},"t":"metrics","run":{json.dumps(run)},"rank":{rank},'
        )
        self._packers: dict[int, struct.Struct] = {}
        self._shapes_json: dict[tuple, str] = {}

    def encode(
        self, records: Sequence[Record], stats: ClientStats | Mapping[str, int]
    ) -> list[bytes]:
        shapes: dict[tuple[str, tuple[str, ...]], int] = {}
        blocks: list[list[int]] = []
        parts: list[bytes] = []
        last = -1
        for _, step, kind, metrics in records:
            key = (kind, tuple(metrics))
            shape = shapes.get(key)
            if shape is None:
                shape = shapes[key] = len(shapes)
            if shape == last:
                blocks[-1][1] += 1
            else:
                blocks.append([shape, 1])
                last = shape
            packer = self._packers.get(len(metrics))
            if packer is None:
                packer = self._packers[len(metrics)] = struct.Struct(f"<q{len(metrics)}d")
            parts.append(packer.pack(step, *metrics.values()))  # floats: the hook made sure
        shape_key = tuple(shapes)
        shapes_json = self._shapes_json.get(shape_key)
        if shapes_json is None:
            shapes_json = json.dumps([[kind, list(names)] for kind, names in shape_key])
            self._shapes_json[shape_key] = shapes_json
        header = (
            f'{self._prefix}"first_seq":{records[0][0]},"shapes":{shapes_json},'
            f'"blocks":[{",".join(f"[{s},{c}]" for s, c in blocks)}],'
            f'"stats":{stats_json(stats)}}}'
        )
        return [header.encode(), b"".join(parts)]


def record_layouts(
    header: MetricsHeader, body: bytes
) -> list[tuple[struct.Struct, str, list[str], int]]:
    """Check that ``body`` is what ``header`` describes; the per-block layouts.
    ProtocolError if not."""
    expected = 0
    layouts: list[tuple[struct.Struct, str, list[str], int]] = []
    for shape, count in header.blocks:
        if not 0 <= shape < len(header.shapes):
            raise ProtocolError(f"metrics.blocks: shape {shape} is not in shapes")
        kind, names = header.shapes[shape]
        packer = struct.Struct(f"<q{len(names)}d")
        layouts.append((packer, kind, names, count))
        expected += packer.size * count
    if expected != len(body):
        raise ProtocolError(f"metrics: body is {len(body)} bytes, the header describes {expected}")
    return layouts


def decode_records(
    header: MetricsHeader, body: bytes
) -> Iterator[tuple[int, str, dict[str, float]]]:
    """Yield (step, kind, metrics) from a batch; ProtocolError (before the
    first record) if the body does not match the header. Non-finite values are
    yielded as they are: whether a NaN is an error is the receiver's call."""
    layouts = record_layouts(header, body)
    offset = 0
    for packer, kind, names, count in layouts:
        end = offset + packer.size * count
        for step, *values in packer.iter_unpack(body[offset:end]):
            yield step, kind, dict(zip(names, values))
        offset = end


def first_non_finite(metrics: Mapping[str, float]) -> str | None:
    """The name of the first non-finite metric, or None when all are finite."""
    if math.isfinite(sum(metrics.values())):
        return None
    for name, value in metrics.items():
        if not math.isfinite(value):
            return name
    return None  # only the sum overflowed
