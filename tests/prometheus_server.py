"""A real Prometheus for the tests: Debian's `prometheus` binary on a free
loopback port, its TSDB in a temporary directory, scraping the given targets
every second; and a small client for its HTTP API (instant and range queries,
label values, series).

    with prometheus_process(tmp_path, [daemon.metrics]) as prom:
        prom.wait_for_scrape()
        prom.query("lrpilot_run_step")

The binary is found at /usr/bin/prometheus or on the PATH; when it is missing
the test fails with how to get it (`scripts/test` installs it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from procs import free_port, wait_for

JOB = "lrpilot"
SCRAPE_INTERVAL_S = 1
STARTUP_S = 20.0  # Prometheus is ready (TSDB opened, config loaded) within this


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    assert found, (
        "the `prometheus` binary is missing: `apt-get install prometheus` "
        "(bash scripts/test installs it)"
    )
    return found


class PrometheusError(Exception):
    """Prometheus answered a query with an error (a bad expression, a bad range)."""


class PrometheusProcess:
    """`prometheus` scraping ``targets`` (HOST:PORT, path /metrics) as job
    ``lrpilot`` every second; its log goes to ``where/prometheus.log``."""

    def __init__(self, where: Path, targets: list[str]) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = where / "prometheus.log"
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
            },
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                    "static_configs": [{"targets": targets}],
                }
            ],
        }
        config_path = where / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        with open(self.log_path, "w") as sink:
            self.proc = subprocess.Popen(
                [
                    prometheus_binary(),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={where / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:  # 400/422: the answer says why
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def wait_ready(self) -> PrometheusProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    return reply.status == 200
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(ready, STARTUP_S, f"prometheus to be ready on {self.url}", self.log)
        return self

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: [{"metric": labels, "value": [t, "v"]}, ...]."""
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        return self._get("/api/v1/query", **params)["result"]

    def query_range(
        self, expr: str, start: float, end: float, step: float = SCRAPE_INTERVAL_S
    ) -> list[dict[str, Any]]:
        """A range query: [{"metric": labels, "values": [[t, "v"], ...]}, ...]."""
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)[
            "result"
        ]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` gives."""
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)


@contextmanager
def prometheus_process(where: Path, targets: list[str]) -> Iterator[PrometheusProcess]:
    prom = PrometheusProcess(where, targets)
    try:
        yield prom.wait_ready()
    finally:
        prom.stop()
