"""The training-side hook: ``lrpilot.attach(optimizer)`` returns a :class:`Pilot`.

The pilot counts the optimizer's real steps (torch's optimizer step hooks:
gradient accumulation and steps a GradScaler skips are not steps), evaluates
the run's policy locally at each (so step-driven schedules are exact and go
on while the daemon is away), and applies the daemon's versioned LR commands
(metric-driven decisions, overrides) at the step they name. ``pilot.step(**metrics)``
once per batch gives the metrics of the last real step and talks to the
daemon. It never waits for the daemon unless ``sync=True``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from . import __version__
from .device_reads import DeviceRead, device_type
from .errors import UsageError
from .keys import ClientKeys, find_client_keys
from .policies import (
    NO_METRICS,
    Policy,
    PolicySpec,
    ScheduleExhausted,
    SpecError,
    Trip,
    parse_policy,
)
from .protocol import (
    DAEMON_ENV,
    DEFAULT_DAEMON,
    MAX_NAME,
    PROTOCOL_VERSION,
    REPORT,
    SEND_INTERVAL,
    STEP,
    Ack,
    BatchEncoder,
    Bye,
    ClientStats,
    Error,
    GroupInfo,
    Hello,
    LRCommand,
    Moved,
    Persisted,
    Processed,
    ProtocolError,
    Welcome,
    decode,
    encode,
)
from .sweep_copy import SweepCopy
from .transport import POLLIN, POLLOUT, DaemonLink, LinkError, redirected

# Records per metrics message: big enough that a burst after the daemon comes
# back drains in few messages, small enough that one stays well under 100 KiB.
MAX_BATCH = 256
# Moves (a daemon of several shards sending this run to its shard) before a
# welcome: one is the rule, a second follows a shard count changed under a
# running job; more is a loop between misconfigured daemons.
MAX_MOVES = 4
# With a policy that decides on metrics, an async pilot sends its step records
# once this many are queued (or SEND_INTERVAL has passed): a report's message
# then carries few of them, and the daemon, which folds every record before
# the report in, decides within a millisecond at 1 kHz (bench/latency.py).
# Below ~300 steps/s the interval comes first, so the message rate of a
# cluster's ranks is as low as ever (bench/load.py).
DECIDING_BATCH = 32
# How often (seconds) an async pilot looks for commands: at most once a
# millisecond, so a 1 kHz loop hears a decision within a step or two.
IO_INTERVAL = 0.001
# Records held while the daemon is away (~100 s at 1 kHz); then the oldest go.
MAX_QUEUE = 100_000
# A sync step that has heard nothing this long sends its unpersisted records
# again (its daemon may have died with them); then again, until sync_timeout.
RESEND_AFTER_MS = 500
# After a report, an async pilot looks for the daemon's answer at every step
# (the answer, or the persisted ack, comes within ~100 ms), but no longer
# than this (seconds): a daemon that is away must not cost every step an I/O.
DECISION_WAIT = 0.2
# Acks kept to send again to a restarted daemon: commands are seconds apart at
# most, so the last few cover any restart.
RECENT_ACKS = 32

# Control characters (ANSI escapes, newlines) in a name the daemon prints.
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

log = logging.getLogger("lrpilot")

ChangeCallback = Callable[[int, list[float], list[float], str, str], None]


def attach(
    optimizer: Any,
    run: str | None = None,
    policy: Mapping[str, Any] | PolicySpec | None = None,
    daemon: str | None = None,
    sync: bool = False,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    sync_timeout: float = 1.0,
    max_queue: int = MAX_QUEUE,
    on_change: ChangeCallback | None = None,
    steps: str = "auto",
    keys: str | os.PathLike[str] | None = None,
    model: Any = None,
) -> Pilot:
    """Attach lrpilot to ``optimizer`` (anything with torch-style ``param_groups``).

    - ``run``: the run id every rank shares; default ``$LRPILOT_RUN``, else
      ``$TORCHELASTIC_RUN_ID`` under torchrun, else host-pid-time.
    - ``policy``: a policy spec (dict or model, see docs/policies.md); ``None``
      holds the LRs where they are until the daemon says otherwise.
    - ``daemon``: ZeroMQ address; default ``$LRPILOT_DAEMON``, else
      ``tcp://127.0.0.1:7311`` (what ``lrpilot daemon`` binds).
    - ``sync``: lock-step; each ``step()``/``report()`` waits (up to
      ``sync_timeout`` seconds) until the daemon has processed it, so the LRs
      equal ``lrpilot simulate`` on the same metrics step for step.
    - ``on_change(step, old_lrs, new_lrs, reason, actor)``: called when a
      daemon command changes the LRs, before optimizer step ``step``.
    - ``rank``, ``world_size``: from ``torch.distributed`` when it is
      initialised, else ``$RANK`` and ``$WORLD_SIZE`` (as torch reads them).
    - ``steps``: what a step is. ``"optimizer"``: the optimizer's real steps,
      through torch's step hooks (accumulation and skipped steps are right
      with no effort); ``"calls"``: each ``pilot.step()``; ``"auto"``
      (default): the optimizer's when it has step hooks (torch >= 2.0).
    - ``keys``: this client's key directory for a daemon with keys
      (``client.key_secret`` and ``daemon.key``; docs/security.md); default
      ``$LRPILOT_KEYS``, else ``~/.config/lrpilot/keys`` when it exists.
    - ``model``: the model, only for an LR range test (``range_test``): its
      buffers (BatchNorm's statistics) are put back with the parameters and
      the optimizer's state when the sweep ends (docs/hook.md).
    """
    found_rank, found_world = distributed_rank()
    return Pilot(
        optimizer,
        run=run or default_run_id(),
        policy=policy,
        daemon=daemon or os.environ.get(DAEMON_ENV) or DEFAULT_DAEMON,
        sync=sync,
        rank=found_rank if rank is None else rank,
        world_size=found_world if world_size is None else world_size,
        sync_timeout=sync_timeout,
        max_queue=max_queue,
        on_change=on_change,
        steps=steps,
        keys=find_client_keys(keys),
        model=model,
    )


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process: ``torch.distributed``'s when it is
    initialised (Lightning, Accelerate and ``mp.spawn`` set it up, and do not
    all set ``$RANK``), else the launcher's ``$RANK`` and ``$WORLD_SIZE``, as
    torch's env:// rendezvous reads them; 0 and 1 when neither says. torch
    is not imported for this: a process that has not imported it has not
    initialised it."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    found = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1)):
        text = os.environ.get(name, "")
        try:
            found.append(int(text) if text.strip() else default)
        except ValueError:
            raise UsageError(f"lrpilot.attach: ${name} must be an integer, got {text!r}") from None
    return found[0], found[1]


def innermost(optimizer: Any) -> Any:
    """The optimizer that really steps: Accelerate's ``AcceleratedOptimizer``
    and Lightning's ``LightningOptimizer`` wrap a torch optimizer (as
    ``.optimizer`` and ``._optimizer``) and call its ``step()`` only on a
    real step, so its step hooks count those; the wrappers' own do not fire."""
    seen = optimizer
    for _ in range(8):  # wrappers of wrappers, never a cycle
        inner = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
        if (
            inner is None
            or inner is seen
            or not isinstance(getattr(inner, "param_groups", None), list)
        ):
            return seen
        seen = inner
    return seen


