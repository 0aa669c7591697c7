"""`lrpilot dashboards push` and the daemon's Grafana annotations.

No Grafana server can be installed in the test environment, so these tests
talk to tests/grafana_standin.py: a local HTTP stand-in that follows
Grafana's documented HTTP API (status codes and bodies) for the endpoints
lrpilot uses, and records every request. Everything else is real: the
`lrpilot` command as a user runs it, grafana-client and its HTTP stack over
real sockets, a real `lrpilot daemon` process steering a real training
process (tests/live/train_stream.py, lock-step), its /metrics.

What they prove: a push creates the datasource, folder and dashboards; a
second push sends no write at all; a changed dashboard (or Prometheus URL) is
updated in place, never duplicated; the token goes as a bearer token and
user/password as basic auth, flags over environment; wrong credentials, an
unreachable or hanging Grafana, a bad URL and a file that is not JSON each
give one line on stderr and exit 1; every journaled LR change becomes one
annotation with the run's tags; a Grafana that fails or hangs neither slows
nor stops the daemon, and /metrics counts what failed or was dropped; no
secret shows in --help.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from grafana_standin import GrafanaStandIn
from procs import (
    DaemonProcess,
    Training,
    free_port,
    lrpilot,
    metric_value,
    ok,
    ok_json,
    one_line_error,
    settled_history,
    stream_trainer,
    wait_for,
)

from lrpilot.daemon.cli.main import main as cli_main
from lrpilot.daemon.observability.dashboards import dashboard_dirs, find_dashboard_dir

TOKEN = "glsa_test-token-0123456789"
SECRET_WORDS = "correct horse battery staple"
GRAFANA_ENV = ("LRPILOT_GRAFANA_TOKEN", "LRPILOT_GRAFANA_USER", "LRPILOT_GRAFANA_PASSWORD")


@pytest.fixture
def grafana() -> Iterator[GrafanaStandIn]:
    stand_in = GrafanaStandIn(token=TOKEN)
    try:
        yield stand_in
    finally:
        stand_in.close()


@pytest.fixture(autouse=True)
def no_grafana_env(monkeypatch) -> None:
    """Credentials a developer has in their shell must not leak into a test."""
    for name in GRAFANA_ENV:
        monkeypatch.delenv(name, raising=False)


def overview(title: str = "lrpilot overview") -> dict:
    return {
        "uid": "lrpilot-overview",
        "title": title,
        "schemaVersion": 39,
        "panels": [
            {
                "type": "timeseries",
                "title": "LR",
                "datasource": {"type": "prometheus", "uid": "lrpilot-prometheus"},
                "targets": [{"expr": "lrpilot_lr"}],
            }
        ],
    }


def run_dashboard() -> dict:
    return {"uid": "lrpilot-run", "title": "lrpilot run", "schemaVersion": 39, "panels": []}


@pytest.fixture
def dashboards(tmp_path) -> Path:
    """Small dashboard files of our own (the real ones: test_push_the_shipped_dashboards)."""
    where = tmp_path / "dashboards"
    where.mkdir()
    (where / "lrpilot-overview.json").write_text(json.dumps(overview(), indent=2))
    (where / "lrpilot-run.json").write_text(json.dumps(run_dashboard(), indent=2))
    return where


def push(exe: str, grafana: GrafanaStandIn, *flags: str, token: str | None = TOKEN):
    auth = ("--token", token) if token else ()
    return lrpilot(exe, "dashboards", "push", "--grafana-url", grafana.url, *auth, *flags)


def outcomes(done) -> dict[tuple[str, str], str]:
    answer = ok_json(done)
    return {(o["kind"], o["uid"]): o["outcome"] for o in answer["objects"]}


def refused(done, *says: str) -> str:
    return one_line_error(done, "dashboards", *says)


# --- push ---------------------------------------------------------------------


def test_push_creates_then_changes_nothing_then_updates(lrpilot_exe, grafana, dashboards):
    first = push(lrpilot_exe, grafana, "--dir", str(dashboards), "--json")
    assert outcomes(first) == {
        ("datasource", "lrpilot-prometheus"): "created",
        ("folder", "lrpilot"): "created",
        ("dashboard", "lrpilot-overview"): "created",
        ("dashboard", "lrpilot-run"): "created",
    }
    state = grafana.state
    source = state.datasources["lrpilot-prometheus"]
    assert (source["type"], source["access"], source["url"]) == (
        "prometheus",
        "proxy",
        "http://127.0.0.1:9090",
    )
    assert state.folders["lrpilot"]["title"] == "lrpilot"
    assert {uid: d["folderUid"] for uid, d in state.dashboards.items()} == {
        "lrpilot-overview": "lrpilot",
        "lrpilot-run": "lrpilot",
    }
    saved = state.dashboards["lrpilot-overview"]["dashboard"]
    assert {k: v for k, v in saved.items() if k not in ("id", "version")} == overview()

    # Nothing changed: nothing is written.
    before = len(grafana.requests)
    assert set(outcomes(push(lrpilot_exe, grafana, "--dir", str(dashboards), "--json"))
               .values()) == {"unchanged"}  # fmt: skip
    assert [r for r in grafana.requests[before:] if r.method != "GET"] == []

    # One dashboard and the Prometheus URL changed: those two are updated in place.
    (dashboards / "lrpilot-overview.json").write_text(json.dumps(overview("LR overview")))
    before = len(grafana.requests)
    third = push(
        lrpilot_exe,
        grafana,
        "--dir",
        str(dashboards),
        "--prometheus-url",
        "http://prometheus:9090",
        "--json",
    )
    assert outcomes(third) == {
        ("datasource", "lrpilot-prometheus"): "updated",
        ("folder", "lrpilot"): "unchanged",
        ("dashboard", "lrpilot-overview"): "updated",
        ("dashboard", "lrpilot-run"): "unchanged",
    }
    assert [(r.method, r.path) for r in grafana.requests[before:] if r.method != "GET"] == [
        ("PUT", "/api/datasources/uid/lrpilot-prometheus"),
        ("POST", "/api/dashboards/db"),
    ]
    assert len(state.dashboards) == 2 and len(state.datasources) == 1
    assert state.dashboards["lrpilot-overview"]["dashboard"]["title"] == "LR overview"
    assert state.dashboards["lrpilot-overview"]["dashboard"]["version"] == 2
    assert state.datasources["lrpilot-prometheus"]["url"] == "http://prometheus:9090"
    assert {r.authorization for r in grafana.requests if r.path != "/api/health"} == {
        f"Bearer {TOKEN}"
    }


def test_push_overwrites_an_edit_made_in_grafana_and_reports_text(lrpilot_exe, grafana, dashboards):
    ok(push(lrpilot_exe, grafana, "--dir", str(dashboards), "--folder", "Training"))
    # Someone edits the dashboard in Grafana's UI (a save bumps its version).
    saved = grafana.state.dashboards["lrpilot-run"]["dashboard"]
    saved.update(title="edited by hand", version=saved["version"] + 3)
    text = ok(push(lrpilot_exe, grafana, "--dir", str(dashboards), "--folder", "Training"))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["datasource", "lrpilot-prometheus", "unchanged"]
    assert lines[1].split() == ["folder", "lrpilot", "unchanged", "Training"]
    assert lines[3].split()[:3] == ["dashboard", "lrpilot-run", "updated"]
    assert lines[-1] == f"Grafana at {grafana.url}: 0 created, 1 updated, 3 unchanged"
    assert grafana.state.dashboards["lrpilot-run"]["dashboard"]["title"] == "lrpilot run"


def test_push_keeps_datasource_fields_set_by_someone_else(lrpilot_exe, grafana, dashboards):
    ok(push(lrpilot_exe, grafana, "--dir", str(dashboards)))
    # An admin turns on basic auth to Prometheus and makes it the default
    # datasource, as Grafana's UI does: PUT the whole datasource, edited.
    path = "/api/datasources/uid/lrpilot-prometheus"
    edited = {
        **grafana.state.datasources["lrpilot-prometheus"],
        "basicAuth": True,
        "basicAuthUser": "reader",
        "withCredentials": True,
        "isDefault": True,
        "secureJsonData": {"basicAuthPassword": SECRET_WORDS},
    }
    edited["jsonData"] = {**edited["jsonData"], "timeout": 60}
    request = urllib.request.Request(
        grafana.url + path,
        data=json.dumps(edited).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200
    before = grafana.state.datasources["lrpilot-prometheus"]

    url = "http://prometheus:9090"
    done = push(lrpilot_exe, grafana, "--dir", str(dashboards), "--prometheus-url", url, "--json")
    assert outcomes(done)[("datasource", "lrpilot-prometheus")] == "updated"
    puts = [r for r in grafana.requests if r.method == "PUT" and r.path == path]
    assert puts[-1].body["version"] == before["version"]  # Grafana's 409 if changed since
    after = grafana.state.datasources["lrpilot-prometheus"]
    assert after["url"] == url
    assert after["version"] == before["version"] + 1
    kept = ("basicAuth", "basicAuthUser", "withCredentials", "isDefault", "secureJsonFields")
    assert {k: after[k] for k in kept} == {
        "basicAuth": True,
        "basicAuthUser": "reader",
        "withCredentials": True,
        "isDefault": True,
        "secureJsonFields": {"basicAuthPassword": True},
    }
    assert after["jsonData"] == {"httpMethod": "POST", "timeInterval": "15s", "timeout": 60}


def test_basic_auth_and_flags_over_environment(lrpilot_exe, dashboards, monkeypatch):
    grafana = GrafanaStandIn(user="admin", password=SECRET_WORDS)
    try:
        monkeypatch.setenv("LRPILOT_GRAFANA_USER", "admin")
        monkeypatch.setenv("LRPILOT_GRAFANA_PASSWORD", SECRET_WORDS)
        ok(push(lrpilot_exe, grafana, "--dir", str(dashboards), token=None))
        basic = "Basic " + base64.b64encode(f"admin:{SECRET_WORDS}".encode()).decode()
        assert {r.authorization for r in grafana.requests if r.path != "/api/health"} == {basic}
        # A flag beats the environment: the wrong password on the command line is refused.
        done = push(
            lrpilot_exe, grafana, "--dir", str(dashboards), "--password", "nope", token=None
        )
        line = refused(done, "refused the credentials (401)")
        assert "nope" not in line and SECRET_WORDS not in line
    finally:
        grafana.close()


def test_wrong_credentials_one_line_exit_1(lrpilot_exe, grafana, dashboards, monkeypatch):
    monkeypatch.setenv("LRPILOT_GRAFANA_TOKEN", TOKEN)  # right, but the flag wins
    done = push(lrpilot_exe, grafana, "--dir", str(dashboards), token="glsa_wrong")
    line = refused(done, grafana.url, "401")
    assert "glsa_wrong" not in line and TOKEN not in line
    assert grafana.writes() == []


def test_unreachable_hanging_failing_grafana_one_line_exit_1(lrpilot_exe, grafana, dashboards):
    nobody = f"http://127.0.0.1:{free_port()}"
    done = lrpilot(
        lrpilot_exe, "dashboards", "push", "--grafana-url", nobody, "--dir", str(dashboards)
    )
    refused(done, f"cannot reach Grafana at {nobody}", "connection refused")

    grafana.fail_with = 503
    refused(push(lrpilot_exe, grafana, "--dir", str(dashboards)), "answered 503")

    grafana.fail_with = None
    grafana.hang()
    started = time.monotonic()
    done = push(lrpilot_exe, grafana, "--dir", str(dashboards), "--timeout", "0.5")
    refused(done, "no answer from Grafana", "within 0.5s")
    assert time.monotonic() - started < 10


def test_bad_input_one_line_exit_1(grafana, dashboards, tmp_path, capsys):
    """In-process (the same main() the console script runs), to keep it quick."""

    def push_with(*flags: str, says: str) -> None:
        assert cli_main(["dashboards", "push", *flags]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lrpilot dashboards: "), err
        assert says in lines[0], lines[0]

    url = ("--grafana-url", grafana.url)
    push_with("--grafana-url", "grafana:3000", says="expected a Grafana URL like http://")
    push_with(
        "--grafana-url",
        "http://admin:pw@127.0.0.1:3000",
        says="put no credentials in the Grafana URL",
    )
    push_with(*url, "--prometheus-url", "prom", says="expected a Prometheus URL")
    push_with(*url, "--dir", str(tmp_path / "missing"), says="not a directory")
    bad = tmp_path / "bad"
    bad.mkdir()
    push_with(*url, "--dir", str(bad), says="no *.json dashboard in")
    (bad / "broken.json").write_text('{"uid": "x", "title": ')
    push_with(*url, "--dir", str(bad), says="broken.json: not JSON")
    (bad / "broken.json").write_text('{"title": "no uid"}')
    push_with(*url, "--dir", str(bad), says="has no 'uid'")
    push_with(*url, "--dir", str(dashboards), "--user", "admin", says="needs both a user and")
    assert grafana.writes() == []


def test_export_copies_the_checked_json(lrpilot_exe, dashboards, tmp_path):
    dest = tmp_path / "provisioning" / "dashboards"
    done = lrpilot(
        lrpilot_exe, "dashboards", "export", str(dest), "--dir", str(dashboards), "--json"
    )
    assert ok_json(done) == [str(dest / "lrpilot-overview.json"), str(dest / "lrpilot-run.json")]
    for name in ("lrpilot-overview.json", "lrpilot-run.json"):
        assert (dest / name).read_bytes() == (dashboards / name).read_bytes()


def test_the_shipped_dashboards_are_found_and_pushed(lrpilot_exe, grafana):
    """Without --dir: the checkout's dashboards/ (an editable install), which
    a wheel installs under <prefix>/share/lrpilot/dashboards."""
    assert dashboard_dirs()[0] == ROOT / "dashboards"
    shipped = sorted(p.name for p in (ROOT / "dashboards").glob("*.json"))
    assert {"lrpilot-overview.json", "lrpilot-run.json"} <= set(shipped), (
        f"dashboards/ should hold lrpilot-overview.json and lrpilot-run.json, has {shipped}"
    )
    assert find_dashboard_dir() == ROOT / "dashboards"
    first = outcomes(push(lrpilot_exe, grafana, "--json"))
    assert set(first.values()) == {"created"} and len(first) == 2 + len(shipped)
    assert set(outcomes(push(lrpilot_exe, grafana, "--json")).values()) == {"unchanged"}


def test_no_secret_in_help(lrpilot_exe, monkeypatch):
    monkeypatch.setenv("LRPILOT_GRAFANA_TOKEN", TOKEN)
    monkeypatch.setenv("LRPILOT_GRAFANA_USER", "admin")
    monkeypatch.setenv("LRPILOT_GRAFANA_PASSWORD", SECRET_WORDS)
    for command in (["daemon"], ["dashboards", "push"]):
        helped = ok(lrpilot(lrpilot_exe, *command, "--help"))
        assert TOKEN not in helped and SECRET_WORDS not in helped
        assert "--grafana-url" in helped
    daemon_help = ok(lrpilot(lrpilot_exe, "daemon", "--help"))
    assert "--grafana-token" in daemon_help and "(default: hidden)" in daemon_help


def test_no_secret_in_a_config_error(capsys):
    """A password without a user is refused, and the line does not show it."""
    flags = ["--grafana-url", "http://127.0.0.1:3000", "--metrics-addr", "off"]
    assert cli_main(["daemon", *flags, "--grafana-password", SECRET_WORDS]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert "basic auth needs both" in err and SECRET_WORDS not in err


# --- the daemon's annotations -------------------------------------------------


def test_the_works_again_line_counts_the_failures_no_line_counted(caplog):
    from types import SimpleNamespace

    from lrpilot.daemon.observability.annotations import AnnotationPoster
    from lrpilot.daemon.service.engine import Change
    from lrpilot.protocol import LRCommand

    answers = iter([OSError("down")] * 4 + [None])

    def post(time_ms: int, tags: list[str], text: str) -> None:
        error = next(answers)
        if error is not None:
            raise error

    poster = AnnotationPoster(post, where="grafana.test")
    run = SimpleNamespace(run_id="r")
    command = LRCommand(run="r", version=1, effective_step=1, state_step=1, lrs=[0.1])
    change = Change(command, [0.2], "plateau")
    with caplog.at_level("INFO", logger="lrpilot.daemon"):
        for _ in range(5):
            poster.on_change(run, change)  # type: ignore[arg-type]
        wait_for(lambda: poster.counts()["posted"] == 1, 5, "the fifth change to be posted")
        poster.close()
    lines = [r.getMessage() for r in caplog.records]
    # The first failure is logged at once; the next three fall inside LOG_EVERY.
    assert len(lines) == 2, lines
    assert "works again" in lines[1] and "(3 more LR changes" in lines[1], lines[1]


def start_training(
    where: Path, daemon: DaemonProcess, run: str, sync_timeout: float, gates: tuple[int, ...] = ()
) -> Training:
    config = {
        "gates": list(gates),
        "steps": 150,
        "report_every": 5,
        "seed": 7,
        "deadline_s": 60,
        "trainers": [
            stream_trainer(run, daemon.address, where / f"{run}.jsonl", sync_timeout=sync_timeout)
        ],
    }
    return Training(where, config, name=run)


def annotation_counts(daemon: DaemonProcess) -> dict[str, float | None]:
    text = daemon.scrape()
    name = "lrpilot_grafana_annotations_total"
    return {o: metric_value(text, name, outcome=o) for o in ("posted", "failed", "dropped")}


def test_every_journaled_change_becomes_one_annotation(
    lrpilot_exe, grafana, tmp_path, monkeypatch, processes
):
    monkeypatch.setenv("LRPILOT_GRAFANA_TOKEN", TOKEN)
    daemon = DaemonProcess(
        lrpilot_exe, tmp_path / "state", tmp_path / "daemon.log", "--grafana-url", grafana.url
    )
    processes.append(daemon)
    daemon.wait_ready()
    run = "graf-ann"
    training = start_training(tmp_path, daemon, run, sync_timeout=10.0, gates=(140,))
    processes.append(training)
    training.at(140)  # an operator's change reaches a run while its training is live
    ok(lrpilot(lrpilot_exe, "set-lr", run, "0.01", "--control", daemon.control))
    training.go(140)
    training.finish()
    changes = daemon.cli("history", run)
    assert len(changes) >= 3, changes
    wait_for(
        lambda: len(grafana.annotations()) >= len(changes),
        10,
        "an annotation per change",
        lambda: daemon.log(),
    )
    posted = sorted(grafana.annotations(), key=lambda a: a["time"])
    assert len(posted) == len(changes)
    for entry, note in zip(changes, posted):
        cause = "set_lr" if entry["actor"] != "policy" else "plateau"
        assert note["tags"] == ["lrpilot", f"run:{run}", cause], note
        assert note["text"].startswith(
            f"run {run} v{entry['version']} from step {entry['effective_step']}: lr "
        ), note
        assert entry["reason"] in note["text"] and f"(by {entry['actor']})" in note["text"]
        assert abs(note["time"] / 1000 - entry["time"]) < 5
    assert [r.authorization for r in grafana.requests] == [f"Bearer {TOKEN}"] * len(changes)
    wait_for(
        lambda: annotation_counts(daemon) == {"posted": len(changes), "failed": 0, "dropped": 0},
        5,
        "/metrics to count the posted annotations",
        lambda: str(annotation_counts(daemon)),
    )
    assert TOKEN not in daemon.log()
    assert daemon.terminate() == 0


@pytest.mark.parametrize("trouble", ["fails", "hangs"])
def test_a_grafana_in_trouble_costs_the_daemon_nothing(
    trouble, lrpilot_exe, grafana, tmp_path, monkeypatch, processes
):
    """Lock-step training with a 1 s sync timeout: had a post held the loop up
    (a hanging Grafana takes 1.5 s to time out), a step would time out."""
    monkeypatch.setenv("LRPILOT_GRAFANA_TOKEN", TOKEN)
    if trouble == "fails":
        grafana.fail_with = 503
    else:
        grafana.hang()
    daemon = DaemonProcess(
        lrpilot_exe,
        tmp_path / "state",
        tmp_path / "daemon.log",
        "--grafana-url",
        grafana.url,
        "--grafana-timeout",
        "1.5",
        "--grafana-queue-size",
        "1",
    )
    processes.append(daemon)
    daemon.wait_ready()
    run = f"graf-{trouble}"
    training = start_training(tmp_path, daemon, run, sync_timeout=1.0)
    processes.append(training)
    summary = training.finish()
    stats = summary["stats"][run]
    assert (stats["sync_timeouts"], stats["commands_late"]) == (0, 0), stats
    changes = settled_history(lambda: daemon.cli("history", run))
    assert len(changes) >= 3, changes
    assert all(e["applied_step"] == e["effective_step"] for e in changes), changes

    def all_counted() -> dict | None:
        counts = annotation_counts(daemon)
        return counts if counts["failed"] + counts["dropped"] == len(changes) else None

    counts = wait_for(all_counted, 15, "every change counted failed or dropped", daemon.log)
    assert counts["posted"] == 0 and counts["failed"] >= 1
    if trouble == "hangs":
        assert counts["dropped"] >= 1, counts
    # Rate-limited: one line for the first failure, not one per failure.
    assert daemon.log().count("cannot post an LR change to Grafana") == 1, daemon.log()
    started_at = time.monotonic()
    assert daemon.terminate() == 0
    assert time.monotonic() - started_at < 5
    assert os.environ["LRPILOT_GRAFANA_TOKEN"] not in daemon.log()
