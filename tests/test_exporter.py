"""The Prometheus exporter (daemon/observability/exporter.py): what a scrape says about the
daemon's state, read through prometheus-client's own text parser. The data
plane is driven without a socket (frames in, replies out) and the collector's
clock is a variable, so the TTL is tested without waiting; the HTTP side is a
real `lrpilot daemon` process, scraped while a real training streams to it."""

from __future__ import annotations

import gzip
import json
import math
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from procs import (
    Training,
    daemon_process,
    free_port,
    http_get,
    metric_value,
    one_line_error,
    store_row,
    stream_trainer,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from lrpilot.daemon.observability.exporter import (
    REJECT_REASONS,
    DaemonCollector,
    Exposition,
    label,
    number,
)
from lrpilot.daemon.observability.metrics_server import MetricsServer
from lrpilot.daemon.service.config import DaemonConfig
from lrpilot.daemon.service.control import ControlPlane
from lrpilot.daemon.service.dataplane import DataPlane
from lrpilot.protocol import REPORT, STEP, BatchEncoder, Bye, ClientStats, GroupInfo, Hello, encode

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(collector: DaemonCollector) -> Samples:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    text = Exposition(collector).text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples: Samples, run: str) -> set[str]:
    return {name for name, labels in samples if ("run", run) in labels}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[DataPlane]:
    plane = DataPlane(DaemonConfig(state_dir=tmp_path / "state"))
    yield plane
    plane.close()


def start(
    plane: DataPlane,
    run: str,
    policy: dict | None,
    groups: tuple[str, ...] = ("backbone", "head"),
    rank: int = 0,
) -> bytes:
    identity = f"{run}/{rank}".encode()
    message = Hello(
        run=run,
        rank=rank,
        world_size=2,
        groups=[GroupInfo(name=g, lr=0.1) for g in groups],
        policy=policy,
    )
    plane.handle(identity, [encode(message)], 0.0)
    return identity


def feed(plane: DataPlane, identity: bytes, run: str, records: list, rank: int = 0, **stats):
    """Records are (step, kind, metrics); seq numbers follow on."""
    encoder = BatchEncoder(run, rank)
    first = getattr(feed, "seq", {}).get(identity, 0)
    rows = [(first + i + 1, step, kind, metrics) for i, (step, kind, metrics) in enumerate(records)]
    feed.seq = {**getattr(feed, "seq", {}), identity: first + len(rows)}  # type: ignore[attr-defined]
    return plane.handle(identity, encoder.encode(rows, ClientStats(**stats)), 1.0)


def steps(first: int, last: int, **metrics: float) -> list:
    return [(s, STEP, dict(metrics)) for s in range(first, last + 1)]


def test_an_empty_daemon_exports_its_counters_at_zero(plane):
    samples = scrape(DaemonCollector(plane, ttl=600))
    for reason in REJECT_REASONS:
        assert value(samples, "lrpilot_messages_rejected_total", reason=reason) == 0
    for outcome in ("posted", "failed", "dropped"):
        assert value(samples, "lrpilot_grafana_annotations_total", outcome=outcome) == 0
    assert value(samples, "lrpilot_runs", state="active") == 0
    assert value(samples, "lrpilot_records_ingested_total") == 0
    assert value(samples, "lrpilot_store_size_bytes") > 0
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)
    assert ("lrpilot_build_info", (("version", "0.1.0"),)) in samples


