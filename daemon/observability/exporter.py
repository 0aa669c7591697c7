"""The Prometheus exporter: the daemon's state as metrics, read at scrape time.

:class:`DaemonCollector` walks the run registry when Prometheus scrapes, so
the receive path never touches a metric object: a record costs the exporter
nothing. The daemon's own families go through prometheus-client's
``collect()`` protocol (with its process, platform and GC collectors); the
per-run families, tens of thousands of samples with many runs, are written as
text directly (:meth:`DaemonCollector.render_runs`), ~7x faster.
:class:`Exposition` joins the two. The scrape runs on the HTTP server's thread
while the daemon loop mutates the registry; it reads copies of the dicts
(``list(d.values())`` is atomic under the GIL) and plain attributes, so a
scrape sees each value as it was at some instant of the scrape.

Every metric is listed, with its meaning, in docs/metrics.md (a test holds the
two together). Labels are bounded: ``run``, ``group``, ``rank`` where a
metric is per group or per rank, ``metric`` (the names a script reports),
``reason`` (a fixed set). A run's series go away ``metrics_ttl`` seconds after
its last rank left.

A run whose series fail to render (a bug, or a policy state that slipped past
its checks) is left out of that scrape, counted in
``lrpilot_render_errors_total`` and logged once; the other runs' series and
the daemon's own are served as usual.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lrpilot import __version__
from lrpilot.policies import POLICY_GAUGES

from ..service.dataplane import DataPlane
from ..service.registry import Run
from ..service.store import DROP_REASONS
from .annotations import OUTCOMES as ANNOTATION_OUTCOMES

log = logging.getLogger("lrpilot.daemon")

# Reasons a message or record is refused (DataPlane.rejected's keys). Listed
# so each series exists at 0 from the start: a rate() over a series that
# appears with its first error misses that error.
REJECT_REASONS = (
    "oversized",
    "malformed",
    "unknown_session",
    "bad_hello",
    "rank_taken",
    "too_many_runs",
    "too_many_metrics",
    "step_gap",
    "unexpected",
    "internal_error",
    "reply_dropped",
)
# Why a client was refused for its key (DataPlane.auth_refused's keys): a
# handshake with no key or an unknown one (ZeroMQ refuses it), a message its
# key may not send (data plane), a request its role may not make (control).
AUTH_REASONS = ("no_key", "unknown_key", "forbidden", "forbidden_control")
# ClientStats fields exported per rank as lrpilot_rank_<field>_total: (field, help).
RANK_COUNTERS = (
    ("records_sent", "records the rank's hook sent"),
    ("records_dropped", "records the rank's hook dropped (queue full)"),
    ("sync_timeouts", "sync-mode steps that timed out waiting for the daemon"),
    ("foreign_lr_writes", "LR writes into the param groups by other code"),
    ("commands_applied", "LR commands the rank applied"),
    ("commands_late", "LR commands applied after their effective step"),
    ("daemon_errors", "error replies the rank received from the daemon"),
)


class DaemonCollector:
    """Yields the daemon's metric families from its live state."""

    def __init__(
        self,
        plane: DataPlane,
        ttl: float,
        annotations: Callable[[], dict[str, int]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.plane = plane
        self.ttl = ttl
        self.annotations = annotations
        self.clock = clock
        self._policies: dict[str, tuple[object, str]] = {}  # run -> (spec, its labels)
        self.render_errors = 0  # runs left out of a scrape because they failed to render
        self._render_errors_lock = threading.Lock()  # scrapes run on parallel threads
        self._logged_failures: dict[str, None] = {}  # runs whose failure is logged already

    def describe(self) -> list[Metric]:
        return []  # generated at scrape time: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        """The daemon's own families (a few dozen samples); the per-run ones
        are rendered by :meth:`render_runs`."""
        plane = self.plane
        now = self.clock()
        runs = [r for r in list(plane.registry.runs.values()) if self._shown(r, now)]
        yield from self._daemon(plane, runs)

    def _policy_labels(self, run: Run) -> str:
        """``kind="…",spec="…"`` for the run's policy, rendered once per spec
        (a policy changes only when an operator switches it)."""
        spec = run.engine.spec
        cached = self._policies.get(run.run_id)
        if cached is not None and cached[0] is spec:
            return cached[1]
        text = json.dumps(spec.model_dump(), separators=(",", ":")) if spec else ""
        labels = f"kind={label(spec.kind if spec else 'none')},spec={label(text)}"
        self._policies[run.run_id] = (spec, labels)
        return labels

    def _shown(self, run: Run, now: float) -> bool:
        return run.ended is None or now - run.ended <= self.ttl

    # --- the daemon -------------------------------------------------------

    def _daemon(self, plane: DataPlane, runs: list[Run]) -> Iterator[Metric]:
        info = InfoMetricFamily("lrpilot_build", "the lrpilot version serving", labels=())
        info.add_metric([], {"version": __version__})
        yield info
        active = sum(1 for r in runs if r.ended is None)
        by_state = GaugeMetricFamily("lrpilot_runs", "runs in /metrics, by state", labels=["state"])
        by_state.add_metric(["active"], active)
        by_state.add_metric(["ended"], len(runs) - active)
        yield by_state
        yield GaugeMetricFamily(
            "lrpilot_sessions", "connected ranks, all runs", value=len(plane.registry.sessions)
        )
        yield CounterMetricFamily(
            "lrpilot_records_ingested",
            "metric records taken in (steps and reports)",
            value=plane.records_ingested,
        )
        yield hellos_moved(plane.hellos_moved)
        yield CounterMetricFamily(
            "lrpilot_commands_sent",
            "LR command messages sent (one per rank a command is addressed to)",
            value=plane.commands_sent,
        )
        yield by_reason(
            "lrpilot_messages_rejected",
            "messages and records refused or dropped by the daemon, by reason",
            REJECT_REASONS,
            plane.rejected,
        )
        yield by_reason(
            "lrpilot_auth_refused",
            "clients refused for their key (with --keys): no_key and unknown_key at the "
            "handshake, forbidden (a message outside the key's runs) and forbidden_control "
            "(a request outside its role)",
            AUTH_REASONS,
            plane.auth_refused,
        )
        posted = CounterMetricFamily(
            "lrpilot_grafana_annotations",
            "Grafana annotations for LR changes, by outcome",
            labels=["outcome"],
        )
        done = self.annotations() if self.annotations else {}
        for outcome in ANNOTATION_OUTCOMES:
            posted.add_metric([outcome], done.get(outcome, 0))
        yield posted
        yield CounterMetricFamily(
            "lrpilot_render_errors",
            "runs left out of a scrape because their series failed to render",
            value=self.render_errors,
        )
        yield GaugeMetricFamily(
            "lrpilot_store_size_bytes",
            "size of the SQLite store and its write-ahead log",
            value=plane.store.size_bytes(),
        )
        yield from store_health(plane)

    # --- runs, groups, ranks ------------------------------------------------

    def render_runs(self) -> str:
        """The per-run families as exposition text.

        Written directly rather than through metric family objects: with 1,000
        runs of 4 groups (36k samples) prometheus-client's path takes ~0.8 s of
        the GIL per scrape, this one a tenth of that (bench/scrape.py). The GIL
        is offered to the daemon loop after every YIELD_AFTER seconds of
        rendering, so the loop waits about that long for it during a scrape.
        """
        now = self.clock()
        runs = [r for r in list(self.plane.registry.runs.values()) if self._shown(r, now)]
        out: dict[str, list[str]] = {name: [] for name, _, _ in RUN_FAMILIES}
        monotonic = time.monotonic()
        families = list(out.values())
        perf_counter, sleep = time.perf_counter, time.sleep
        offered = perf_counter()
        for run in runs:
            if perf_counter() - offered >= YIELD_AFTER:
                sleep(0)  # lets the daemon loop take the GIL, if it waits for it
                offered = perf_counter()
            sizes = [len(lines) for lines in families]
            try:
                run_lines(out, run, monotonic, self._policy_labels(run))
            except Exception as exc:
                for lines, size in zip(families, sizes):
                    del lines[size:]  # the run's partial series: all of them or none
                self._render_failed(run, exc)
        if len(self._policies) > 2 * len(runs) + 100:
            # Scrapes run in parallel (one thread each) and insert into
            # _policies: never iterate it, look the shown runs up in it.
            policies = self._policies
            kept = {run.run_id: policies.get(run.run_id) for run in runs}
            self._policies = {k: v for k, v in kept.items() if v is not None}
        if len(self._logged_failures) > 2 * len(runs) + 100:
            shown = {run.run_id for run in runs}
            logged = list(self._logged_failures)  # a copy, as above
            self._logged_failures = {k: None for k in logged if k in shown}
        parts = []
        for name, kind, doc in RUN_FAMILIES:
            full = name + "_total" if kind == "counter" else name
            parts.append(f"# HELP {full} {doc}\n# TYPE {full} {kind}\n")
            parts.append("".join(out[name]))
        return "".join(parts)

    def _render_failed(self, run: Run, exc: Exception) -> None:
        with self._render_errors_lock:
            self.render_errors += 1
        if run.run_id in self._logged_failures:
            return  # every scrape would log it again
        self._logged_failures[run.run_id] = None
        log.error(
            "metrics: the series of run %r failed to render and are left out of /metrics "
            "(lrpilot_render_errors_total counts each scrape): %s: %s",
            run.run_id,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )


# Seconds of rendering between two offers of the GIL to the daemon loop. By
# time, not by runs: a run of 64 ranks renders 30 times longer than one of 1.
# 0.1 ms took a sync round trip's p99 while /metrics is scraped back to back
# from 8.8x to ~3.6x the quiet one (p50 4.5x to 1.8x), for a scrape ~40 %
# longer: 53 ms for 1,000 runs of 4 groups, from 39 (bench/scrape.py).
YIELD_AFTER = 0.0001

GAUGE_KINDS = {g.name: g.kind for g in POLICY_GAUGES}
COUNTER_SUFFIX = {"gauge": "", "counter": "_total"}

# (name without _total, type, help): the per-run families, in exposition order.
RUN_FAMILIES = (
    ("lrpilot_run_policy_info", "gauge", "the run's policy: its kind and spec (JSON)"),
    ("lrpilot_run_step", "gauge", "the last optimizer step of the run (its leading rank)"),
    ("lrpilot_run_steps_per_second", "gauge", "optimizer steps per second"),
    ("lrpilot_run_metric", "gauge", "the last value of each metric the script reports"),
    ("lrpilot_run_active", "gauge", "1 while a rank is connected, 0 after it ended"),
    ("lrpilot_run_connected_ranks", "gauge", "ranks connected now"),
    ("lrpilot_run_world_size", "gauge", "ranks the run says it has"),
    ("lrpilot_run_lr_held", "gauge", "1 while an operator holds the LRs (set-lr, pause)"),
    (
        "lrpilot_run_waiting_records",
        "gauge",
        "records a decision holds until every rank has sent its value (the policy's reduce)",
    ),
    (
        "lrpilot_run_rank_wait_timeouts",
        "counter",
        "records decided on without a rank that stayed silent past --rank-wait-timeout",
    ),
    ("lrpilot_run_command_version", "gauge", "version of the run's last LR command"),
    ("lrpilot_run_start_time_seconds", "gauge", "when the daemon first saw the run (Unix time)"),
    (
        "lrpilot_run_lr_changes",
        "counter",
        "LR changes journaled since the daemon started, by reason",
    ),
    ("lrpilot_group_lr", "gauge", "the LR in effect for the param group"),
    (
        "lrpilot_group_momentum",
        "gauge",
        "the momentum (SGD) or beta1 (Adam) the policy sets, where it cycles momentum",
    ),
    # What the policies say they export (Policy.GAUGES), not a list of ours.
    *((f"lrpilot_policy_{g.name}", g.kind, g.help) for g in POLICY_GAUGES),
    ("lrpilot_rank_step", "gauge", "the last optimizer step of the rank"),
    ("lrpilot_rank_lag_steps", "gauge", "steps the rank is behind the run's leading rank"),
    (
        "lrpilot_rank_command_late_steps",
        "gauge",
        "steps after its effective step that the rank applied the last command",
    ),
    ("lrpilot_rank_last_message_age_seconds", "gauge", "seconds since the rank's last message"),
    (
        "lrpilot_rank_left_out",
        "gauge",
        "1 while decisions do not wait for the rank (it kept one waiting past "
        "--rank-wait-timeout; until it sends again)",
    ),
    *((f"lrpilot_rank_{field}", "counter", doc) for field, doc in RANK_COUNTERS),
)


def label(value: str) -> str:
    """A label value as the text format quotes it, valid UTF-8: a lone
    surrogate (JSON can carry one) becomes "?" rather than failing the
    scrape's encode."""
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return '"' + value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') + '"'


def number(value: float) -> str:
    """A sample value as the text format writes it. Anything but an int or a
    float raises: a string would be copied into the exposition as is."""
    if type(value) is not float:
        if not isinstance(value, (int, float)):
            raise TypeError(f"a sample value must be a number, got {type(value).__name__}")
        value = float(value)  # numpy's repr is not a number; an int past 1e308 raises
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def run_lines(out: dict[str, list[str]], run: Run, monotonic: float, policy_labels: str) -> None:
    """Append the run's samples, ``name{labels} value\\n``, to ``out[name]``."""
    r = "{run=" + label(run.run_id)
    engine, policy = run.engine, run.engine.policy
    sessions = list(run.sessions.values())
    out["lrpilot_run_policy_info"].append(f"lrpilot_run_policy_info{r},{policy_labels}}} 1\n")

    def put(name: str, value: float, extra: str = "", suffix: str = "") -> None:
        out[name].append(f"{name}{suffix}{r}{extra}}} {number(value)}\n")

    # Run.step, from the copy: iterating run.sessions here would race the loop.
    lead = max((s.step for s in sessions), default=engine.step)
    put("lrpilot_run_step", lead)
    put("lrpilot_run_steps_per_second", max((s.steps_per_s for s in sessions), default=0.0))
    for name, value in list(run.last_metrics.items()):
        put("lrpilot_run_metric", value, ",metric=" + label(name))
    put("lrpilot_run_active", 0 if run.ended is not None else 1)
    put("lrpilot_run_connected_ranks", len(sessions))
    put("lrpilot_run_world_size", run.world_size)
    put("lrpilot_run_lr_held", 0 if engine.held is None else 1)
    put("lrpilot_run_command_version", engine.version)
    reduction = run.reduction  # read once: the loop may drop it meanwhile
    left_out = reduction.left_out() if reduction is not None else ()
    put("lrpilot_run_waiting_records", len(reduction.waiting) if reduction is not None else 0)
    put("lrpilot_run_rank_wait_timeouts", run.rank_wait_timeouts, "", "_total")
    put("lrpilot_run_start_time_seconds", run.created)
    for reason, count in sorted(engine.changes.items()):
        put("lrpilot_run_lr_changes", count, ",reason=" + label(reason), "_total")
    groups = [",group=" + label(name) for name in run.group_names]
    for group, value in zip(groups, engine.lrs):
        put("lrpilot_group_lr", value, group)
    momenta = policy.momenta if policy is not None else None
    for group, value in zip(groups, momenta or ()):
        put("lrpilot_group_momentum", value, group)
    for name, value in (policy.gauges() if policy is not None else {}).items():
        put(f"lrpilot_policy_{name}", value, "", COUNTER_SUFFIX[GAUGE_KINDS[name]])
    for session in sessions:
        rank = f',rank="{session.rank}"'
        put("lrpilot_rank_step", session.step, rank)
        put("lrpilot_rank_lag_steps", max(0, lead - session.step), rank)
        put("lrpilot_rank_command_late_steps", session.late_by, rank)
        put("lrpilot_rank_last_message_age_seconds", max(0.0, monotonic - session.last_seen), rank)
        put("lrpilot_rank_left_out", 1 if session.rank in left_out else 0, rank)
        stats = session.stats
        for field, _ in RANK_COUNTERS:
            put(f"lrpilot_rank_{field}", getattr(stats, field), rank, "_total")


class Exposition:
    """What /metrics serves: the daemon's families and the process, platform
    and GC collectors (CPU, memory, file descriptors, Python) through
    prometheus-client, then the per-run families rendered by the collector."""

    def __init__(self, collector: DaemonCollector) -> None:
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)

    def text(self) -> str:
        runs = self.collector.render_runs()  # first: its failures count in this scrape
        return generate_latest(self.registry).decode() + runs


def store_health(plane: DataPlane) -> Iterator[Metric]:
    """Whether the store takes writes, and what waits or was given up on."""
    health = plane.store.health()
    yield GaugeMetricFamily(
        "lrpilot_store_up",
        "1 while the store takes writes, 0 while they fail (a full disk)",
        value=0 if health["error"] else 1,
    )
    yield GaugeMetricFamily(
        "lrpilot_store_failing_since_seconds",
        "unix time the current write failure began (0: none)",
        value=health["error_since"] or 0,
    )
    yield CounterMetricFamily(
        "lrpilot_store_failed_commits",
        "store transactions that failed and were rolled back",
        value=health["failed_commits"],
    )
    dropped = CounterMetricFamily(
        "lrpilot_store_dropped_ops", "store writes given up on, by reason", labels=["reason"]
    )
    for reason in DROP_REASONS:
        dropped.add_metric([reason], health["dropped"].get(reason, 0))
    yield dropped
    yield CounterMetricFamily(
        "lrpilot_runs_forgotten",
        "ended runs let go of from memory past --max-ended-runs (the store keeps them)",
        value=plane.forgotten_runs,
    )
    yield CounterMetricFamily(
        "lrpilot_journal_deferred",
        "LR commands sent while the store could not journal them (written once it can)",
        value=plane.journal_deferred,
    )
    yield GaugeMetricFamily(
        "lrpilot_store_backlog_batches",
        "batches waiting for the store to take writes",
        value=health["backlog_batches"],
    )
    yield GaugeMetricFamily(
        "lrpilot_store_backlog_bytes",
        "bytes waiting for the store to take writes",
        value=health["backlog_bytes"],
    )
    yield GaugeMetricFamily(
        "lrpilot_store_check_problems",
        "problems PRAGMA quick_check found in the store at start",
        value=len(health["check_problems"]),
    )
    yield GaugeMetricFamily(
        "lrpilot_store_quarantined_runs",
        "runs rows set aside at start because the daemon could not use them",
        value=len(health["quarantined"]),
    )


def by_reason(
    name: str, help_text: str, reasons: tuple[str, ...], counted: Mapping[str, int]
) -> CounterMetricFamily:
    """A counter by reason: each known reason from 0 (a rate() over a series
    that appears with its first count misses that count), and any other
    reason counted."""
    family = CounterMetricFamily(name, help_text, labels=["reason"])
    counts = dict(counted)  # one copy: another thread may add a reason meanwhile
    for reason in sorted(set(reasons) | set(counts)):
        family.add_metric([reason], counts.get(reason, 0))
    return family


def hellos_moved(count: int) -> CounterMetricFamily:
    """One family for the front and its shards, merged into one /metrics."""
    return CounterMetricFamily(
        "lrpilot_hellos_moved",
        "hellos answered with the address of the shard that serves the run (--shards): "
        "the front answers every hello so, a shard those of other shards' runs",
        value=count,
    )


# --- the front of a daemon of several shards (daemon/service/front.py) ---


class FrontCollector(Collector):
    """The front's own families: its shards and what it did with messages."""

    def __init__(self, front: Any) -> None:
        self.front = front

    def collect(self) -> Iterator[Any]:
        front = self.front
        yield GaugeMetricFamily(
            "lrpilot_shards", "shard processes of this daemon (--shards)", value=len(front.shards)
        )
        up = GaugeMetricFamily(
            "lrpilot_shard_up",
            "1 while the shard serves, 0 while it is restarting",
            labels=["index"],
        )
        restarts = CounterMetricFamily(
            "lrpilot_shard_restarts",
            "times the front started a shard again after it died",
            labels=["index"],
        )
        for shard in front.shards:
            up.add_metric([str(shard.plan.index)], 1 if shard.up else 0)
            restarts.add_metric([str(shard.plan.index)], shard.restarts)
        yield up
        yield restarts
        yield hellos_moved(front.counts["moved"])
        yield by_reason(
            "lrpilot_auth_refused",
            "clients refused for their key (with --keys): no_key and unknown_key at the "
            "handshake, forbidden (a hello outside the key's runs)",
            AUTH_REASONS,
            front.auth_refused,
        )
        yield CounterMetricFamily(
            "lrpilot_control_forwarded",
            "operator requests the front forwarded to shards",
            value=front.counts["forwarded"],
        )
        yield CounterMetricFamily(
            "lrpilot_control_timed_out",
            "forwarded requests a shard did not answer in time",
            value=front.counts["timed_out"],
        )


class FrontExposition:
    """The front's own part of /metrics: its shards and the process; the
    shards' parts are merged with it, each labelled (shard_exposition.py)."""

    def __init__(self, front: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FrontCollector(front))
        self.registry.register(PROCESS_COLLECTOR)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
