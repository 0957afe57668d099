"""No alert lost: PostgreSQL stopped under alert-raising traffic, with and without a SIGKILL of
the server, and a journal that fills up.

Every request alerts (a probe with threshold 0). The clients keep every id they were told of
(the request id of each Score answered, the id of each alert Generate streamed); afterwards
each is in the database exactly once. Nothing waits on a fixed sleep for a result: every
check polls with a generous deadline.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor.config import Settings
from monitor.storage import create_storage_engine
from tests.monitor.server_fixtures import RunningServer, make_pack
from tests.pg import PostgresServer
from tests.tiny import tiny_model, tiny_runner, tiny_tokenizer

OUTAGE_S = 30.0  # in process; the SIGKILL test holds the outage KILL_AFTER_S before killing
KILL_AFTER_S = 15.0
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pg():
    """A PostgreSQL of this module's own: stopping it must not disturb other tests."""
    server = PostgresServer().start()
    yield server
    server.stop()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


def health(target: str) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(grpc.insecure_channel(target)).Check(
            health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        return None


class Traffic:
    """One Score and one Generate client on their own threads, each keeping what it was told."""

    def __init__(self, target: str):
        self.target = target
        self.told: list[tuple[float, str, str]] = []  # (when, "score" request id | "alert" id, id)
        self.errors: collections.Counter[str] = collections.Counter()
        self.refusals: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in ("score", "generate")]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, kind: str) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.MonitorStub(channel)
            while not self._stop.is_set():
                try:
                    if kind == "score":
                        resp = stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="hello")]), timeout=30)
                        self.told.append((time.monotonic(), "score", resp.request_id))
                    else:
                        for msg in stub.Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=2), timeout=30):
                            if msg.HasField("alert"):
                                self.told.append((time.monotonic(), "alert", msg.alert.alert_id))
                except grpc.RpcError as e:
                    self.errors[e.code().name] += 1
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        self.refusals.append(e.details() or "")
                    time.sleep(0.05)
                time.sleep(0.01)

    def count(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(since <= t < until for t, _, _ in list(self.told))


def assert_stored_once(url: str, traffic: Traffic) -> tuple[int, int]:
    """Every id the clients were told of is in the database once; returns (told, alert rows)."""
    engine = create_storage_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT alert_id, request_id FROM alerts")).all()
    finally:
        engine.dispose()
    by_alert = collections.Counter(r.alert_id for r in rows)
    by_request = collections.Counter(r.request_id for r in rows)
    missing = [(kind, i) for _, kind, i in traffic.told
               if (by_alert if kind == "alert" else by_request)[i] != 1]  # one input, one detector: one alert
    assert not missing, f"{len(missing)} of {len(traffic.told)} alerts told to clients are not stored once: " \
                        f"{missing[:5]}"
    return len(traffic.told), len(rows)


def test_postgresql_outage_under_traffic_loses_no_alert(pg, tmp_path):
    runner = tiny_runner("llama")
    url = pg.create_database()
    settings = Settings(packs=[make_pack(runner, tmp_path / "pack", threshold=0.0)], port=0, metrics_port=None,
                        db=url, journal_dir=tmp_path / "journal")
    srv = RunningServer(settings, runner)
    writer, metrics = srv.server.writer, srv.server.metrics
    try:
        with Traffic(srv.target) as traffic:
            wait_until(lambda: traffic.count() >= 10, 60, "alerts before the outage")
            pg.pause()
            down = time.monotonic()
            wait_until(lambda: writer.outage_s > 0, 30, "the writer to notice")
            stub = pb_grpc.MonitorStub(grpc.insecure_channel(srv.target))
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.GetAlerts(pb.GetAlertsRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            assert info.value.details() == "the alert database is unavailable; retry later"
            assert time.monotonic() - t0 < 10  # read-your-writes does not wait out its 5 s on a dead database
            assert health(srv.target) == SERVING  # the journal has room: keep serving
            wait_until(lambda: time.monotonic() - down >= OUTAGE_S, OUTAGE_S + 5, "the outage to last")
            assert writer.depth > 0 and metrics.value("latentwatch_storage_queue_depth") == writer.depth
            assert metrics.value("latentwatch_storage_oldest_pending_seconds") > OUTAGE_S / 2
            assert metrics.value("latentwatch_storage_write_failures_total") >= 5
            pg.resume()
            up = time.monotonic()
            wait_until(lambda: traffic.count(since=up) >= 10, 60, "alerts after the outage")
        during = traffic.count(down, up)
        assert during >= 20 and traffic.errors == {}, (during, traffic.errors)  # served throughout
        wait_until(lambda: writer.depth == 0, 120, "the journal to drain")
        told, rows = assert_stored_once(url, traffic)
        print(f"\nPostgreSQL down {up - down:.1f} s: {during} alerts told to clients meanwhile, {told} in all; "
              f"{rows} alert rows, every one told stored once; {writer.write_failures} failed writes retried")
    finally:
        srv.stop()


class Serve:
    """`latentwatch serve` in a subprocess on the tiny model, logging to a file, SERVING when built."""

    def __init__(self, tmp: Path, url: str, name: str):
        self.port, self.metrics_port = _free_port(), _free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        cmd = [str(BIN / "latentwatch"), "serve", "--model", str(tmp / "model"), "--pack", str(tmp / "pack"),
               "--db", url, "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LATENTWATCH_JOURNAL_DIR": str(tmp / "journal"),
               "LATENTWATCH_LOG_LEVEL": "warning"}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: self.proc.poll() is not None or health(self.target) == SERVING, 300, "serve to start")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def metric(self, name: str) -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return next(s.value for f in text_string_to_metric_families(body) for s in f.samples if s.name == name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_during_an_outage_loses_no_alert(pg, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    from monitor.runner import ModelRunner

    make_pack(ModelRunner.load(str(tmp_path / "model"), device="cpu"), tmp_path / "pack", threshold=0.0)
    url = pg.create_database()
    first = Serve(tmp_path, url, "first")
    try:
        with Traffic(first.target) as traffic:
            wait_until(lambda: traffic.count() >= 10, 60, "alerts before the outage")
            pg.pause()
            down = time.monotonic()
            wait_until(lambda: time.monotonic() - down >= KILL_AFTER_S, KILL_AFTER_S + 5, "the outage to last")
            first.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            first.proc.wait(30)
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    during = traffic.count(down, killed)
    assert during >= 20, (during, traffic.errors)
    pg.resume()
    second = Serve(tmp_path, url, "second")  # writes what the journal holds before it serves
    try:
        replayed = second.metric("latentwatch_storage_replayed_records_total")
        assert replayed >= during  # at least the alerts told during the outage (plus their request rows)
        told, rows = assert_stored_once(url, traffic)
        print(f"\nPostgreSQL down {KILL_AFTER_S:.0f} s, server SIGKILLed: {during} alerts told to clients meanwhile, "
              f"{told} in all; the restart replayed {replayed:.0f} journal records; {rows} alert rows, every one "
              "told stored once")
    finally:
        second.proc.send_signal(signal.SIGTERM)
        second.proc.wait(120)


def test_a_full_journal_refuses_requests_and_health_follows(pg, tmp_path):
    runner = tiny_runner("llama")
    url = pg.create_database()
    settings = Settings(packs=[make_pack(runner, tmp_path / "pack", threshold=0.0)], port=0, metrics_port=None,
                        db=url, journal_dir=tmp_path / "journal", journal_max_bytes=1 << 16)
    srv = RunningServer(settings, runner)
    try:
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(srv.target))
        with Traffic(srv.target) as traffic:
            wait_until(lambda: traffic.count() >= 5, 60, "alerts before the outage")
            pg.pause()
            down = time.monotonic()
            try:
                wait_until(lambda: traffic.refusals, 120, "the journal to fill")
                full = time.monotonic()
                assert traffic.refusals[0].startswith("alert journal full: the database has been unreachable for ")
                assert traffic.refusals[0].endswith(" s; retry on another replica")
                wait_until(lambda: health(srv.target) == NOT_SERVING, 30, "health to turn NOT_SERVING")
                with pytest.raises(grpc.RpcError) as info:
                    stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="hello")]), timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert srv.server.writer.journal_bytes <= 1 << 16
            finally:
                pg.resume()
            up = time.monotonic()
            wait_until(lambda: health(srv.target) == SERVING, 120, "health to turn SERVING again")
            serving = time.monotonic()
            served = traffic.count()
            wait_until(lambda: traffic.count() >= served + 5, 60, "requests served again")
        wait_until(lambda: srv.server.writer.depth == 0, 120, "the journal to drain")
        told, rows = assert_stored_once(url, traffic)
        assert srv.server.writer.dropped == 0
        print(f"\n64 KiB journal full {full - down:.1f} s into the outage; {len(traffic.refusals)} requests refused "
              f"UNAVAILABLE; SERVING again {serving - up:.1f} s after PostgreSQL came back; {told} alerts told, "
              f"{rows} alert rows, every one told stored once")
    finally:
        srv.stop()