def test_plateau_state_lr_per_group_and_changes_follow_the_policy(plane):
    policy = {"kind": "plateau", "metric": "val_loss", "patience": 1, "factor": 0.5, "cooldown": 2}
    me = start(plane, "p", policy)
    reports = [1.0, 0.5, 0.6, 0.7]  # best 0.5; two bad reports: a cut, then cooldown
    for i, loss in enumerate(reports, 1):
        feed(plane, me, "p", [(i, STEP, {"loss": 2.0 * loss}), (i, REPORT, {"val_loss": loss})])
    samples = scrape(DaemonCollector(plane, ttl=600))
    assert value(samples, "lrpilot_policy_plateau_best", run="p") == 0.5
    assert value(samples, "lrpilot_policy_plateau_bad_steps", run="p") == 0
    assert value(samples, "lrpilot_policy_plateau_cooldown_steps", run="p") == 2
    for group in ("backbone", "head"):
        assert value(samples, "lrpilot_group_lr", run="p", group=group) == pytest.approx(0.05)
    assert value(samples, "lrpilot_run_lr_changes_total", run="p", reason="plateau") == 1
    assert value(samples, "lrpilot_run_command_version", run="p") == 1
    assert value(samples, "lrpilot_run_metric", run="p", metric="loss") == pytest.approx(1.4)
    assert value(samples, "lrpilot_run_metric", run="p", metric="val_loss") == 0.7
    assert value(samples, "lrpilot_run_step", run="p") == 4
    spec = json.loads(
        next(
            dict(labels)["spec"]
            for name, labels in samples
            if name == "lrpilot_run_policy_info" and ("run", "p") in labels
        )
    )
    assert spec["kind"] == "plateau" and spec["cooldown"] == 2
    assert "lrpilot_policy_cycle" not in names(samples, "p")


def test_operator_changes_are_counted_by_reason_and_held_is_exported(plane):
    me = start(plane, "op", {"kind": "step", "step_size": 1000})
    feed(plane, me, "op", steps(1, 5, loss=1.0))
    control = ControlPlane(plane)
    for request in (
        {"op": "set_lr", "run": "op", "lr": 0.01},
        {"op": "resume", "run": "op"},
        {"op": "pause", "run": "op"},
    ):
        answer, _ = control.handle(json.dumps(request).encode())
        assert answer["ok"], answer
    held = scrape(DaemonCollector(plane, ttl=600))
    assert value(held, "lrpilot_run_lr_held", run="op") == 1
    control.handle(
        json.dumps({"op": "policy", "run": "op", "policy": {"kind": "cosine", "T_max": 9}}).encode()
    )
    samples = scrape(DaemonCollector(plane, ttl=600))
    for reason in ("set_lr", "resume", "pause", "policy_switch"):
        assert value(samples, "lrpilot_run_lr_changes_total", run="op", reason=reason) == 1
    assert value(samples, "lrpilot_run_lr_held", run="op") == 0
    kinds = {dict(labels)["kind"] for name, labels in samples if name == "lrpilot_run_policy_info"}
    assert kinds == {"cosine"}


def test_cycle_position_restarts_momentum_and_stage(plane):
    restarts = start(plane, "wr", {"kind": "cosine_restarts", "T_0": 4, "T_mult": 2})
    feed(plane, restarts, "wr", steps(1, 6))  # a restart at 4; 2 steps into a cycle of 8
    cyclic = start(
        plane,
        "cy",
        {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 5},
    )
    feed(plane, cyclic, "cy", steps(1, 13))  # cycle 2 (of 10 steps), 3 steps in
    staged = start(
        plane,
        "seq",
        {
            "kind": "sequential",
            "milestones": [3],
            "policies": [
                {"kind": "linear", "start_factor": 0.1, "total_iters": 3},
                {"kind": "plateau", "metric": "val_loss"},
            ],
        },
    )
    feed(plane, staged, "seq", steps(1, 4))
    samples = scrape(DaemonCollector(plane, ttl=600))
    assert value(samples, "lrpilot_policy_restarts_total", run="wr") == 1
    assert value(samples, "lrpilot_policy_cycle", run="wr") == 2
    assert value(samples, "lrpilot_policy_cycle_position_ratio", run="wr") == 2 / 8
    assert value(samples, "lrpilot_policy_cycle", run="cy") == 2
    assert value(samples, "lrpilot_policy_cycle_position_ratio", run="cy") == pytest.approx(0.3)
    # cyclic cycles momentum (torch's default): inversely to the LR.
    momentum = value(samples, "lrpilot_group_momentum", run="cy", group="head")
    assert 0.8 < momentum < 0.9
    assert value(samples, "lrpilot_policy_stage", run="seq") == 1
    assert value(samples, "lrpilot_policy_plateau_best", run="seq") == math.inf
    assert "lrpilot_group_momentum" not in names(samples, "wr")


