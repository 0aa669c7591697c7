"""/metrics over HTTP: a small threaded server on its own thread.

The standard library's server rather than prometheus-client's: the body is
the exporter's text (daemon/observability/exporter.py renders the per-run families itself,
for speed), gzipped when the scraper accepts it (Prometheus does; a body of
1,000 runs is ~2.4 MB of text, ~10x less gzipped). ``/healthz`` renders
nothing: 200 while the daemon loop turns, 503 (and why) when it is wedged;
that is what liveness probes and the container's HEALTHCHECK ask.
"""

from __future__ import annotations

import gzip
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

log = logging.getLogger("lrpilot.daemon")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
INDEX = b"lrpilot daemon: metrics at /metrics, health at /healthz, liveness at /livez\n"


class MetricsServer:
    def __init__(
        self,
        render: Callable[[], str],
        host: str,
        port: int,
        health: Callable[[], str | None] = lambda: None,
        liveness: Callable[[], str | None] | None = None,
    ) -> None:
        handler = type(
            "Handler",
            (MetricsHandler,),
            {
                "render": staticmethod(render),
                "health": staticmethod(health),
                "liveness": staticmethod(liveness or health),
            },
        )
        family_host = host.strip("[]")
        server_class = ThreadingHTTPServer
        if ":" in family_host:  # an IPv6 address
            # type() with ThreadingHTTPServer as its base makes a subclass of it.
            server_class = cast(
                type[ThreadingHTTPServer],
                type("Server6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6}),
            )
        self._server = server_class((family_host, port), handler)
        self._server.daemon_threads = True
        self.host, self.port = family_host, self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="lrpilot-metrics", daemon=True
        )
        self._thread.start()
        # A scrape renders on this thread while the daemon loop waits for the
        # GIL: the daemon loop shortens the switch interval while it runs
        # (daemon/service/server.py), and the renderer offers the GIL every
        # few runs (exporter.YIELD_EVERY).

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class MetricsHandler(BaseHTTPRequestHandler):
    render: Callable[[], str]
    health: Callable[[], str | None]  # None when healthy, else why not (/healthz)
    liveness: Callable[[], str | None]  # the same for /livez: only what a restart mends
    server_version = "lrpilot"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = self.render().encode()
            except Exception:
                log.exception("rendering /metrics failed")
                self._reply(500, b"rendering the metrics failed; see the daemon log\n")
                return
            self._reply(200, body, CONTENT_TYPE)
        elif path in ("/healthz", "/livez"):
            problem = self.health() if path == "/healthz" else self.liveness()
            if problem is None:
                self._reply(200, b"ok\n")
            else:
                self._reply(503, problem.encode() + b"\n")
        elif path == "/":
            self._reply(200, INDEX)
        else:
            self._reply(404, b"not found: try /metrics\n")

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024
        if gzipped:
            body = gzip.compress(body, compresslevel=1)  # zlib lets go of the GIL
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every few seconds is not news
