"""Writes lrpilot's Grafana dashboards (the JSON files next to this script).

    python dashboards/generate.py           # write lrpilot-overview.json, lrpilot-run.json
    python dashboards/generate.py --check   # exit 1 if a file differs from what it would write

The JSON in the repository is what Grafana loads (provisioning in deploy/,
`lrpilot dashboards push`, or Grafana's import); this script is how it is
edited, so that every panel follows the same conventions: the Prometheus
datasource by its fixed uid (``lrpilot-prometheus``), only metrics listed in
docs/metrics.md, a run's dashboard one click away from every per-run series.
tests/test_dashboards.py runs each query against a real Prometheus scraping a
real daemon, and checks that these files are what this script writes.

Standalone on purpose (dashboards/ has no import name, docs/architecture.md): the
standard library only, any Python 3.10+.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "lrpilot-prometheus"}
# Grafana's own annotation store: where the daemon posts one annotation per LR
# change (tags "lrpilot", "run:<id>", <reason>) when it runs with --grafana-url.
GRAFANA_DATASOURCE = {"type": "grafana", "uid": "-- Grafana --"}
SCHEMA_VERSION = 39  # Grafana 10.4's dashboard model; later versions migrate it on load
OVERVIEW_UID, RUN_UID = "lrpilot-overview", "lrpilot-run"
RUN_URL = f"/d/{RUN_UID}/lrpilot-run?${{__url_time_range}}&var-run="
GRID_WIDTH = 24
PER_SECOND = "reqps"  # Grafana's unit id for a rate per second
# The step of the Prometheus annotation query and the offset it compares
# against are equal: consecutive evaluations compare consecutive instants, so
# each change of the command version is marked once, whatever the scrape
# interval (a changes() window would need to match the scrape interval).
ANNOTATION_STEP = "1m"

Panel = dict[str, Any]
Size = tuple[int, int]  # (width in grid columns of 24, height in rows of 30 px)


# --- panels --------------------------------------------------------------------


def target(
    expr: str, legend: str = "", *, instant: bool = False, table: bool = False
) -> dict[str, Any]:
    """A Prometheus query; the panel gives it its refId (A, B, ...)."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "format": "table" if table else "time_series",
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
    }


def _panel(
    kind: str, title: str, description: str, targets: Iterable[dict], size: Size, **rest: Any
) -> Panel:
    width, height = size
    return {
        "datasource": DATASOURCE,
        "description": description,
        "gridPos": {"h": height, "w": width},
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
        "title": title,
        "type": kind,
        **rest,
    }