def test_rank_series_carry_lag_and_the_hooks_counters(plane):
    policy = {"kind": "step", "step_size": 100}
    lead = start(plane, "ddp", policy, rank=0)
    behind = start(plane, "ddp", policy, rank=1)
    feed(plane, lead, "ddp", steps(1, 10, loss=1.0), rank=0, records_dropped=3)
    feed(plane, behind, "ddp", steps(1, 7, loss=1.0), rank=1, records_sent=7)
    samples = scrape(DaemonCollector(plane, ttl=600))
    assert value(samples, "lrpilot_run_connected_ranks", run="ddp") == 2
    assert value(samples, "lrpilot_rank_lag_steps", run="ddp", rank="0") == 0
    assert value(samples, "lrpilot_rank_lag_steps", run="ddp", rank="1") == 3
    assert value(samples, "lrpilot_rank_step", run="ddp", rank="1") == 7
    assert value(samples, "lrpilot_rank_records_dropped_total", run="ddp", rank="0") == 3
    assert value(samples, "lrpilot_rank_records_sent_total", run="ddp", rank="1") == 7
    assert value(samples, "lrpilot_sessions") == 2


def test_an_ended_run_stays_for_the_ttl_then_its_series_go(plane):
    me = start(plane, "gone", {"kind": "step", "step_size": 100})
    feed(plane, me, "gone", steps(1, 3, loss=1.0))
    plane.handle(me, [encode(Bye(run="gone", step=3, stats=ClientStats()))], 2.0)
    ended = plane.registry.runs["gone"].ended
    clock = Clock(ended + 599)
    collector = DaemonCollector(plane, ttl=600, clock=clock)
    samples = scrape(collector)
    assert value(samples, "lrpilot_run_active", run="gone") == 0
    assert value(samples, "lrpilot_runs", state="ended") == 1
    assert not any(name.startswith("lrpilot_rank_") for name in names(samples, "gone"))
    clock.now = ended + 601
    samples = scrape(collector)
    assert names(samples, "gone") == set()
    assert value(samples, "lrpilot_runs", state="ended") == 0
    # It comes back: its series are back.
    start(plane, "gone", {"kind": "step", "step_size": 100})
    assert value(scrape(collector), "lrpilot_run_active", run="gone") == 1


def test_label_values_are_escaped(plane):
    # A newline cannot be in a run name (the protocol refuses control
    # characters); quotes and backslashes can, and label() escapes newlines.
    run = 'quote" back\\slash'
    me = start(plane, run, None, groups=("a,b",))
    feed(plane, me, run, steps(1, 2, **{"odd metric": 1.5}))
    samples = scrape(DaemonCollector(plane, ttl=600))
    assert value(samples, "lrpilot_run_metric", run=run, metric="odd metric") == 1.5
    assert value(samples, "lrpilot_group_lr", run=run, group="a,b") == 0.1


class RankThatLeavesMidScrape:
    """A session whose ``step``, each time the scrape reads it, has "the
    daemon loop" take rank 1 out of the run or put it back: what a thread
    switch at that instant does. Deterministic, where a race is not."""

    def __init__(self, session, run) -> None:
        self._session, self._run, self._away = session, run, None

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    @property
    def step(self) -> int:
        if self._away is None:
            self._away = self._run.sessions.pop(1)
        else:
            self._run.sessions[1], self._away = self._away, None
        return self._session.step