def as_float(name: str, value: Any) -> float:
    """A metric value as a float: numbers, numpy scalars, 0-d tensors; not text."""
    if not isinstance(value, (str, bytes)):
        if getattr(value, "requires_grad", False):
            # `loss=loss` straight from backward(): torch warns when a tensor
            # that needs grad becomes a float; the value is the same detached.
            value = value.detach()
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"lrpilot: metric {name!r} must be a number, got {type(value).__name__}")


def as_number(name: str, value: Any) -> Any:
    """A metric value as a float, or, for a one-element tensor on a device
    with a reader (CUDA), the tensor itself: read later without waiting
    (client/device_reads.py)."""
    if device_type(value) is not None:
        if value.numel() != 1:  # metadata: no wait on the device
            raise TypeError(
                f"lrpilot: metric {name!r} must be a number, got a tensor of {value.numel()} values"
            )
        return value
    return as_float(name, value)


def caller_stacklevel() -> int:
    """The stacklevel that points a warning at the first frame outside
    lrpilot (the user's training loop), however deep the call came from."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("lrpilot"):
        frame = frame.f_back
        level += 1
    return level


def check_run_id(run: str) -> None:
    if not isinstance(run, str) or not 0 < len(run) <= MAX_NAME or UNPRINTABLE.search(run):
        raise UsageError(
            f"lrpilot.attach: run must be 1 to {MAX_NAME} printable characters, got {run!r}"
        )


def group_name(group: Mapping[str, Any], index: int) -> str:
    """A param group's name as the daemon shows it: printable, bounded."""
    name = UNPRINTABLE.sub("?", str(group.get("name", index)))[:MAX_NAME]
    return name or str(index)


def base_lr(group: Mapping[str, Any]) -> float:
    """The LR a policy starts from: torch's ``initial_lr`` where a scheduler
    left one (a warmup may have scaled ``lr`` down, even to 0), else ``lr``."""
    lr = group.get("initial_lr", group["lr"])
    try:
        return float(lr)
    except (TypeError, ValueError):
        return math.nan


def current_lrs(groups: list[dict[str, Any]]) -> list[float]:
    """The groups' LRs as floats (one that is not a number: its base LR)."""
    found = []
    for group in groups:
        try:
            found.append(float(group["lr"]))
        except (TypeError, ValueError):
            found.append(base_lr(group))
    return found


def uses_metrics(spec: PolicySpec) -> bool:
    """Whether a policy's state depends on the metrics it is given."""
    return bool(spec.reduced_metrics())


def restart_attempt() -> int:
    """torchrun's restart count of this worker (0 outside torchrun, or when
    it does not parse: it only orders a job's attempts)."""
    text = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0


def default_run_id() -> str:
    env = os.environ.get("LRPILOT_RUN") or os.environ.get("TORCHELASTIC_RUN_ID")
    if env and env != "none":
        return env
    return f"{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}"


