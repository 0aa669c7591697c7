"""dashboards/ against a real Prometheus scraping a real daemon.

One module-scoped setup (``live``): `lrpilot daemon`, Debian's `prometheus`
scraping its /metrics every second, and a real torch training
(tests/live/train_digits.py: four MLPs on scikit-learn's digits, one process)
whose runs between them have every policy state the exporter knows: plateau
(best / bad / cooldown, a cut), cyclic (momentum, cycle, position),
cosine_restarts (restarts), sequential (stage). An operator `lrpilot set-lr`,
`resume`, `set-lr` on one run gives LR changes inside Prometheus's window.
The training keeps stepping (and its ranks stay connected) until the module
is done.

Checked:

- the committed JSON is what dashboards/generate.py writes (and --check
  notices a stale or missing file);
- structure: uids, unique panel ids, a gridPos inside the 24 columns with no
  two panels overlapping, the `lrpilot-prometheus` datasource on every panel,
  target, variable and Prometheus annotation, a target on every panel but
  rows, the LR on a right log axis, the two kinds of LR-change annotation,
  data links to the run dashboard;
- the dashboards use only metrics listed in docs/metrics.md (and `up`), and
  every lrpilot_* metric there is on a dashboard;
- every metric in docs/metrics.md is in Prometheus, and every lrpilot_*
  metric the daemon serves is in docs/metrics.md;
- every variable query resolves to the runs, metrics and job there are;
- every panel query, with the variables substituted, returns data: on the
  overview; on the run dashboard for every run (the panels of one policy's
  state, for the runs with that policy);
- the Prometheus annotation marks the run whose LR changed, and not a run
  whose LR never changed.

Every wait is a poll with a deadline; every process is killed on the way out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from procs import DaemonProcess, free_ports, lrpilot, ok, start_digits, wait_for
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import PrometheusProcess, prometheus_process

GENERATE = ROOT / "dashboards" / "generate.py"
DASHBOARDS = {
    "lrpilot-overview": ROOT / "dashboards" / "lrpilot-overview.json",
    "lrpilot-run": ROOT / "dashboards" / "lrpilot-run.json",
}
METRICS_DOC = ROOT / "docs" / "metrics.md"
DATASOURCE = {"type": "prometheus", "uid": "lrpilot-prometheus"}
# Grafana's $__rate_interval with a 1 s scrape interval is 4 scrapes; one more
# keeps two samples in every window despite scrape jitter.
RATE_INTERVAL = "5s"
SETUP_S = 40.0  # torch's import, the first steps, the first scrapes (about 10 s here)

PLATEAU = "digits-plateau"  # also the run an operator sets the LR of
NEVER_CHANGED = "digits-cyclic"  # a step-driven schedule: no LR command, ever
POLICIES = {
    # A threshold no loss meets: a cut every patience + 1 records.
    PLATEAU: {"kind": "plateau", "metric": "loss", "patience": 10, "threshold": 0.5},
    NEVER_CHANGED: {
        "kind": "cyclic",
        "base_lr": [0.01, 0.005],
        "max_lr": [0.2, 0.1],
        "step_size_up": 25,
        "step_size_down": 15,
    },
    # A guard that never trips (its gauges), around a step-driven schedule.
    "digits-restarts": {
        "kind": "guard",
        "inner": {"kind": "cosine_restarts", "T_0": 20},
        "spike": "off",
    },
    # A range test that sweeps for the whole test, and one that is done.
    "digits-sweeping": {
        "kind": "range_test",
        "min_lr": 1e-5,
        "max_lr": 0.05,
        "steps": 10_000,
        "diverge": None,
    },
    "digits-swept": {
        "kind": "range_test",
        "min_lr": 1e-4,
        "max_lr": 0.1,
        "steps": 20,
        "skip_begin": 2,
        "then": {"kind": "cosine", "T_max": 1000},
    },
    "digits-warmup": {
        "kind": "sequential",
        "policies": [
            {"kind": "linear", "start_factor": 0.1, "total_iters": 30},
            {"kind": "plateau", "metric": "loss", "patience": 20},
        ],
        "milestones": [30],
    },
}
# Panels on a policy's state have data for the runs with that policy only;
# every other run-dashboard query must have data for every run.
ONE_POLICY_ONLY = ("lrpilot_policy_", "lrpilot_group_momentum", "lrpilot_run_lr_changes_total")


def dashboard(uid: str) -> dict:
    return json.loads(DASHBOARDS[uid].read_text())


def documented_metrics() -> set[str]:
    """The metric names of docs/metrics.md: its tables' first column, and the
    process_* / python_* list."""
    text = METRICS_DOC.read_text()
    names = set(re.findall(r"^\| `(lrpilot_\w+)` \|", text, re.MULTILINE))
    names |= set(re.findall(r"`((?:process|python)_\w+)`", text))
    assert len(names) > 40, f"docs/metrics.md: only {sorted(names)} found; did its format change?"
    return names


def targets_of(board: dict) -> Iterator[tuple[dict, dict]]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def prometheus_annotations(board: dict) -> list[dict]:
    return [a for a in board["annotations"]["list"] if a["datasource"]["type"] == "prometheus"]


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression selects (every selector has braces here)."""
    return set(re.findall(r"([a-zA-Z_:][\w:]*)\s*\{", expr))


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation, for the forms the dashboards use:
    $name, ${name}, [[name]]."""

    def one(found: re.Match) -> str:
        name = next(group for group in found.groups() if group)
        assert name in values, f"no value for ${name} in {expr!r}"
        return values[name]

    out = re.sub(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]", one, expr)
    assert "$" not in out, f"a variable left in {out!r}"
    return out


def regex_of(values: list[str]) -> str:
    """How Grafana writes a multi-value variable into a regex matcher."""
    return "(" + "|".join(re.escape(v) for v in values) + ")"


# --- the generator and the JSON --------------------------------------------------


def test_the_committed_json_is_what_generate_writes():
    done = subprocess.run(
        [sys.executable, str(GENERATE), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_generate_check_notices_a_missing_or_stale_file(tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(GENERATE.read_text())

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=60
        )

    missing = run("--check")
    assert missing.returncode == 1
    assert "lrpilot-overview.json, lrpilot-run.json" in missing.stderr
    assert not list(tmp_path.glob("*.json")), "--check wrote a file"
    assert run().returncode == 0
    assert (tmp_path / "lrpilot-run.json").read_text() == DASHBOARDS["lrpilot-run"].read_text()
    assert run("--check").returncode == 0
    stale = tmp_path / "lrpilot-overview.json"
    stale.write_text(stale.read_text().replace('"refresh": "10s"', '"refresh": "1m"'))
    again = run("--check")
    assert again.returncode == 1
    assert "out of date: lrpilot-overview.json (run" in again.stderr


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_structure(uid):
    board = dashboard(uid)
    assert (board["uid"], board["id"], board["tags"]) == (uid, None, ["lrpilot"])
    assert 36 <= board["schemaVersion"] <= 41
    assert board["refresh"] and board["time"]["from"].startswith("now-")
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        where, title = panel["gridPos"], panel["title"]
        assert where["x"] >= 0 and where["w"] > 0 and where["x"] + where["w"] <= 24, title
        for x in range(where["x"], where["x"] + where["w"]):
            for y in range(where["y"], where["y"] + where["h"]):
                assert (x, y) not in cells, f"{title!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = title
        if panel["type"] in ("row", "text"):
            continue
        assert panel["type"] in ("timeseries", "stat", "table", "state-timeline"), title
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], f"panel {title!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title
    for variable in board["templating"]["list"]:
        assert variable["datasource"] == DATASOURCE, variable["name"]
    for annotation in prometheus_annotations(board):
        assert annotation["datasource"] == DATASOURCE
    for annotation in board["annotations"]["list"]:
        assert annotation["datasource"]["type"] in ("prometheus", "grafana"), annotation


def test_the_run_dashboard_draws_the_lr_on_a_right_log_axis_and_marks_changes():
    board = dashboard("lrpilot-run")
    [panel] = [p for p in board["panels"] if p["title"] == "Metrics and LR"]
    by_ref = {t["refId"]: t["expr"] for t in panel["targets"]}
    [override] = panel["fieldConfig"]["overrides"]
    lr_ref = override["matcher"]["options"]
    assert override["matcher"]["id"] == "byFrameRefID"
    assert by_ref[lr_ref].startswith("lrpilot_group_lr{")
    props = {p["id"]: p["value"] for p in override["properties"]}
    assert props["custom.axisPlacement"] == "right"
    assert props["custom.scaleDistribution"] == {"log": 10, "type": "log"}
    assert any("lrpilot_run_metric" in expr for expr in by_ref.values())
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "run"]
    assert (variable["multi"], variable["includeAll"]) == (False, False)
    [from_prometheus] = prometheus_annotations(board)
    assert "lrpilot_run_command_version" in from_prometheus["expr"]
    [native] = [a for a in board["annotations"]["list"] if a["datasource"]["type"] == "grafana"]
    assert native["target"]["type"] == "tags"
    assert native["target"]["tags"] == ["lrpilot", "run:$run"]


def test_the_overview_links_every_run_to_its_dashboard():
    board = dashboard("lrpilot-overview")
    links = []
    for panel in board["panels"]:
        config = panel.get("fieldConfig", {})
        links += config.get("defaults", {}).get("links", [])
        for override in config.get("overrides", []):
            links += [v for p in override["properties"] if p["id"] == "links" for v in p["value"]]
    assert len(links) >= 5, links
    for link in links:
        assert link["url"].startswith("/d/lrpilot-run/"), link
        assert re.search(r"var-run=\$\{__(field\.labels\.run|value\.raw)\}$", link["url"]), link


def test_dashboards_use_only_documented_metrics_and_show_every_lrpilot_metric():
    documented = documented_metrics()
    used: set[str] = set()
    for uid in DASHBOARDS:
        board = dashboard(uid)
        exprs = [t["expr"] for _, t in targets_of(board)]
        exprs += [a["expr"] for a in prometheus_annotations(board)]
        exprs += [v["definition"] for v in board["templating"]["list"]]
        for expr in exprs:
            unknown = metric_names(expr) - documented - {"up"}
            assert not unknown, f"{uid}: {expr!r} uses {unknown}, not in docs/metrics.md"
            used |= metric_names(expr)
    unshown = {name for name in documented if name.startswith("lrpilot_")} - used
    assert not unshown, f"on no dashboard: {sorted(unshown)}"


# --- the live setup -------------------------------------------------------------------


@dataclass
class Live:
    prom: PrometheusProcess
    daemon: DaemonProcess
    start: float  # Unix time before the first scrape
    metrics_text: str  # the daemon's /metrics once everything is in Prometheus

    def span(self) -> tuple[float, float, str]:
        """(start, end, $__range) of the test so far."""
        end = time.time()
        return self.start, end, f"{int(end - self.start) + 1}s"


def start_training(where: Path, address: str, digits: Path) -> tuple[subprocess.Popen, Path]:
    """The four runs in one torch process, paced, until ``stop`` appears."""
    stop = where / "stop"
    config = {
        "address": address,
        "data": str(digits),
        "steps": 1_000_000,
        "deadline_s": 180,
        "stop_file": str(stop),
        "step_sleep": 0.01,  # pace, not synchronisation: ~50 steps/s, the CPUs left for the rest
        "summary": str(where / "summary.json"),
        "trainers": [
            {
                "run": run,
                "policy": policy,
                "lrs": [0.1, 0.05],
                "report_every": 10 if run == PLATEAU else 0,  # val_loss: a second metric
                "out": str(where / f"{run}.jsonl"),
            }
            for run, policy in POLICIES.items()
        ],
    }
    return start_digits(config, where), stop


def scalar(prom: PrometheusProcess, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.fixture(scope="module")
def live(lrpilot_exe, digits, tmp_path_factory) -> Iterator[Live]:
    where = tmp_path_factory.mktemp("dashboards")
    with ExitStack() as stack:
        # Two shards: the panels are proved on the daemon's whole surface,
        # the front's families and every series with its shard label included.
        daemon = DaemonProcess(
            lrpilot_exe,
            where / "state",
            where / "daemon.log",
            "--shards",
            "2",
            "--shard-base-port",
            str(free_ports(2)),
        )
        stack.callback(daemon.stop)
        prom = stack.enter_context(prometheus_process(where / "prometheus", [daemon.metrics]))
        start = time.time()
        training, stop = start_training(where, daemon.address, digits)

        def stop_training() -> None:
            stop.write_text("stop")
            try:
                training.wait(30)
            finally:
                if training.poll() is None:
                    training.kill()
                    training.wait(10)

        stack.callback(stop_training)
        daemon.wait_ready()

        def detail() -> str:
            return (
                f"--- training\n{(where / 'train.out').read_text()}\n"
                f"--- daemon\n{daemon.log()}\n--- prometheus\n{prom.log()}"
            )

        def check_training() -> None:
            if training.poll() is not None:
                raise AssertionError(f"the training exited with {training.returncode}\n{detail()}")

        # Every documented metric in Prometheus: the runs are up and stepping.
        documented = documented_metrics()

        def everything_scraped() -> bool:
            check_training()
            return not documented - scraped_names(prom)

        def missing() -> str:
            return f"not in Prometheus: {sorted(documented - scraped_names(prom))}\n{detail()}"

        wait_for(everything_scraped, SETUP_S, "every documented metric in Prometheus", missing)

        # An operator's changes, each seen by a scrape, so that increase()
        # over the test's window has a change in it (a counter's first sample
        # is not an increase).
        def set_lr_changes_scraped(n: int) -> bool:
            check_training()
            expr = f'lrpilot_run_lr_changes_total{{run="{PLATEAU}", reason="set_lr"}}'
            return scalar(prom, expr) == n

        control = ("--control", daemon.control)
        ok(lrpilot(lrpilot_exe, "set-lr", *control, PLATEAU, "0.01"))
        wait_for(lambda: set_lr_changes_scraped(1), 15, "a scrape after set-lr", detail)
        ok(lrpilot(lrpilot_exe, "resume", *control, PLATEAU))
        ok(lrpilot(lrpilot_exe, "set-lr", *control, PLATEAU, "0.02"))
        wait_for(lambda: set_lr_changes_scraped(2), 15, "a scrape after the second set-lr", detail)

        # rate() over $__rate_interval needs two samples of every run in it.
        full = f"count(count_over_time(lrpilot_run_step[{RATE_INTERVAL}]) >= 3)"
        wait_for(lambda: scalar(prom, full) == len(POLICIES), 15, "full rate windows", detail)

        yield Live(prom, daemon, start, daemon.scrape())
        check_training()  # it was stepping all along


def scraped_names(prom: PrometheusProcess) -> set[str]:
    found = prom.query('count by (__name__) ({job="lrpilot"})')
    return {series["metric"]["__name__"] for series in found}


# --- metrics: docs/metrics.md, the daemon, Prometheus -----------------------------------


def test_every_documented_metric_is_in_prometheus(live):
    missing = documented_metrics() - scraped_names(live.prom)
    assert not missing, f"documented, not scraped: {sorted(missing)}"


def test_every_lrpilot_metric_the_daemon_serves_is_documented(live):
    served = {
        sample.name
        for family in text_string_to_metric_families(live.metrics_text)
        for sample in family.samples
    }
    lrpilot_metrics = {name for name in served if name.startswith("lrpilot_")}
    assert len(lrpilot_metrics) > 30, sorted(served)
    undocumented = lrpilot_metrics - documented_metrics()
    assert not undocumented, f"served, not in docs/metrics.md: {sorted(undocumented)}"


# --- the dashboards' queries ---------------------------------------------------------


def variable_values(live: Live, board: dict, run: str = PLATEAU) -> dict[str, list[str]]:
    """Each template variable resolved as Grafana does: label_values(match,
    label) is the label values API with that match."""
    values = {}
    for variable in board["templating"]["list"]:
        query = substitute(variable["definition"], {"run": run})
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert found, f"not a label_values() query: {query!r}"
        match, label = found.groups()
        values[variable["name"]] = live.prom.label_values(label, match)
    return values


def test_variable_queries_resolve_to_the_runs_metrics_and_job(live):
    overview = variable_values(live, dashboard("lrpilot-overview"))
    assert overview == {"job": ["lrpilot"]}
    run = variable_values(live, dashboard("lrpilot-run"))
    assert set(run) == {"run", "metric"}
    assert sorted(run["run"]) == sorted(POLICIES)
    assert run["metric"] == ["loss", "val_loss"]  # the plateau run reports both
    assert variable_values(live, dashboard("lrpilot-run"), NEVER_CHANGED)["metric"] == ["loss"]


def has_data(live: Live, target: dict, values: dict[str, str]) -> bool:
    start, end, _ = live.span()
    expr = substitute(target["expr"], values)
    if target.get("instant"):
        return bool(live.prom.query(expr))
    return any(series["values"] for series in live.prom.query_range(expr, start, end))


def builtins(live: Live) -> dict[str, str]:
    return {"__rate_interval": RATE_INTERVAL, "__interval": "1s", "__range": live.span()[2]}


def test_every_overview_query_returns_data(live):
    board = dashboard("lrpilot-overview")
    values = {k: regex_of(v) for k, v in variable_values(live, board).items()}
    values |= builtins(live)
    empty = [
        f"#{panel['id']} {panel['title']} {target['refId']}: {target['expr']}"
        for panel, target in targets_of(board)
        if not has_data(live, target, values)
    ]
    assert not empty, "no data:\n" + "\n".join(empty)


def test_every_run_dashboard_query_returns_data_for_its_runs(live):
    board = dashboard("lrpilot-run")
    empty = []
    for panel, target in targets_of(board):
        with_data = []
        for run in POLICIES:
            values = {"run": run, **builtins(live)}
            values["metric"] = regex_of(variable_values(live, board, run)["metric"])
            if has_data(live, target, values):
                with_data.append(run)
        every_run = not any(name in target["expr"] for name in ONE_POLICY_ONLY)
        if (every_run and len(with_data) < len(POLICIES)) or not with_data:
            empty.append(
                f"#{panel['id']} {panel['title']} {target['refId']} (data for {with_data})"
            )
    assert not empty, "no data:\n" + "\n".join(empty)


def test_the_prometheus_annotation_marks_the_run_whose_lr_changed(live):
    [annotation] = prometheus_annotations(dashboard("lrpilot-run"))
    start, end, _ = live.span()
    assert scalar(live.prom, f'lrpilot_run_command_version{{run="{NEVER_CHANGED}"}}') == 0

    def marks(run: str) -> list:
        expr = substitute(annotation["expr"], {"run": run})
        return [p for series in live.prom.query_range(expr, start, end) for p in series["values"]]

    assert marks(PLATEAU), "no LR change marked on the run whose LR was set"
    assert not marks(NEVER_CHANGED), "a change marked on a run whose LR never changed"