def value_map(texts: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    """Grafana value mappings: number -> (text, color)."""
    options = {
        str(value): {"color": color, "index": i, "text": text}
        for i, (value, (text, color)) in enumerate(sorted(texts.items()))
    }
    return [{"options": options, "type": "value"}]


def run_links(value: str) -> list[dict[str, str]]:
    """A data link to the run dashboard, for the run named by ``value``."""
    return [{"title": f"Run {value}", "url": RUN_URL + value}]


THRESHOLDS = {"mode": "absolute", "steps": [{"color": "blue", "value": None}]}


def timeseries(
    title: str,
    description: str,
    *targets: dict[str, Any],
    size: Size = (12, 8),
    unit: str = "short",
    log: bool = False,
    steps: bool = False,
    bars: bool = False,
    run_link: bool = False,
    overrides: list[dict] | None = None,
    bounds: tuple[float, float] | None = None,
) -> Panel:
    """A time series panel. ``steps`` draws values that jump (a cycle, a
    stage); ``run_link`` links every series to its run's dashboard (by its
    ``run`` label); ``bounds`` fixes the axis (min, max)."""
    custom: dict[str, Any] = {
        "axisPlacement": "auto",
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 0,
        "lineInterpolation": "stepAfter" if steps else "linear",
        "lineWidth": 1,
        "scaleDistribution": {"log": 10, "type": "log"} if log else {"type": "linear"},
        "showPoints": "never",
        "spanNulls": False,
    }
    defaults: dict[str, Any] = {"color": {"mode": "palette-classic"}, "custom": custom}
    defaults["unit"] = unit
    if bounds is not None:
        defaults["min"], defaults["max"] = bounds
    if run_link:
        defaults["links"] = run_links("${__field.labels.run}")
    legend = {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True}
    return _panel(
        "timeseries",
        title,
        description,
        targets,
        size,
        fieldConfig={"defaults": defaults, "overrides": overrides or []},
        options={"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}},
    )


def stat(
    title: str,
    description: str,
    *targets: dict[str, Any],
    size: Size = (4, 4),
    unit: str = "short",
    mappings: list[dict] | None = None,
    text_mode: str = "auto",
) -> Panel:
    """The last value of each series; ``text_mode="name"`` shows the legend
    instead, for info metrics (whose value is always 1)."""
    defaults = {
        "color": {"mode": "thresholds"},
        "mappings": mappings or [],
        "thresholds": THRESHOLDS,
        "unit": unit,
    }
    return _panel(
        "stat",
        title,
        description,
        targets,
        size,
        fieldConfig={"defaults": defaults, "overrides": []},
        options={
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": text_mode,
        },
    )


def table(
    title: str,
    description: str,
    columns: list[tuple[str, str, dict[str, Any]]],
    *,
    key: list[str],
    size: Size = (24, 6),
    hide: Iterable[str] = (),
    labels: dict[str, str] | None = None,
    link_runs: bool = False,
) -> Panel:
    """A table of instant queries, one row per ``key`` label set. Each of
    ``columns`` is (header, query, field config); the queries aggregate to
    ``key`` and Grafana's merge joins them. ``hide`` drops columns (by their
    name before renaming), ``labels`` renames label columns."""
    values = {f"Value #{chr(ord('A') + i)}": name for i, (name, _, _) in enumerate(columns)}
    if len(columns) == 1:  # Grafana names a lone query's column "Value", not "Value #A"
        values = {"Value": columns[0][0]}
    overrides = [
        {
            "matcher": {"id": "byName", "options": name},
            "properties": [{"id": prop, "value": value} for prop, value in sorted(conf.items())],
        }
        for name, _, conf in columns
        if conf
    ]
    if link_runs:
        link = {"id": "links", "value": run_links("${__value.raw}")}
        overrides.append({"matcher": {"id": "byName", "options": "run"}, "properties": [link]})
    organize = {
        "excludeByName": {name: True for name in ("Time", *hide)},
        "indexByName": {name: i for i, name in enumerate([*key, *values])},
        "renameByName": {**values, **(labels or {})},
    }
    return _panel(
        "table",
        title,
        description,
        [target(expr, instant=True, table=True) for _, expr, _ in columns],
        size,
        fieldConfig={"defaults": {"custom": {"align": "auto"}}, "overrides": overrides},
        options={"cellHeight": "sm", "footer": {"show": False}, "showHeader": True},
        transformations=[{"id": "merge", "options": {}}, {"id": "organize", "options": organize}],
    )


def state_timeline(
    title: str,
    description: str,
    *targets: dict[str, Any],
    mappings: list[dict],
    size: Size = (8, 8),
) -> Panel:
    defaults = {
        "color": {"mode": "thresholds"},
        "custom": {"fillOpacity": 70, "lineWidth": 0},
        "mappings": mappings,
        "thresholds": THRESHOLDS,
    }
    return _panel(
        "state-timeline",
        title,
        description,
        targets,
        size,
        fieldConfig={"defaults": defaults, "overrides": []},
        options={
            "alignValue": "left",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
            "mergeValues": True,
            "rowHeight": 0.8,
            "showValue": "auto",
            "tooltip": {"mode": "single", "sort": "none"},
        },
    )


def row(title: str) -> Panel:
    return {"collapsed": False, "panels": [], "title": title, "type": "row"}


# --- the dashboard -------------------------------------------------------------------


def layout(panels: list[Panel]) -> list[Panel]:
    """Number the panels and place them left to right, wrapping at the grid's
    24 columns; a row panel starts a new line and spans it."""
    placed: list[Panel] = []
    x = y = line_height = 0
    for panel in panels:
        if panel["type"] == "row":
            y, x, line_height = y + line_height, 0, 0
            panel = {**panel, "gridPos": {"h": 1, "w": GRID_WIDTH}}
        width, height = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if x + width > GRID_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        placed.append({**panel, "gridPos": {"h": height, "w": width, "x": x, "y": y}})
        x, line_height = x + width, max(line_height, height)
    return [{**panel, "id": i} for i, panel in enumerate(placed, start=1)]


def query_variable(
    name: str, label: str, query: str, description: str, *, multi: bool = False
) -> dict[str, Any]:
    """A template variable filled from Prometheus (``label_values(...)``);
    ``multi`` allows several values and All (Grafana joins them as a regex)."""
    return {
        "current": {},
        "datasource": DATASOURCE,
        "definition": query,
        "description": description,
        "hide": 0,
        "includeAll": multi,
        "label": label,
        "multi": multi,
        "name": name,
        "options": [],
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,  # on every time range change: runs come and go
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[Panel],
    variables: list[dict[str, Any]],
    annotations: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    return {
        "annotations": {"list": list(annotations)},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,  # a shared crosshair: the LR and the loss at the same instant
        "id": None,
        "links": [
            {
                "asDropdown": False,
                "icon": "dashboard",
                "includeVars": False,
                "keepTime": True,
                "tags": ["lrpilot"],
                "title": "lrpilot",
                "type": "dashboards",
            }
        ],
        "panels": layout(panels),
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["lrpilot"],
        "templating": {"list": variables},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# --- the overview ------------------------------------------------------------------

JOB = 'job=~"$job"'


def overview() -> dict[str, Any]:
    """Every run of the daemons that Prometheus scrapes (the ``job`` variable)."""
    panels = [
        *overview_stat_panels(),
        *runs_panels(),
        *overview_rank_panels(),
        *daemon_panels(),
        *shard_panels(),
        *store_panels(),
    ]
    job = query_variable(
        "job",
        "Job",
        "label_values(lrpilot_build_info, job)",
        "The Prometheus jobs that scrape lrpilot daemons.",
        multi=True,
    )
    return dashboard(
        OVERVIEW_UID,
        "lrpilot / overview",
        "Every run under lrpilot: step rate, loss, LR, recent LR changes, ranks, and the "
        "daemon itself.",
        panels,
        [job],
    )


def overview_stat_panels() -> list[Panel]:
    """The daemons at a glance: up, version, runs, ranks and records taken in."""
    return [
        stat(
            "Daemon",
            "Whether Prometheus reaches each daemon's /metrics.",
            target(f"up{{{JOB}}}", "{{instance}}"),
            mappings=value_map({0: ("DOWN", "red"), 1: ("UP", "green")}),
        ),
        stat(
            "Version",
            "The lrpilot version each daemon runs.",
            target(f"lrpilot_build_info{{{JOB}}}", "{{version}}"),
            text_mode="name",
        ),
        stat(
            "Runs active",
            "Runs with a rank connected.",
            target(f'sum(lrpilot_runs{{{JOB}, state="active"}})'),
        ),
        stat(
            "Runs ended",
            "Runs whose last rank left less than --metrics-ttl ago.",
            target(f'sum(lrpilot_runs{{{JOB}, state="ended"}})'),
        ),
        stat(
            "Connected ranks",
            "Training processes (ranks) connected, all runs.",
            target(f"sum(lrpilot_sessions{{{JOB}}})"),
        ),
        stat(
            "Records/s",
            "Metric records (steps and reports) the daemons take in per second.",
            target(f"sum(rate(lrpilot_records_ingested_total{{{JOB}}}[$__rate_interval]))"),
            unit=PER_SECOND,
        ),
    ]


def runs_panels() -> list[Panel]:
    """Each run's step rate, loss and LR, and the LR changes of the time range."""
    return [
        row("Runs"),
        runs_table(),
        timeseries(
            "Step rate",
            "Optimizer steps per second of each run (the daemon's smoothed rate). "
            "Click a series for its run.",
            target(f"lrpilot_run_steps_per_second{{{JOB}}}", "{{run}}"),
            unit="suffix: steps/s",
            run_link=True,
        ),
        timeseries(
            "Loss",
            "The last loss each run reported (pilot.step(loss=...)).",
            target(f'lrpilot_run_metric{{{JOB}, metric="loss"}}', "{{run}}"),
            run_link=True,
        ),
        timeseries(
            "LR",
            "The LR in effect for each param group (log scale).",
            target(f"lrpilot_group_lr{{{JOB}}}", "{{run}} / {{group}}"),
            log=True,
            run_link=True,
        ),
        recent_changes_table(),
    ]


def runs_table() -> Panel:
    """One line per run: policy, step, rate, loss, ranks, LR held, active, started."""
    return table(
        "Runs",
        "Every run in the daemons' /metrics (active, or ended within --metrics-ttl). "
        "Click a run for its dashboard.",
        [
            ("policy info", f"max by (run, kind) (lrpilot_run_policy_info{{{JOB}}})", {}),
            ("step", f"max by (run) (lrpilot_run_step{{{JOB}}})", {}),
            ("steps/s", f"max by (run) (lrpilot_run_steps_per_second{{{JOB}}})", {"decimals": 1}),
            ("loss", f'max by (run) (lrpilot_run_metric{{{JOB}, metric="loss"}})', {}),
            ("ranks", f"max by (run) (lrpilot_run_connected_ranks{{{JOB}}})", {}),
            ("world size", f"max by (run) (lrpilot_run_world_size{{{JOB}}})", {}),
            (
                "LR",
                f"max by (run) (lrpilot_run_lr_held{{{JOB}}})",
                {"mappings": value_map({0: ("policy", "green"), 1: ("HELD", "orange")})},
            ),
            (
                "state",
                f"max by (run) (lrpilot_run_active{{{JOB}}})",
                {"mappings": value_map({0: ("ended", "text"), 1: ("active", "green")})},
            ),
            (
                "started",
                f"max by (run) (lrpilot_run_start_time_seconds{{{JOB}}}) * 1000",
                {"unit": "dateTimeFromNow"},
            ),
        ],
        key=["run", "kind"],
        size=(24, 7),
        hide=["Value #A"],
        labels={"kind": "policy"},
        link_runs=True,
    )


def recent_changes_table() -> Panel:
    """LR changes in the time range, counted by run and reason."""
    return table(
        "Recent LR changes",
        "LR changes journaled in the dashboard's time range, by run and reason: the deciding "
        "policy's kind (plateau) or an operator's set_lr, pause, resume, policy_switch. "
        "Step-driven schedules move the LR every step and are not changes in this sense.",
        [
            (
                "changes",
                "round(sum by (run, reason) "
                f"(increase(lrpilot_run_lr_changes_total{{{JOB}}}[$__range]))) > 0",
                {"decimals": 0},
            )
        ],
        key=["run", "reason"],
        size=(12, 8),
        link_runs=True,
    )


def overview_rank_panels() -> list[Panel]:
    """Runs active and ended, ranks connected per run, rank lag and hook drops."""
    return [
        row("Ranks"),
        timeseries(
            "Runs",
            "Runs in /metrics: active (a rank connected) or ended (within the TTL).",
            target(f"sum by (state) (lrpilot_runs{{{JOB}}})", "{{state}}"),
            size=(6, 8),
            steps=True,
        ),
        timeseries(
            "Connected ranks",
            "Ranks connected, per run.",
            target(f"lrpilot_run_connected_ranks{{{JOB}}}", "{{run}}"),
            size=(6, 8),
            steps=True,
            run_link=True,
        ),
        timeseries(
            "Rank lag",
            "Steps the slowest rank of each run is behind its leading rank.",
            target(f"max by (run) (lrpilot_rank_lag_steps{{{JOB}}})", "{{run}}"),
            size=(6, 8),
            run_link=True,
        ),
        timeseries(
            "Hook drops",
            "Records the hooks dropped per second because their queue was full (the daemon "
            "down or slow): telemetry lost, never the training held up.",
            target(
                "sum by (run) "
                f"(rate(lrpilot_rank_records_dropped_total{{{JOB}}}[$__rate_interval]))",
                "{{run}}",
            ),
            size=(6, 8),
            unit=PER_SECOND,
            run_link=True,
        ),
    ]


def daemon_panels() -> list[Panel]:
    """The daemon process: messages and clients refused, throughput, annotations, CPU,
    memory, fds."""
    return [
        row("Daemon"),
        timeseries(
            "Rejected messages",
            "Messages and records the daemon refused, per second, by reason (docs/metrics.md "
            "lists them). internal_error is a bug: see the daemon's log.",
            target(
                "sum by (reason) "
                f"(rate(lrpilot_messages_rejected_total{{{JOB}}}[$__rate_interval]))",
                "{{reason}}",
            ),
            size=(8, 8),
            unit=PER_SECOND,
        ),
        timeseries(
            "Refused for their key",
            "With --keys: clients refused per second, by reason: no_key and unknown_key at "
            "the handshake (a client without keys, or with a key not in allowed/), forbidden "
            "(a message outside the key's runs), forbidden_control (a request outside its "
            "role). docs/security.md.",
            target(
                f"sum by (reason) (rate(lrpilot_auth_refused_total{{{JOB}}}[$__rate_interval]))",
                "{{reason}}",
            ),
            size=(8, 8),
            unit=PER_SECOND,
        ),
        timeseries(
            "Throughput",
            "Records taken in, and LR command messages sent, per second.",
            target(
                f"sum(rate(lrpilot_records_ingested_total{{{JOB}}}[$__rate_interval]))",
                "records in",
            ),
            target(
                f"sum(rate(lrpilot_commands_sent_total{{{JOB}}}[$__rate_interval]))",
                "commands out",
            ),
            size=(8, 8),
            unit=PER_SECOND,
        ),
        timeseries(
            "Grafana annotations",
            "Annotations the daemon posts for LR changes (--grafana-url), per second, by "
            "outcome: failed is Grafana down or refusing, dropped a full queue.",
            target(
                "sum by (outcome) "
                f"(rate(lrpilot_grafana_annotations_total{{{JOB}}}[$__rate_interval]))",
                "{{outcome}}",
            ),
            size=(8, 8),
            unit=PER_SECOND,
        ),
        timeseries(
            "Daemon CPU",
            "CPU time the daemon process uses (1 = one core).",
            target(
                f"rate(process_cpu_seconds_total{{{JOB}}}[$__rate_interval])",
                "{{instance}} {{shard}}",
            ),
            size=(8, 8),
            unit="percentunit",
        ),
        timeseries(
            "Daemon memory and store",
            "The daemon's resident memory, and its SQLite store (with the WAL) on disk.",
            target(f"process_resident_memory_bytes{{{JOB}}}", "resident {{instance}}"),
            target(f"lrpilot_store_size_bytes{{{JOB}}}", "store {{instance}}"),
            size=(8, 8),
            unit="bytes",
        ),
        timeseries(
            "Daemon file descriptors",
            "Open file descriptors (sockets, the store) against the limit (log scale).",
            target(f"process_open_fds{{{JOB}}}", "open {{instance}}"),
            target(f"process_max_fds{{{JOB}}}", "limit {{instance}}"),
            size=(8, 8),
            log=True,
        ),
    ]


def shard_panels() -> list[Panel]:
    """A daemon of several shards (lrpilot daemon --shards N): its processes,
    and what its front does. Empty for a daemon of one process."""
    return [
        row("Shards (lrpilot daemon --shards N)"),
        timeseries(
            "Shards serving",
            "With --shards: 1 while a shard serves, 0 while the front starts it again after "
            "it died (its runs' ranks reconnect and say hello again), and the shard count.",
            target(f"lrpilot_shard_up{{{JOB}}}", "shard {{index}} {{instance}}"),
            target(f"lrpilot_shards{{{JOB}}}", "shards {{instance}}"),
            size=(8, 8),
            steps=True,
        ),
        timeseries(
            "Shard restarts",
            "With --shards: times the front started a shard again after it died, over the "
            "interval. The daemon log says why it stopped.",
            target(
                f"sum by (index) (increase(lrpilot_shard_restarts_total{{{JOB}}}"
                "[$__rate_interval]))",
                "shard {{index}}",
            ),
            size=(8, 8),
            bars=True,
        ),
        timeseries(
            "Hellos moved, requests forwarded",
            "With --shards: hellos answered with the run's shard, per second (a rank that "
            "starts or reconnects), and operator requests the front forwarded to shards and "
            "those a shard did not answer within 10 s.",
            target(
                f"sum(rate(lrpilot_hellos_moved_total{{{JOB}}}[$__rate_interval]))",
                "hellos moved",
            ),
            target(
                f"sum(rate(lrpilot_control_forwarded_total{{{JOB}}}[$__rate_interval]))",
                "requests forwarded",
            ),
            target(
                f"sum(rate(lrpilot_control_timed_out_total{{{JOB}}}[$__rate_interval]))",
                "requests timed out",
            ),
            size=(8, 8),
            unit=PER_SECOND,
        ),
    ]


def store_panels() -> list[Panel]:
    """The daemon's store: whether it takes writes, and what waits or was lost."""
    return [
        row("Store"),
        stat(
            "Store",
            "Whether the daemon's SQLite store takes writes. While it does not (a full disk), "
            "the daemon steers the training from memory and keeps the writes for later; "
            "/healthz fails.",
            target(f"lrpilot_store_up{{{JOB}}}", "{{instance}}"),
            size=(4, 8),
            mappings=value_map({0: ("FAILING", "red"), 1: ("writes", "green")}),
        ),
        stat(
            "Store failing since",
            "When the store's current write failure began; 'no failure' while it takes writes.",
            target(f"lrpilot_store_failing_since_seconds{{{JOB}}} * 1000", "{{instance}}"),
            size=(4, 8),
            unit="dateTimeAsIso",
            mappings=value_map({0: ("no failure", "green")}),
        ),
        stat(
            "Store at start",
            "Problems PRAGMA quick_check found in the store, and runs rows set aside "
            "(quarantined) because the daemon could not use them, at the daemon's start: "
            "the daemon log says which.",
            target(f"lrpilot_store_check_problems{{{JOB}}}", "check problems {{instance}}"),
            target(f"lrpilot_store_quarantined_runs{{{JOB}}}", "quarantined {{instance}}"),
            size=(4, 8),
        ),
        timeseries(
            "Store backlog",
            "What waits for the store to take writes again (bounded at 64 MiB: past that the "
            "oldest records go); 0 when the store is well.",
            target(f"lrpilot_store_backlog_bytes{{{JOB}}}", "waiting {{instance}}"),
            size=(6, 8),
            unit="bytes",
        ),
        timeseries(
            "Store and scrape problems",
            "Per second: store transactions that failed, writes given up on by reason, LR "
            "commands sent before they could be journaled, batches waiting, runs a scrape "
            "left out (a render error, see the daemon log), ended runs let go of from memory "
            "(--max-ended-runs; the store keeps them). All 0 when well.",
            target(
                f"rate(lrpilot_store_failed_commits_total{{{JOB}}}[$__rate_interval])",
                "failed commits",
            ),
            target(
                "sum by (reason) "
                f"(rate(lrpilot_store_dropped_ops_total{{{JOB}}}[$__rate_interval]))",
                "dropped: {{reason}}",
            ),
            target(
                f"rate(lrpilot_journal_deferred_total{{{JOB}}}[$__rate_interval])",
                "journaled late",
            ),
            target(f"lrpilot_store_backlog_batches{{{JOB}}}", "batches waiting"),
            target(
                f"rate(lrpilot_render_errors_total{{{JOB}}}[$__rate_interval])",
                "runs left out of a scrape",
            ),
            target(
                f"rate(lrpilot_runs_forgotten_total{{{JOB}}}[$__rate_interval])",
                "ended runs let go of from memory",
            ),
            size=(6, 8),
        ),
    ]


# --- one run -------------------------------------------------------------------------

RUN = 'run="$run"'
RANK_COLUMNS = [
    ("step", "lrpilot_rank_step", {}),
    ("lag (steps)", "lrpilot_rank_lag_steps", {}),
    ("last command late by (steps)", "lrpilot_rank_command_late_steps", {}),
    ("last message", "lrpilot_rank_last_message_age_seconds", {"unit": "s"}),
    ("left out", "lrpilot_rank_left_out", {}),
    ("records sent", "lrpilot_rank_records_sent_total", {}),
    ("records dropped", "lrpilot_rank_records_dropped_total", {}),
    ("sync timeouts", "lrpilot_rank_sync_timeouts_total", {}),
    ("foreign LR writes", "lrpilot_rank_foreign_lr_writes_total", {}),
    ("commands applied", "lrpilot_rank_commands_applied_total", {}),
    ("commands late", "lrpilot_rank_commands_late_total", {}),
    ("daemon errors", "lrpilot_rank_daemon_errors_total", {}),
]
RANK_TROUBLE = [
    ("records dropped", "lrpilot_rank_records_dropped_total"),
    ("sync timeouts", "lrpilot_rank_sync_timeouts_total"),
    ("foreign LR writes", "lrpilot_rank_foreign_lr_writes_total"),
    ("daemon errors", "lrpilot_rank_daemon_errors_total"),
]


def run_dashboard() -> dict[str, Any]:
    """One run (the ``run`` variable): its metrics against its LR, the policy's
    state, its ranks, and its LR changes as annotations."""
    panels = [
        *run_stat_panels(),
        *metrics_and_lr_panels(),
        *policy_state_panels(),
        *progress_panels(),
        *run_rank_panels(),
    ]
    variables = [
        query_variable("run", "Run", "label_values(lrpilot_run_step, run)", "The run id."),
        query_variable(
            "metric",
            "Metrics",
            f"label_values(lrpilot_run_metric{{{RUN}}}, metric)",
            "The metrics the run reports, drawn against its LR.",
            multi=True,
        ),
    ]
    return dashboard(
        RUN_UID,
        "lrpilot / run",
        "One run: its metrics against its LR, the LR and momentum per param group, the "
        "policy's state, its ranks, and every LR change as an annotation.",
        panels,
        variables,
        lr_change_annotations(),
    )


def run_stat_panels() -> list[Panel]:
    """The run at a glance: policy, step, step rate, ranks, LR held, command version."""
    held = value_map({0: ("policy", "green"), 1: ("HELD", "orange")})
    return [
        stat(
            "Policy",
            "The kind of the policy in effect (none: the script's own LRs).",
            target(f"lrpilot_run_policy_info{{{RUN}}}", "{{kind}}"),
            text_mode="name",
        ),
        stat("Step", "The run's last optimizer step.", target(f"lrpilot_run_step{{{RUN}}}")),
        stat(
            "Steps/s",
            "Optimizer steps per second (smoothed).",
            target(f"lrpilot_run_steps_per_second{{{RUN}}}"),
            unit="suffix: steps/s",
        ),
        stat(
            "Ranks",
            "Ranks connected, and the world size the run declared.",
            target(f"lrpilot_run_connected_ranks{{{RUN}}}", "connected"),
            target(f"lrpilot_run_world_size{{{RUN}}}", "world size"),
        ),
        stat(
            "LR held",
            "HELD while an operator holds the LRs (set-lr, pause); resume gives them back "
            "to the policy.",
            target(f"lrpilot_run_lr_held{{{RUN}}}"),
            mappings=held,
        ),
        stat(
            "Command version",
            "Version of the run's last LR command (each LR change adds one).",
            target(f"lrpilot_run_command_version{{{RUN}}}"),
        ),
    ]


def metrics_and_lr_panels() -> list[Panel]:
    """The run's metrics against its LR, and the LR and momentum per param group."""
    lr_on_the_right = {
        "matcher": {"id": "byFrameRefID", "options": "B"},
        "properties": [
            {"id": "custom.axisPlacement", "value": "right"},
            {"id": "custom.axisLabel", "value": "LR"},
            {"id": "custom.scaleDistribution", "value": {"log": 10, "type": "log"}},
            {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
        ],
    }
    return [
        timeseries(
            "Metrics and LR",
            "The metrics the run reports (the Metrics variable) on the left axis; the LR of "
            "each param group, dashed, on the right (log scale).",
            target(f'lrpilot_run_metric{{{RUN}, metric=~"$metric"}}', "{{metric}}"),
            target(f"lrpilot_group_lr{{{RUN}}}", "LR {{group}}"),
            size=(24, 10),
            overrides=[lr_on_the_right],
        ),
        timeseries(
            "LR per group",
            "The LR in effect for each param group (log scale).",
            target(f"lrpilot_group_lr{{{RUN}}}", "{{group}}"),
            log=True,
        ),
        timeseries(
            "Momentum per group",
            "Momentum (SGD) or beta1 (Adam) per param group, for the policies that cycle it "
            "(cyclic, onecycle); empty for the others.",
            target(f"lrpilot_group_momentum{{{RUN}}}", "{{group}}"),
        ),
    ]


def policy_state_panels() -> list[Panel]:
    """The policy's spec and the state of each kind: plateau, cycles, stage; held or not."""
    return [
        row("Policy state"),
        table(
            "Policy",
            "The policy in effect and its whole spec (`lrpilot policy` switches it).",
            [("in effect", f"max by (kind, spec) (lrpilot_run_policy_info{{{RUN}}})", {})],
            key=["kind", "spec"],
            size=(24, 4),
            hide=["Value"],
        ),
        timeseries(
            "Plateau: best",
            "plateau: the best value of its metric so far.",
            target(f"lrpilot_policy_plateau_best{{{RUN}}}", "best"),
            size=(8, 8),
            steps=True,
        ),
        timeseries(
            "Plateau: bad records and cooldown",
            "plateau: records since the metric last improved (a cut comes after patience of "
            "them), and records of cooldown left.",
            target(f"lrpilot_policy_plateau_bad_steps{{{RUN}}}", "bad records"),
            target(f"lrpilot_policy_plateau_cooldown_steps{{{RUN}}}", "cooldown"),
            size=(8, 8),
            steps=True,
        ),
        state_timeline(
            "Held and active",
            "When an operator held the LRs, and whether a rank was connected.",
            target(f"lrpilot_run_lr_held{{{RUN}}}", "LR"),
            target(f"lrpilot_run_active{{{RUN}}}", "run"),
            mappings=value_map({0: ("policy / ended", "text"), 1: ("held / active", "orange")}),
        ),
        timeseries(
            "Cycle and restarts",
            "cyclic, cosine_restarts: the cycle the schedule is in (from 1); "
            "cosine_restarts: warm restarts so far.",
            target(f"lrpilot_policy_cycle{{{RUN}}}", "cycle"),
            target(f"lrpilot_policy_restarts_total{{{RUN}}}", "restarts"),
            size=(8, 8),
            steps=True,
        ),
        timeseries(
            "Cycle position",
            "cyclic, cosine_restarts, onecycle: how far into the cycle.",
            target(f"lrpilot_policy_cycle_position_ratio{{{RUN}}}", "position"),
            size=(8, 8),
            unit="percentunit",
            bounds=(0, 1),
        ),
        timeseries(
            "Sequential: stage",
            "sequential: the index of the stage in effect, from 0.",
            target(f"lrpilot_policy_stage{{{RUN}}}", "stage"),
            size=(8, 8),
            steps=True,
        ),
        timeseries(
            "Range test: smoothed loss and LR",
            "range_test: while the sweep runs, its smoothed loss (left) and its LR (dashed, "
            "right, log scale): the loss falls, then turns up as the LR grows too large. "
            "`lrpilot range-test RUN --last --plot out.png` draws the curve against the LR.",
            target(f"lrpilot_policy_range_test_smoothed_loss{{{RUN}}}", "smoothed loss"),
            target(f"lrpilot_policy_range_test_lr{{{RUN}}}", "sweep LR"),
            size=(16, 8),
            overrides=[
                {
                    "matcher": {"id": "byFrameRefID", "options": "B"},
                    "properties": [
                        {"id": "custom.axisPlacement", "value": "right"},
                        {"id": "custom.axisLabel", "value": "LR"},
                        {"id": "custom.scaleDistribution", "value": {"log": 10, "type": "log"}},
                        {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
                    ],
                }
            ],
        ),
        stat(
            "Range test: suggested LR",
            "range_test: the LR the sweep suggested (the policy after it starts from it), "
            "and whether a sweep is running.",
            target(f"lrpilot_policy_range_test_suggested_lr{{{RUN}}}", "suggested"),
            target(f"lrpilot_policy_range_test_sweeping{{{RUN}}}", "sweeping"),
            size=(8, 8),
        ),
        timeseries(
            "Guard: trips and cut",
            "guard: trips so far (each cuts the LRs and shows in pilot.tripped), and steps "
            "of the cut left.",
            target(f"lrpilot_policy_guard_trips_total{{{RUN}}}", "trips"),
            target(f"lrpilot_policy_guard_holding{{{RUN}}}", "cut steps left"),
            size=(12, 8),
            steps=True,
        ),
        timeseries(
            "Guard: watched metric and its window's mean",
            "guard: the mean the spike rule compares each value with (a trip is a value far "
            "above it, or one that is not finite).",
            target(f"lrpilot_policy_guard_window_mean{{{RUN}}}", "window mean"),
            size=(12, 8),
        ),
    ]


def progress_panels() -> list[Panel]:
    """The run's step, its step rate and its LR changes by reason."""
    return [
        row("Progress and LR changes"),
        timeseries(
            "Step",
            "The run's last optimizer step (its leading rank).",
            target(f"lrpilot_run_step{{{RUN}}}", "step"),
            size=(8, 8),
        ),
        timeseries(
            "Step rate",
            "Steps per second: the daemon's smoothed rate, and the step's rate between scrapes.",
            target(f"lrpilot_run_steps_per_second{{{RUN}}}", "daemon"),
            target(f"rate(lrpilot_run_step{{{RUN}}}[$__rate_interval])", "scraped"),
            size=(8, 8),
            unit="suffix: steps/s",
        ),
        timeseries(
            "LR changes",
            "LR changes journaled, by reason (plateau, set_lr, pause, resume, policy_switch); "
            "the annotations on every graph mark the same changes.",
            target(
                "sum by (reason) "
                f"(increase(lrpilot_run_lr_changes_total{{{RUN}}}[$__rate_interval]))",
                "{{reason}}",
            ),
            size=(8, 8),
            bars=True,
        ),
    ]


def run_rank_panels() -> list[Panel]:
    """Each rank: a table of its counters, its lag, lateness, last message, hook trouble."""
    return [
        row("Ranks"),
        table(
            "Ranks",
            "Each connected rank: its step and lag, how late it applied the last command, "
            "and its hook's counters (since its training process started).",
            [(name, f"max by (rank) ({m}{{{RUN}}})", conf) for name, m, conf in RANK_COLUMNS],
            key=["rank"],
        ),
        timeseries(
            "Lag per rank",
            "Steps each rank is behind the run's leading rank.",
            target(f"lrpilot_rank_lag_steps{{{RUN}}}", "rank {{rank}}"),
            size=(6, 8),
        ),
        timeseries(
            "Command late steps per rank",
            "How many steps after its effective step each rank applied the last command "
            "(0: on time, the same step on every rank).",
            target(f"lrpilot_rank_command_late_steps{{{RUN}}}", "rank {{rank}}"),
            size=(6, 8),
            steps=True,
        ),
        timeseries(
            "Last message age per rank",
            "Seconds since each rank's last message.",
            target(f"lrpilot_rank_last_message_age_seconds{{{RUN}}}", "rank {{rank}}"),
            size=(6, 8),
            unit="s",
        ),
        timeseries(
            "Decisions waiting for ranks",
            "Records a metric-driven decision holds until every rank has sent its value of "
            "the step (the policy's reduce), and records decided on without a rank that stayed "
            "silent past --rank-wait-timeout (that rank is left out until it sends again).",
            target(f"lrpilot_run_waiting_records{{{RUN}}}", "waiting records"),
            target(
                f"increase(lrpilot_run_rank_wait_timeouts_total{{{RUN}}}[$__rate_interval])",
                "decided without a silent rank",
            ),
            size=(6, 8),
        ),
        timeseries(
            "Hook trouble per rank",
            "Per second: records dropped (queue full), sync timeouts, LR writes by other "
            "code, error replies from the daemon.",
            *(
                target(f"rate({m}{{{RUN}}}[$__rate_interval])", f"{name} rank {{{{rank}}}}")
                for name, m in RANK_TROUBLE
            ),
            size=(6, 8),
            unit=PER_SECOND,
        ),
    ]


def lr_change_annotations() -> list[dict[str, Any]]:
    """The run's LR changes as seen by Prometheus, and as the daemon posted them."""
    version = f"lrpilot_run_command_version{{{RUN}}}"
    return [
        {
            # Where the command version moved since the previous evaluation; the
            # `unless` half marks a run's first command when the run had no
            # series one step earlier. One marker per step at most: the
            # daemon's own annotations (below) have the exact time and reason.
            "datasource": DATASOURCE,
            "enable": True,
            "expr": (
                f"{version} > {version} offset {ANNOTATION_STEP} "
                f"or ({version} > 0 unless {version} offset {ANNOTATION_STEP})"
            ),
            "iconColor": "orange",
            "name": "LR commands (Prometheus)",
            "step": ANNOTATION_STEP,
            "tagKeys": "run",
            "textFormat": "the LR command version moved: `lrpilot history {{run}}` has the change",
            "titleFormat": "LR change",
            "useValueForTime": False,
        },
        {
            "datasource": GRAFANA_DATASOURCE,
            "enable": True,
            "iconColor": "red",
            "name": "LR changes (daemon)",
            "target": {
                "limit": 200,
                "matchAny": False,
                "tags": ["lrpilot", "run:$run"],
                "type": "tags",
            },
        },
    ]


# --- files -----------------------------------------------------------------------------

DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "lrpilot-overview.json": overview,
    "lrpilot-run.json": run_dashboard,
}


def render(build: Callable[[], dict[str, Any]]) -> str:
    """Sorted keys and an indent, so that a change to the script is a readable diff."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a file differs from what this script writes",
    )
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path, want = HERE / name, render(build)
        if not args.check:
            path.write_text(want)
        elif not path.exists() or path.read_text() != want:
            stale.append(name)
    if stale:
        print(
            f"dashboards/generate.py: out of date: {', '.join(stale)} "
            "(run `python dashboards/generate.py`)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