class Pilot:
    """The hook on one optimizer (one rank). See :func:`attach`."""

    def __init__(
        self,
        optimizer: Any,
        *,
        run: str,
        policy: Mapping[str, Any] | PolicySpec | None,
        daemon: str,
        sync: bool,
        rank: int,
        world_size: int,
        sync_timeout: float,
        max_queue: int,
        on_change: ChangeCallback | None,
        steps: str = "auto",
        keys: ClientKeys | None = None,
        model: Any = None,
    ) -> None:
        optimizer = innermost(optimizer)
        if steps not in ("auto", "optimizer", "calls"):
            raise UsageError(
                f"lrpilot.attach: steps must be auto, optimizer or calls, got {steps!r}"
            )
        if steps == "optimizer" and not callable(
            getattr(optimizer, "register_step_post_hook", None)
        ):
            raise UsageError(
                "lrpilot.attach: steps='optimizer' needs an optimizer with torch's step hooks "
                "(register_step_post_hook, torch >= 2.0); use steps='calls'"
            )
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not groups or not all("lr" in g for g in groups):
            raise TypeError("lrpilot.attach: optimizer must have param_groups with an 'lr' each")
        check_run_id(run)
        if not 0 <= rank < world_size:
            raise UsageError(
                f"lrpilot.attach: rank {rank} is not in 0..world_size-1 ({world_size})"
            )
        self.run, self.rank, self.world_size, self.sync = run, rank, world_size, sync
        self.attempt = restart_attempt()  # torchrun's restart count, in the hello
        self.sync_timeout = sync_timeout
        self.group_names = [group_name(g, i) for i, g in enumerate(groups)]
        self.base_lrs = [base_lr(g) for g in groups]
        self.stats = ClientStats()
        self.step_count = 0
        self._optimizer = optimizer
        self._groups = groups
        self._warned: set[str] = set()
        # Capturable optimizers keep the LR in a tensor: write it in place, and
        # do not compare it (that would wait on the device every step).
        self._tensor_lrs = any(hasattr(g["lr"], "fill_") for g in groups)
        self._spec = self._usable_spec(policy)
        self._policy: Policy | None = self._spec.build(self.base_lrs) if self._spec else None
        self._mirror = self._mirror_of(self._spec, self._policy, self.base_lrs)
        self._policy_base = list(self.base_lrs)  # an operator's switch rebases the policy
        self._held: list[float] | None = None  # LRs an operator holds (set-lr, pause)
        self._exhausted = False
        # What lrpilot left in the groups: the policy's LRs (written below),
        # or with no policy the LRs as they are (a warmup's scheduler may
        # have left less than initial_lr there: held, not put back).
        self._left: list[float] = (
            list(self.base_lrs) if self._policy is not None else current_lrs(groups)
        )
        self._on_change = on_change
        self._seq = 0
        self._max_queue = max(1, max_queue)
        self._queue: deque = deque(maxlen=self._max_queue)
        # Sent, not yet persisted by the daemon: sent again after a restart.
        self._unacked: deque = deque(maxlen=self._max_queue)
        self._last_io = 0.0  # the last send (and look)
        self._last_look = 0.0  # the last look for what the daemon sent
        self._watched: frozenset[str] = frozenset()  # the metrics the policy decides on
        self._send_every = MAX_BATCH  # step records an async pilot holds at most
        self._watch()
        self._io_seq = 0
        self._await_until = 0.0  # report(): look for the answer every step until then
        self._pending: list[LRCommand] = []
        self._acks: deque[Ack] = deque(maxlen=RECENT_ACKS)  # sent again after a restart
        self._applied_version = 0
        self._processed_seq = 0
        self._daemon_silent = False
        self._closed = False
        self._recorded = 0  # the last step whose STEP record is queued
        # Metrics of calls since the last real step (accumulation, a skipped
        # step): name -> (sum, count), averaged into the next step's record.
        self._held_metrics: dict[str, tuple[Any, int]] = {}
        self._mirror_from = -1  # records at or before this step do not feed the mirror
        # Records whose values are still on a device (CUDA), oldest first:
        # (step, kind, metrics, DeviceRead or None), queued once read.
        self._reading: deque = deque()
        self._device_values = False  # a metric was ever a device tensor
        self._encoder = BatchEncoder(run, rank)
        self._identity = uuid.uuid4().bytes
        self._daemon_address, self._keys = daemon, keys
        self._link = DaemonLink(daemon, identity=self._identity, keys=keys)
        self._moves = 0  # moved answers since the last welcome (a loop is a bug)
        self._model = model
        self._sweep: SweepCopy | None = None  # while a range test sweeps
        # The guard's trip applied since the last pilot.step() call (the loop
        # reads it after that call), and the count of trips this rank applied.
        self.tripped: Trip | None = None
        self._trip_fresh: Trip | None = None
        self.trips = 0
        if self._policy is not None:
            self._follow_sweep()
            self._write(self._policy)
        self._hook_optimizer(optimizer, steps)
        # Hello waits for the first step, report or load_state_dict: a pilot
        # about to load a checkpoint must not first tell the daemon it is at
        # step 0 (the daemon would take that for a restart from scratch).
        self._said_hello = False

    def _usable_spec(self, policy: Mapping[str, Any] | PolicySpec | None) -> PolicySpec | None:
        """The policy's spec, or None (with one warning) when a group's base
        LR is unusable: a training job must not die at attach for the LRs it
        had (a warmup that left 0 without initial_lr); it runs on, unsteered."""
        spec = parse_policy(policy) if policy is not None else None
        unusable = [
            (name, lr)
            for name, lr in zip(self.group_names, self.base_lrs)
            if not (math.isfinite(lr) and lr > 0)
        ]
        if spec is None or not unusable:
            return spec
        name, lr = unusable[0]
        self._warn_once(
            "base-lr",
            f"param group {name!r} has lr={lr} at attach (and no torch initial_lr): a policy "
            "needs positive base LRs, so this run goes on without one (telemetry only); "
            "attach before any scheduler changes the LRs, or give the groups their LRs",
        )
        return None

    def _hook_optimizer(self, optimizer: Any, steps: str) -> None:
        """Torch's step hooks. The pre-hook: what optimizer.step() uses must
        be lrpilot's LR, also when something writes the groups between
        pilot.step() and optimizer.step() (Lightning steps a
        ReduceLROnPlateau there). The post-hook: a step is one the optimizer
        took, not a call (accumulation, a GradScaler's skipped steps)."""
        register_post = getattr(optimizer, "register_step_post_hook", None)
        self.counts_optimizer_steps = steps != "calls" and callable(register_post)
        register = getattr(optimizer, "register_step_pre_hook", None)
        self._step_hook = register(self._before_optimizer_step) if callable(register) else None
        self._post_hook = (
            register_post(self._after_optimizer_step)
            if self.counts_optimizer_steps and callable(register_post)
            else None
        )

    # --- the hot path -----------------------------------------------------

    def step(self, **metrics: Any) -> None:
        """Once per batch, after ``optimizer.step()``: ``metrics`` are the
        values of the optimizer's last step (numbers, numpy scalars or 0-d
        tensors). Where the optimizer did not step since the last call
        (gradient accumulation, a step a GradScaler skipped) they are held
        and averaged into the next real step's record. With ``steps='calls'``
        each call is a step. Leaves the next step's LRs in the groups."""
        for name, value in metrics.items():
            if type(value) is not float:
                metrics[name] = number = as_number(name, value)
                self._device_values |= type(number) is not float
        # A trip applied since the last call (the optimizer's pre-hook applies
        # due commands too) shows until the next call; one applied in this
        # call shows from now.
        self.tripped, self._trip_fresh = self._trip_fresh, None
        if not self._said_hello:
            self._send_hello()  # as of before this step: the daemon takes it next
        if self._optimizer.param_groups is not self._groups:
            self._regroup()
        # Something that wrote the groups since (a torch scheduler stepped
        # after the optimizer) is undone here, so the groups show lrpilot's
        # LRs after every call; the pre-hook is the last line before a step.
        if not self._tensor_lrs:
            for group, lr in zip(self._groups, self._left):
                if group["lr"] != lr:
                    self._foreign_write(group, lr)
        if not self.counts_optimizer_steps:
            self._advance()
            self._record(metrics)
            recorded = True
        elif self.step_count > self._recorded:
            self._record(metrics)
            recorded = True
        else:
            self._hold(metrics)
            recorded = False
        n = self.step_count
        if self._reading:
            self._release_read()
        if self.sync and recorded:
            self._exchange(wait_for=self._seq)
        # New records since the last send, not the queue's length: with the
        # daemon away the queue stays long, and I/O every step would cost.
        elif (
            self._seq - self._io_seq >= self._send_every
            or (now := time.monotonic()) - self._last_io >= SEND_INTERVAL
            or (recorded and self._decides_on(metrics))
        ):
            self._exchange()
        elif now - self._last_look >= IO_INTERVAL or now < self._await_until:
            self._look(now)
        if self._pending:
            self._apply_due(n)
        self._write_current()
        self._trip_fresh = None  # shown by this call: not again by the next

    def _decides_on(self, metrics: dict[str, Any]) -> bool:
        """Whether the policy decides on one of these metrics (plateau on the
        step's loss): such a record goes at once, as a report does."""
        return not self._watched.isdisjoint(metrics)

    def _watch(self) -> None:
        """What the policy in effect decides on, and so how many step records
        an async pilot holds before it sends them: wherever the policy
        changes (attach, a command, a checkpoint)."""
        spec = self._spec
        self._watched = frozenset(spec.reduced_metrics()) if spec is not None else frozenset()
        self._send_every = DECIDING_BATCH if self._watched else MAX_BATCH

    def _advance(self) -> None:
        """One real step: the local policy moves on (step-driven schedules
        need no metrics)."""
        self.step_count += 1
        policy = self._policy
        if policy is not None and not self._exhausted:
            try:
                policy.step(NO_METRICS)
            except ScheduleExhausted as exc:
                self._exhausted = True
                self._warn_once("exhausted", f"{exc}; holding the last LRs")

    def _record(self, metrics: dict[str, Any]) -> None:
        """Queue the STEP record of the current step, with the metrics held
        since the last one folded in (their mean)."""
        if self._held_metrics:
            metrics = self._merge_held(metrics)
        n = self.step_count
        for missing in range(self._recorded + 1, n):
            self._emit(missing, STEP, {})  # steps no call came for: no metrics
        self._emit(n, STEP, metrics)
        self._recorded = n

    def _hold(self, metrics: dict[str, Any]) -> None:
        held = self._held_metrics
        for name, value in metrics.items():
            total, count = held.get(name, (0.0, 0))
            held[name] = (total + value, count + 1)

    def _merge_held(self, metrics: dict[str, Any]) -> dict[str, Any]:
        self._hold(metrics)
        merged = {name: total / count for name, (total, count) in self._held_metrics.items()}
        self._held_metrics = {}
        return merged

    def _emit(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        """A record goes out: the mirror takes it as the daemon's engine will
        (unless a command rebuilt the mirror at or after its step), then the
        queue. A record with values still on a device waits, in order with
        the records after it, until they are read (at once in lock-step)."""
        # Looked for only once a device value has been seen: a loop of plain
        # numbers pays nothing for it.
        if self._reading or (
            self._device_values and any(type(v) is not float for v in metrics.values())
        ):
            read = DeviceRead(metrics) if any(device_type(v) for v in metrics.values()) else None
            self._reading.append((step, kind, metrics, read))
            self._release_read(wait=self.sync)
            return
        self._take(step, kind, metrics)

    def _take(self, step: int, kind: str, metrics: dict[str, float]) -> None:
        if self._mirror is not None and step > self._mirror_from:
            self._feed_mirror(metrics, step=kind != REPORT)
        self._enqueue(step, kind, metrics)

    def _release_read(self, wait: bool = False) -> None:
        """Queue the records whose device values have come, oldest first (all
        of them, waiting for the device, with ``wait``)."""
        reading = self._reading
        while reading:
            step, kind, metrics, read = reading[0]
            if read is not None:
                if not (wait or read.ready()):
                    return
                metrics = read.metrics(wait=wait)
            reading.popleft()
            self._take(step, kind, metrics)

    def _record_pending(self) -> None:
        """The optimizer stepped and no ``pilot.step()`` came after: the
        step's record goes out now, before anything that needs it (the next
        step, a report, a checkpoint, a hello)."""
        if self.counts_optimizer_steps and self._recorded < self.step_count:
            self._record({})

    def _after_optimizer_step(self, *_: Any) -> None:
        self._advance()
        # The next step's LRs are in the groups at once; commands that came
        # are applied once this step's record is out (pilot.step, or the
        # next step's pre-hook), after its metrics have fed the mirror.
        self._write_current()

    def _before_optimizer_step(self, *_: Any) -> None:
        if self._optimizer.param_groups is not self._groups:
            self._regroup()
        if not self._tensor_lrs:
            for group, lr in zip(self._groups, self._left):
                if group["lr"] != lr:
                    self._foreign_write(group, lr)
        if self.counts_optimizer_steps:
            if not self._said_hello:
                self._send_hello()
            if self._recorded < self.step_count:
                self._record({})
                if self._pending:
                    self._apply_due(self.step_count)
                    self._write_current()

    def report(self, **metrics: Any) -> None:
        """Metrics that are not a new step (a validation loss, say): they belong
        to the last step, and metric-driven policies act on them."""
        for name, value in metrics.items():
            if type(value) is not float:
                metrics[name] = number = as_number(name, value)
                self._device_values |= type(number) is not float
        if not self._said_hello:
            self._send_hello()
        if self._optimizer.param_groups is not self._groups:
            self._regroup()
        self._record_pending()  # a report comes after its step's record
        self._emit(self.step_count, REPORT, metrics)
        # Reports are rare and are what metric-driven policies wait for: send
        # now rather than at the next I/O tick, and look for the answer at
        # every step until it comes (a decision, or the daemon's persisted
        # ack, within ~100 ms) so a decision lands at the next step, or until
        # DECISION_WAIT has passed (the daemon is away: the regular I/O will
        # pick the answer up when it comes).
        self._exchange(wait_for=self._seq if self.sync else 0)
        self._await_until = 0.0 if self.sync else self._last_io + DECISION_WAIT
        if self._pending:
            self._apply_due(self.step_count)
            self._write_current()

    @staticmethod
    def _mirror_of(
        spec: PolicySpec | None, policy: Policy | None, base: list[float]
    ) -> Policy | None:
        """For a metric-driven policy, a copy that takes this rank's metrics
        as the daemon's engine does. The policy that sets the LRs only steps
        (its decisions come from the daemon, at the step they are due); the
        mirror keeps what the metrics did to the state (plateau's best and
        bad count), which a checkpoint must hold to resume as the run went."""
        if spec is None or policy is None or not uses_metrics(spec):
            return None
        mirror = spec.build(base)
        mirror.load_state_dict(policy.state_dict())
        return mirror

    def _feed_mirror(self, metrics: dict[str, float], step: bool) -> None:
        mirror = self._mirror
        assert mirror is not None, "callers check"
        try:
            if step:
                mirror.step(metrics)
            else:
                mirror.observe(metrics)
        except ScheduleExhausted:
            self._mirror = None  # ran out: the policy's own state is what there is

    def _enqueue(self, step: int, kind: str, metrics: dict[str, float]) -> None:
        queue = self._queue
        if len(queue) == self._max_queue:
            self.stats.records_dropped += 1
            self._warn_once(
                "dropped",
                f"daemon away: queue of {queue.maxlen} records is full; "
                "dropping the oldest (counted in pilot.stats.records_dropped)",
            )
        self._seq += 1
        queue.append((self._seq, step, kind, metrics))

    def _write_current(self) -> None:
        if self._held is not None:
            self._write_lrs(self._held)
        elif self._policy is not None:
            self._write(self._policy)

    def _write(self, policy: Policy) -> None:
        lrs = policy.lrs
        self._write_lrs(lrs)
        momenta = policy.momenta
        if momenta is not None:
            self._write_momenta(momenta)

    def _write_momenta(self, momenta: list[float]) -> None:
        # Where torch's CyclicLR/OneCycleLR write it: Adam's beta1, SGD's momentum.
        for group, momentum in zip(self._groups, momenta):
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            elif "momentum" in group:
                group["momentum"] = momentum
            else:
                self._warn_once(
                    "momentum",
                    "the optimizer has no momentum or betas; "
                    "the policy's cycle_momentum has nothing to cycle",
                )

    # --- talking to the daemon --------------------------------------------

    def _exchange(self, wait_for: int = 0) -> None:
        """Send what is queued and handle what arrived; with ``wait_for``, wait
        (up to sync_timeout) until the daemon has processed that record."""
        self._last_io = self._last_look = time.monotonic()
        self._io_seq = self._seq
        events = self._link.events()
        while events & POLLIN:
            # Read again each time: a moved answer replaces the link.
            self._handle(self._link.receive())
            events = self._link.events()
        if events & POLLOUT:
            self._flush()
        if not wait_for or self._daemon_silent:
            return
        deadline = time.monotonic() + self.sync_timeout
        while self._processed_seq < wait_for:
            left_ms = int((deadline - time.monotonic()) * 1000)
            wait_ms = min(left_ms, RESEND_AFTER_MS)
            frames = self._link.receive(timeout_ms=max(wait_ms, 1)) if left_ms > 0 else None
            if frames is None and left_ms > RESEND_AFTER_MS:
                # A daemon killed mid-step took our record with it; a new one
                # on the same address has not heard of us and will not ask.
                # Send again what it may lack (a live daemon skips repeats).
                self._requeue_unacked()
                self._flush()
                continue
            if frames is None:
                self.stats.sync_timeouts += 1
                self._daemon_silent = True
                self._warn_once(
                    "sync",
                    f"daemon at {self._link.address} did not answer within "
                    f"{self.sync_timeout}s; going on without waiting until it does",
                )
                return
            self._handle(frames)
            if self._queue:  # the daemon restarted and asked for what it lacks
                self._flush()

    def _look(self, now: float) -> None:
        """Handle what arrived, sending nothing: between sends, a decision
        still lands within a millisecond or two."""
        self._last_look = now
        while self._link.events() & POLLIN:  # a moved answer replaces the link
            self._handle(self._link.receive())

    def _flush(self) -> None:
        """Send the queue in batches while the pipe takes them."""
        queue, link = self._queue, self._link
        while queue:
            records = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
            if not link.send(self._encoder.encode(records, self.stats)):
                queue.extendleft(reversed(records))
                return
            self._unacked.extend(records)
            self.stats.records_sent += len(records)

    def _handle(self, frames: list[bytes] | None) -> None:
        if frames is None:
            return
        self._daemon_silent = False
        self._await_until = 0.0
        try:
            message = decode(frames)
        except ProtocolError as exc:
            self.stats.daemon_errors += 1
            self._warn_once("bad-frame", f"ignored a bad message from the daemon: {exc}")
            return
        if isinstance(message, Processed):
            self._processed_seq = max(self._processed_seq, message.seq)
        elif isinstance(message, Persisted):
            unacked = self._unacked
            while unacked and unacked[0][0] <= message.seq:
                unacked.popleft()
        elif isinstance(message, (LRCommand, Welcome, Moved)) and message.run != self.run:
            # Not this run's: a daemon does not send it; applying it would.
            self.stats.daemon_errors += 1
            self._warn_once("other-run", f"ignored a command for run {message.run!r}")
        elif isinstance(message, LRCommand):
            self._receive(message)
        elif isinstance(message, Moved):
            self._move(message.address)
        elif isinstance(message, Welcome):
            self._moves = 0
            if message.command is not None and message.command.run == self.run:
                self._receive(message.command)
        elif isinstance(message, Error):
            if message.code in ("unknown_session", "step_gap"):
                # step_gap: the daemon steps through no gap that long; the
                # hello carries this pilot's state past it.
                self._reintroduce()
            else:
                self.stats.daemon_errors += 1
                self._warn_once(f"error-{message.code}", f"daemon: {message.message}")

    def _move(self, address: str) -> None:
        """A daemon of several shards serves this run at ``address``: talk to
        that shard from now on (hello, then what it has not persisted)."""
        target = redirected(self._daemon_address, address)
        self._moves += 1
        if target is None or self._moves > MAX_MOVES:
            self.stats.daemon_errors += 1
            why = "without a welcome" if target is not None else f"to {address!r}"
            self._warn_once("moved", f"ignored the daemon's move of this run {why}")
            return
        try:
            link = DaemonLink(target, identity=self._identity, keys=self._keys)
        except LinkError as exc:
            self.stats.daemon_errors += 1
            self._warn_once("moved", f"ignored the daemon's move of this run: {exc}")
            return
        log.info("lrpilot: run %s is served by the daemon's shard at %s", self.run, target)
        old, self._link = self._link, link
        old.close(linger_ms=0)  # what it held is sent again from _unacked
        self._reintroduce()

    def _reintroduce(self) -> None:
        """The daemon restarted (or ended our session): say hello again, then
        send again what it had not persisted, ahead of what is queued, and
        the recent acks (a daemon killed before it wrote one would keep that
        journal entry unapplied forever; a repeated one changes nothing)."""
        self._send_hello()
        for ack in self._acks:
            self._send(ack, warn=False)
        self._requeue_unacked()

    def _requeue_unacked(self) -> None:
        if self._unacked:
            records = [*self._unacked, *self._queue]
            self._unacked.clear()
            overflow = len(records) - self._max_queue
            if overflow > 0:
                self.stats.records_dropped += overflow
            self._queue = deque(records, maxlen=self._max_queue)

    def _receive(self, command: LRCommand) -> None:
        if command.version <= self._applied_version:
            return
        if any(p.version == command.version for p in self._pending):
            return
        self._pending.append(command)
        self._pending.sort(key=lambda c: c.version)  # in order, each when it is due

    def _apply_due(self, n: int) -> None:
        """Apply the commands due before optimizer step n + 1."""
        while self._pending and self._pending[0].effective_step <= n + 1:
            self._apply(self._pending.pop(0), n)

    def _apply(self, command: LRCommand, n: int) -> None:
        groups = len(self._groups)
        bases = len(command.base_lrs) if command.base_lrs is not None else groups
        if len(command.lrs) != groups or bases != groups:
            # LRs for other groups would leave some groups stale and a
            # checkpoint that no longer loads: refused whole, like a bad state.
            self.stats.daemon_errors += 1
            self._warn_once(
                "bad-command",
                f"could not apply command {command.version}: it has {len(command.lrs)} LRs "
                f"and {bases} base LRs for {groups} param groups",
            )
            return
        old = list(self._left)
        policy, spec, base = self._policy, self._spec, self._policy_base
        last_trip = policy.last_trip if policy is not None else None
        state = command.policy_state
        try:
            if command.policy_set:
                spec = parse_policy(command.policy) if command.policy is not None else None
                base = command.base_lrs or self.base_lrs
                policy = spec.build(base) if spec is not None else None
            elif policy is not None and spec is not None and state is not None:
                # A fresh one from the same spec and base: a state that fails
                # to load leaves the running policy as it was.
                policy = spec.build(base)
            if policy is not None and state is not None:
                policy.load_state_dict(state)
        except SpecError as exc:
            self.stats.daemon_errors += 1
            self._warn_once("bad-command", f"could not apply command {command.version}: {exc}")
            return
        exhausted = False
        if policy is not None and state is not None:
            # The state is as of record state_step; this pilot is at n. A
            # finite schedule may run out on the way: that is a state (the
            # last LRs hold, as in the daemon), not a reason to refuse.
            try:
                for _ in range(n - command.state_step):
                    policy.step(NO_METRICS)
            except ScheduleExhausted as exc:
                exhausted = True
                self._warn_once("exhausted", f"{exc}; holding the last LRs")
        if command.policy_set or self._mirror is None:
            # A new policy, or the daemon's whole state (a client that missed
            # commands): the mirror starts from it. A decision's command is
            # one the mirror has made itself, from the same metrics.
            self._mirror = self._mirror_of(spec, policy, base)
            self._mirror_from = n  # records of this step and before are the old one's
        self._policy, self._spec, self._policy_base = policy, spec, base
        self._watch()
        self._held = list(command.lrs) if command.hold else None
        self._exhausted = exhausted
        self._follow_sweep()
        trip = policy.last_trip if policy is not None else None
        if trip is not None and trip != last_trip:
            self.trips += 1
            self.tripped = self._trip_fresh = trip
        self._applied_version = command.version
        late = n + 1 > command.effective_step
        self.stats.commands_applied += 1
        self.stats.commands_late += late
        if policy is None and self._held is None:
            self._write_lrs(list(command.lrs))
        self._write_current()
        ack = Ack(
            run=self.run, rank=self.rank, version=command.version, applied_step=n + 1, late=late
        )
        self._acks.append(ack)
        self._send(ack)
        if self._on_change is not None and self._left != old:
            self._on_change(n + 1, old, list(self._left), command.reason, command.actor)

    def _follow_sweep(self) -> None:
        """Copy the training state as a range test's sweep starts; put it
        back as it ends (client/sweep_copy.py). Called wherever the policy
        changes, before its LRs are written."""
        policy = self._policy
        sweeping = policy is not None and policy.sweeping
        if sweeping and self._sweep is None:
            self._sweep = SweepCopy(self._optimizer, self._model)
            log.info(
                "lrpilot: LR range test: copied %.1f MiB of parameters and optimizer state, "
                "put back when the sweep ends",
                self._sweep.nbytes / 2**20,
            )
        elif not sweeping and self._sweep is not None:
            sweep, self._sweep = self._sweep, None
            sweep.restore()
            if self._optimizer.param_groups is not self._groups:
                self._regroup()  # load_state_dict made new group dicts

    def _policy_state(self) -> dict[str, Any] | None:
        """The policy's state as the daemon's engine has it: with what this
        rank's metrics did to it (the mirror), for hellos and checkpoints."""
        if self._mirror is not None:
            return self._mirror.state_dict()
        return self._policy.state_dict() if self._policy else None

    def _write_lrs(self, lrs: list[float]) -> None:
        if self._tensor_lrs:
            for group, lr in zip(self._groups, lrs):
                if hasattr(group["lr"], "fill_"):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
        elif lrs is not self._left:
            for group, lr in zip(self._groups, lrs):
                group["lr"] = lr
        # Policies replace their lrs list, never mutate it, so keeping the
        # reference is safe and saves a copy per step; and the same list as
        # last time is already in the groups (step() puts back what anything
        # else wrote there, _foreign_write), so it need not be written again.
        self._left = lrs

    def _send_hello(self) -> None:
        self._said_hello = True
        self._record_pending()  # the hello's step and state include it
        self._release_read(wait=True)
        self._send(
            Hello(
                run=self.run,
                rank=self.rank,
                world_size=self.world_size,
                host=socket.gethostname(),
                pid=os.getpid(),
                groups=[
                    # An LR the daemon cannot take (NaN at attach) is sent as 0.
                    GroupInfo(name=n, lr=lr if math.isfinite(lr) and lr >= 0 else 0.0)
                    for n, lr in zip(self.group_names, self.base_lrs)
                ],
                policy=self._spec.model_dump() if self._spec else None,
                policy_base_lrs=self._policy_base,
                policy_state=self._policy_state(),
                step=self.step_count,
                seq=self._seq,
                applied_version=self._applied_version,
                held=self._held,
                sync=self.sync,
                client_version=f"{__version__}/p{PROTOCOL_VERSION}",
                attempt=self.attempt,
            )
        )

    def _send(self, message: Any, warn: bool = True) -> bool:
        sent = self._link.send([encode(message)])
        if not sent and warn:
            self._warn_once(
                "pipe-full", "daemon away and its pipe is full: a control message was not sent"
            )
        return sent

    def _regroup(self) -> None:
        """``optimizer.load_state_dict()`` replaced the param groups with new
        dicts (a resume that attached first): write to those from now on,
        lrpilot's LRs first (the checkpoint's are the optimizer's old ones;
        ``pilot.load_state_dict`` restores lrpilot's own)."""
        groups = self._optimizer.param_groups
        if len(groups) != len(self._groups):
            raise UsageError(
                f"lrpilot: the optimizer now has {len(groups)} param groups, "
                f"not the {len(self._groups)} it was attached with"
            )
        self._groups = groups
        self._tensor_lrs = any(hasattr(g["lr"], "fill_") for g in groups)
        self._write_lrs(list(self._left))  # a new list: written whatever it holds
        self._write_current()

    def _foreign_write(self, group: dict[str, Any], left: float) -> None:
        """``group`` does not hold the ``left`` LR lrpilot wrote there: count
        it, warn once, and write lrpilot's back (with no policy and no hold,
        nothing else would). Only for float LRs: tensor LRs are not compared
        (that would wait on the device)."""
        self.stats.foreign_lr_writes += 1
        # By identity: == on groups compares their param tensors (ambiguous).
        # Found here, off the hot path, rather than enumerated in step().
        index = next(i for i, g in enumerate(self._groups) if g is group)
        name = self.group_names[index]
        self._warn_once(
            "foreign",
            f"param group {name!r} has lr={group['lr']}, not the {left} lrpilot left: something "
            "else (a torch LR scheduler?) is setting the LR. lrpilot overrides it; remove the "
            "other scheduler and give its settings to lrpilot's policy (docs/hook.md)",
        )
        group["lr"] = left

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"lrpilot: {message}", RuntimeWarning, stacklevel=caller_stacklevel())

    # --- lifecycle and checkpoints ----------------------------------------

    @property
    def lrs(self) -> list[float]:
        return list(self._left)

    @property
    def policy(self) -> PolicySpec | None:
        return self._spec

    def state_dict(self) -> dict[str, Any]:
        """What a training checkpoint needs to restore the LR state, daemon or not."""
        self._record_pending()
        self._release_read(wait=True)  # the mirror's state includes every step
        return {
            "format": 1,
            "run": self.run,
            "step": self.step_count,
            "lrs": list(self._left),
            "policy": self._spec.model_dump() if self._spec else None,
            "policy_base_lrs": list(self._policy_base),
            # The policy in effect (its LRs are the groups'), and what this
            # rank's metrics have done to it since (the mirror: a decision it
            # made may not be due yet), each restored as itself.
            "policy_state": self._policy.state_dict() if self._policy else None,
            "mirror_state": self._mirror.state_dict() if self._mirror is not None else None,
            "held": None if self._held is None else list(self._held),
            "applied_version": self._applied_version,
            # Commands received and not yet due: due after the checkpoint's step.
            "pending": [command.model_dump(mode="json") for command in self._pending],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            spec = parse_policy(state["policy"]) if state.get("policy") else None
            base = [float(lr) for lr in state.get("policy_base_lrs") or self.base_lrs]
            policy = spec.build(base) if spec else None
            held = state.get("held")
            held = None if held is None else [float(lr) for lr in held]
            if policy is not None:
                policy.load_state_dict(state["policy_state"])
            mirror_state = state.get("mirror_state")
            mirror: Policy | None
            if spec is not None and policy is not None and mirror_state is not None:
                mirror = spec.build(base)
                mirror.load_state_dict(mirror_state)
            else:  # a checkpoint from before the mirror was kept apart
                mirror = self._mirror_of(spec, policy, base)
            step, lrs = int(state["step"]), [float(lr) for lr in state["lrs"]]
            pending = [LRCommand.model_validate(c) for c in state.get("pending") or ()]
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"lrpilot: not a pilot state_dict: {exc}") from None
        if self._optimizer.param_groups is not self._groups:
            self._regroup()
        if len(lrs) != len(self._groups):
            raise UsageError(
                f"lrpilot: state has {len(lrs)} groups, the optimizer {len(self._groups)}"
            )
        self._release_read(wait=True)  # records of the timeline being left
        # A copy from before the checkpoint belongs to another timeline: a
        # sweep the checkpoint is in the middle of puts back the state as
        # loaded (model and optimizer first, then the pilot).
        self._sweep = None
        if policy is not None and policy.sweeping:
            self._warn_once(
                "sweep-resumed",
                "the checkpoint is in the middle of an LR range test: its end puts back "
                "the parameters as they are now, not as they were when the sweep began",
            )
        self._spec, self._policy, self.step_count = spec, policy, step
        self._watch()
        self._recorded, self._held_metrics = step, {}
        self._mirror = mirror
        self._mirror_from = step
        self._policy_base, self._held = base, held
        self._exhausted = False
        self._applied_version = int(state.get("applied_version", 0))
        self._pending.clear()
        for command in pending:
            if command.run == self.run:
                self._receive(command)
        self._follow_sweep()
        if policy is None and held is None:
            self._write_lrs(lrs)
        self._write_current()
        self._send_hello()

    def flush(self, timeout: float = 1.0) -> bool:
        """Send what is queued, waiting up to ``timeout`` while the daemon takes
        it; returns at once when the daemon is away. True if all went."""
        deadline = time.monotonic() + timeout
        if not self._said_hello:
            self._send_hello()
        self._record_pending()
        self._release_read(wait=True)
        while True:
            self._exchange()
            if not self._queue or not self._link.writable() or time.monotonic() >= deadline:
                return not self._queue
            time.sleep(0.001)

    def close(self) -> None:
        """Send what the daemon will take and say bye. Records still queued
        (the daemon is away) are dropped and counted."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout=0.5)
        self.stats.records_dropped += len(self._queue)
        self._queue.clear()
        bye = Bye(run=self.run, rank=self.rank, step=self.step_count, stats=self.stats)
        self._send(bye, warn=False)  # a daemon that is away learns it by silence
        self._link.close()
        for hook in (self._step_hook, self._post_hook):
            if hook is not None:
                hook.remove()

    def __enter__(self) -> Pilot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
