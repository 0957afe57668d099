"""SIGTERM on a real `latentwatch serve`: streams in flight finish within the drain, the rest end
UNAVAILABLE, and every record is stored."""

from __future__ import annotations

import signal
import threading

import grpc
import pytest

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor.runner import ModelRunner
from monitor.storage import get_alerts, get_request, open_readonly
from tests.monitor.server_fixtures import ServeProcess, make_pack, tiny_model_folder

STREAMS = 8


@pytest.fixture(scope="module")
def model_and_pack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shutdown")
    folder = tiny_model_folder(tmp / "model")
    make_pack(ModelRunner.load(str(folder), device="cpu"), tmp / "pack", threshold=0.0)
    return folder, tmp / "pack"


def _sigterm_mid_generation(tmp_path, model_and_pack, drain: float, tokens: int):
    folder, pack = model_and_pack
    db = f"sqlite:///{tmp_path}/db.sqlite"
    srv = ServeProcess("--model", str(folder), "--pack", str(pack), "--db", db, "--drain-seconds", str(drain),
                       env={"LATENTWATCH_MAX_NEW_TOKENS": str(tokens)})
    started = threading.Barrier(STREAMS + 1)
    results: list = [None] * STREAMS

    def stream(i):
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(srv.target))
        events = []
        try:
            for n, ev in enumerate(stub.Generate(pb.GenerateRequest(prompt=f"stream {i}", max_new_tokens=tokens),
                                                 timeout=120)):
                events.append(ev)
                if n == 3:
                    started.wait(60)
            results[i] = ("OK", events, "")
        except grpc.RpcError as e:
            results[i] = (e.code().name, events, e.details())

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(STREAMS)]
    try:
        for t in threads:
            t.start()
        started.wait(120)  # every stream is mid-generation
        srv.signal(signal.SIGTERM)
        for t in threads:
            t.join(180)
        code, log = srv.wait()
    finally:
        srv.kill()
    return code, log, results, open_readonly(db)


def test_a_long_enough_drain_lets_every_stream_finish(tmp_path, model_and_pack):
    code, log, results, _ = _sigterm_mid_generation(tmp_path, model_and_pack, drain=60, tokens=200)
    assert code == 0, log[-2000:]
    assert [r[0] for r in results] == ["OK"] * STREAMS
    summaries = [r[1][-1].summary for r in results]
    assert all(s.finish_reason == pb.FINISH_REASON_LENGTH and s.usage.completion_tokens == 200 for s in summaries)


def test_a_short_drain_cuts_the_rest_with_a_clear_status_and_keeps_every_record(tmp_path, model_and_pack):
    code, log, results, engine = _sigterm_mid_generation(tmp_path, model_and_pack, drain=0, tokens=240)
    assert code == 0, log[-2000:]
    assert {r[0] for r in results} == {"UNAVAILABLE"}
    assert all("shut down before this generation finished" in r[2] for r in results)
    for _, events, _ in results:
        alert = next(e.alert for e in events if e.WhichOneof("event") == "alert")
        stored, _ = get_alerts(engine, request_id=alert.request_id, page_size=10)
        assert [a.alert_id for a in stored] == [alert.alert_id]
        row = get_request(engine, alert.request_id)
        assert row.finish_reason == "cancelled" and row.finished_at is not None
        assert row.completion_tokens == sum(e.WhichOneof("event") == "token" for e in events)
