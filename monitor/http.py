"""The metrics port: `/metrics` for Prometheus, `/healthz` and `/readyz` for load balancers and
Kubernetes probes that do not speak gRPC health; every other path is 404."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitor.metrics import Metrics

Ready = Callable[[], str | None]  # None when ready, else why not


def start(metrics: Metrics, host: str, port: int, ready: Ready) -> ThreadingHTTPServer:
    """Serve on a daemon thread; `server.server_address[1]` is the bound port, stop with shutdown()."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                why = ready()
                self._reply(200, b"ready\n") if why is None else self._reply(503, f"not ready: {why}\n".encode())
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds: not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="latentwatch-http", daemon=True).start()
    return server