def test_a_scrape_reads_copies_while_the_loop_changes_sessions(plane):
    a, b = start(plane, "churn", None, rank=0), start(plane, "churn", None, rank=1)
    feed(plane, a, "churn", steps(1, 9, loss=1.0), rank=0)
    feed(plane, b, "churn", steps(1, 5, loss=1.0), rank=1)
    run = plane.registry.runs["churn"]
    run.sessions[0] = RankThatLeavesMidScrape(run.sessions[0], run)
    samples = scrape(DaemonCollector(plane, ttl=600))  # no "dictionary changed size"
    assert value(samples, "lrpilot_run_step", run="churn") == 9
    assert value(samples, "lrpilot_rank_lag_steps", run="churn", rank="1") == 4


class NotIterable(dict):
    """A dict that another scrape thread inserts into: iterating it may raise."""

    def __iter__(self):
        raise AssertionError("iterated a dict another scrape thread changes")

    keys = values = items = __iter__


def test_pruning_the_policy_cache_never_iterates_it(plane):
    start(plane, "kept", {"kind": "step", "step_size": 100})
    collector = DaemonCollector(plane, ttl=600)
    collector.render_runs()
    stale = {f"gone{i}": (None, 'kind="none",spec=""') for i in range(200)}
    collector._policies = NotIterable({**collector._policies, **stale})
    text = collector.render_runs()
    assert set(collector._policies) == {"kept"}
    assert 'lrpilot_run_policy_info{run="kept",kind="step"' in text


# --- the HTTP endpoint of a real daemon -------------------------------------


