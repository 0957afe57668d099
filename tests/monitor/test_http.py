"""The metrics port answers /metrics, /healthz and /readyz, and nothing else."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor import http
from monitor.metrics import Metrics
from tests.monitor.test_metrics import exercise


def get(port: int, path: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers["Content-Type"]


@pytest.fixture
def served():
    metrics, why = Metrics(["harmful_intent"]), {"now": None}
    server = http.start(metrics, "127.0.0.1", 0, lambda: why["now"])
    yield metrics, server.server_address[1], why
    server.shutdown()
    server.server_close()


def test_scrape_passes_promtool(served) -> None:
    metrics, port, _ = served
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found (Debian package `prometheus`): run `make install`")
    exercise(metrics)
    status, body, content_type = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {f.name for f in metrics.registry.collect()} <= set(fams)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("latentwatch_forward_passes_total", (("kind", "score"),))] == 1
    proc = subprocess.run([promtool, "check", "metrics"], check=False, input=body, capture_output=True, timeout=60)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0 and not out.strip(), out


def test_health_paths_and_nothing_else(served) -> None:
    _, port, why = served
    assert get(port, "/healthz")[:2] == (200, b"ok\n")
    assert get(port, "/readyz")[:2] == (200, b"ready\n")
    why["now"] = "the alert journal is full"
    assert get(port, "/readyz")[:2] == (503, b"not ready: the alert journal is full\n")
    assert get(port, "/healthz")[0] == 200  # alive, just not ready
    for path in ("/", "/etc/passwd", "/metricsx", "/healthz/../metrics"):
        status, body, _ = get(port, path)
        assert status == 404 and b"latentwatch_" not in body, path