def daemon_fails(exe: str, tmp_path: Path, *flags: str) -> str:
    done = subprocess.run(
        [exe, "daemon", "--state-dir", str(tmp_path / "s"), *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return one_line_error(done, "daemon")


def test_a_bad_or_busy_metrics_address_is_one_line_and_exit_1(
    lrpilot_exe, running_daemon, tmp_path
):
    line = daemon_fails(lrpilot_exe, tmp_path, "--metrics-addr", "9317")
    assert "metrics_addr" in line and "HOST:PORT" in line
    taken = running_daemon.metrics
    line = daemon_fails(
        lrpilot_exe,
        tmp_path,
        "--address",
        f"tcp://127.0.0.1:{free_port()}",
        "--control-address",
        f"tcp://127.0.0.1:{free_port()}",
        "--metrics-addr",
        taken,
    )
    assert line.startswith("lrpilot daemon: cannot serve metrics on " + taken), line


def test_metrics_off_serves_nothing(lrpilot_exe, tmp_path):
    with daemon_process(
        lrpilot_exe, tmp_path / "s", tmp_path / "d.log", "--metrics-addr", "off"
    ) as daemon:
        assert daemon.cli("runs") == []
        # Nothing listens where the metrics would have been.
        with pytest.raises(urllib.error.URLError) as refused:
            http_get(f"http://{daemon.metrics}/healthz")
        assert isinstance(refused.value.reason, ConnectionRefusedError), daemon.log()


def test_scrapes_during_a_fast_training_all_parse(running_daemon, tmp_path):
    """The collector runs on the HTTP thread while the daemon loop changes the
    registry: scrapes in a tight loop during a training must all succeed."""
    daemon = running_daemon
    policy = {"kind": "plateau", "metric": "val_loss", "patience": 2}
    out = tmp_path / "fast.jsonl"
    fast = stream_trainer("fast", daemon.address, out, policy=policy, sync=False, lrs=[0.1, 0.01])
    config = {"steps": 20000, "report_every": 100, "seed": 1, "deadline_s": 120}
    training = Training(tmp_path, {**config, "trainers": [fast]})
    failures: list[BaseException] = []
    scrapes = 0
    stop = threading.Event()

    def scrape_loop() -> None:
        nonlocal scrapes
        while not stop.is_set():
            try:
                with urllib.request.urlopen(daemon.metrics_url, timeout=5) as response:
                    text = response.read().decode()
                list(text_string_to_metric_families(text))
                scrapes += 1
            except BaseException as exc:
                failures.append(exc)
                return

    thread = threading.Thread(target=scrape_loop)
    thread.start()
    try:
        summary = training.finish(120)
    finally:
        stop.set()
        thread.join(10)
    assert not failures, failures
    assert scrapes > 10

    def run_step() -> float | None:
        return metric_value(daemon.scrape(), "lrpilot_run_step", run="fast")

    # The hook drops what the daemon cannot take in time (close() waits
    # 0.5 s): on a loaded machine the last steps may be among them.
    dropped = summary["stats"]["fast"]["records_dropped"]
    wait_for(
        lambda: (run_step() or 0) >= 20000 - dropped,
        10,
        "the last step in /metrics",
        lambda: f"lrpilot_run_step is {run_step()}; summary {summary}\n{daemon.log()[-3000:]}",
    )


def test_the_http_side_gzips_says_health_and_survives_a_failing_render():
    failing = [False]

    def render() -> str:
        if failing[0]:
            raise RuntimeError("a bug")
        return "# TYPE x gauge\nx 1\n" * 1000

    wedged: list[str] = []
    server = MetricsServer(render, "127.0.0.1", 0, lambda: wedged[0] if wedged else None)
    try:
        base = server.url.removesuffix("/metrics")
        status, headers, body = http_get(server.url, gzip_ok=True)
        assert status == 200 and headers["Content-Encoding"] == "gzip"
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert gzip.decompress(body).decode() == render()
        status, headers, body = http_get(server.url)
        assert "Content-Encoding" not in headers and body.decode() == render()
        failing[0] = True
        assert http_get(server.url)[0] == 500
        status, _, body = http_get(base + "/healthz")  # renders nothing: fine while render fails
        assert (status, body) == (200, b"ok\n")
        assert http_get(base + "/nope")[0] == 404
        wedged.append("the daemon loop has not turned for 12 s")
        assert http_get(base + "/healthz")[0::2] == (
            503,
            b"the daemon loop has not turned for 12 s\n",
        )
        failing[0] = False
        assert http_get(server.url)[0] == 200
    finally:
        server.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_metrics_serve_on_ipv4_names_and_ipv6(host):
    server = MetricsServer(lambda: "x 1\n", host, 0)
    try:
        assert server.url.startswith(f"http://{host}:")
        assert http_get(server.url)[0::2] == (200, b"x 1\n")
    finally:
        server.close()


# --- a run that fails to render ---------------------------------------------


@pytest.mark.parametrize(
    ("policy", "field", "broken"),
    [
        pytest.param({"kind": "cosine_restarts", "T_0": 4}, "T_i", 0, id="division-by-zero"),
        pytest.param({"kind": "plateau"}, "best", "x", id="non-numeric-sample"),
    ],
)
def test_a_run_that_fails_to_render_leaves_the_others_and_is_counted(
    plane, caplog, policy, field, broken
):
    """A policy state that slipped past its checks (set here behind the
    engine's back) costs that run its series, not every run the scrape."""
    bad = start(plane, "bad", policy)
    good = start(plane, "good", {"kind": "step", "step_size": 100})
    feed(plane, bad, "bad", steps(1, 3, loss=1.0))
    feed(plane, good, "good", steps(1, 3, loss=1.0))
    setattr(plane.registry.runs["bad"].engine.policy, field, broken)
    collector = DaemonCollector(plane, ttl=600)
    with caplog.at_level("ERROR", logger="lrpilot.daemon"):
        first, second = scrape(collector), scrape(collector)
    for samples, failures in ((first, 1), (second, 2)):
        assert names(samples, "bad") == set()  # none of its series, not a part of them
        assert value(samples, "lrpilot_run_step", run="good") == 3
        assert value(samples, "lrpilot_render_errors_total") == failures
        assert value(samples, "lrpilot_runs", state="active") == 2
    logged = [r for r in caplog.records if "'bad'" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]


def test_sample_values_are_numbers_and_labels_valid_utf8():
    assert number(3) == "3.0" and number(True) == "1.0" and number(-math.inf) == "-Inf"
    for not_a_number in ("0.5", None, [1.0]):
        with pytest.raises(TypeError):
            number(not_a_number)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        number(10**400)  # Go's ParseFloat, promtool's, refuses such a literal
    assert label("run\ud800").encode() == b'"run?"'


def test_the_daemon_loop_shortens_the_switch_interval_and_gives_it_back(tmp_path):
    """The loop waits for the GIL behind the store's writer and /metrics'
    renderer for at most the switch interval while it serves; a host that
    runs the daemon in a thread keeps its own setting once it is gone."""
    import sys

    from procs import serving

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.01)
    try:
        with serving(tmp_path / "state"):
            assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert sys.getswitchinterval() == pytest.approx(0.01)
    finally:
        sys.setswitchinterval(before)


def test_a_burst_faster_than_the_loop_leaves_it_free_to_serve(running_daemon):
    """A client that sends faster than the daemon handles (here 300,000
    one-record batches, sent while the daemon was stopped, so they all wait
    for it at once): the loop works through them a slice at a time, and in
    between answers the control plane and hands the records to the store.
    Worked through in one go, they kept it from both for seconds (and the
    records in memory), however long the client kept sending."""
    burst = 300_000
    daemon = running_daemon
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # the client's side keeps whatever it sends
    sock.connect(daemon.address)
    try:
        sock.send_multipart([encode(Hello(run="burst", groups=[GroupInfo(name="0", lr=0.1)]))])
        assert sock.poll(10_000), "no welcome"
        encoder = BatchEncoder("burst", 0)
        frames = [encoder.encode([(k, k, STEP, {"loss": 1.0})], {}) for k in range(1, burst + 1)]
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            for frame in frames:
                sock.send_multipart(frame)
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        # An operator asks again and again while the daemon works through it.
        waits, stored, step = [], [], 0
        while step < burst:
            began = time.monotonic()
            answer = daemon.ask({"op": "show", "run": "burst"}, 30)
            waits.append(time.monotonic() - began)
            step = answer["run"]["step"]
            row = store_row(daemon.state_dir, "burst")
            if step < burst and row is not None:
                stored.append(row["step"])
        assert max(waits) < 0.5, f"the control plane took up to {max(waits):.1f} s"
        assert len(waits) >= 5, waits
        # ...and the store took the records as they were handled.
        assert any(0 < s < burst for s in stored), stored
    finally:
        sock.close()
        context.term()


def test_livez_asks_only_whether_the_loop_turns_and_healthz_also_the_store():
    """A full disk fails /healthz (readiness, alerts) but not /livez: a
    restart would not mend it and would lose what the daemon keeps."""
    problems = {"health": None, "live": None}
    server = MetricsServer(
        lambda: "x 1\n", "127.0.0.1", 0, lambda: problems["health"], lambda: problems["live"]
    )
    try:
        base = server.url.removesuffix("/metrics")
        assert http_get(base + "/livez")[0::2] == (200, b"ok\n")
        problems["health"] = "cannot write to the store since 12:00: database or disk is full"
        assert http_get(base + "/healthz")[0] == 503
        assert http_get(base + "/livez")[0::2] == (200, b"ok\n")
        problems["live"] = "the daemon loop has not turned for 12 s"
        assert http_get(base + "/livez")[0::2] == (
            503,
            b"the daemon loop has not turned for 12 s\n",
        )
    finally:
        server.close()


def test_the_policy_families_are_what_the_policies_declare():
    from lrpilot.daemon.observability.exporter import RUN_FAMILIES
    from lrpilot.policies import POLICY_GAUGES

    exported = {name for name, _, _ in RUN_FAMILIES if name.startswith("lrpilot_policy_")}
    assert exported == {f"lrpilot_policy_{g.name}" for g in POLICY_GAUGES}
    assert {"lrpilot_policy_plateau_best", "lrpilot_policy_restarts"} <= exported
