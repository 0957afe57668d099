"""Operator logs: one JSON object per line with the RPC's facts, never the prompt."""

from __future__ import annotations

import json
import logging

import grpc

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor import logs
from monitor.config import Settings
from tests.monitor.server_fixtures import RunningServer, make_pack, runner


def test_json_access_lines_carry_the_rpc_and_never_the_prompt(tmp_path, capsys):
    r = runner()
    srv = RunningServer(Settings(packs=[make_pack(r, tmp_path / "p")], port=0, metrics_port=None,
                                 db=f"sqlite:///{tmp_path}/db.sqlite"), r)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("info", "json")
    try:
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(srv.target))
        md = pb.RequestMetadata(client_id="tenant-q")
        resp = stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="MY SECRET PROMPT")], metadata=md), timeout=30)
        try:
            stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="x")], detectors=["SECRET-ID"]), timeout=30)
        except grpc.RpcError:
            pass
    finally:
        srv.stop()
        logs.stop()  # every queued line written
        root.handlers[:], root.level = saved
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [x for x in lines if x["logger"] == "latentwatch.access"]
    ok = next(x for x in access if x.get("request_id") == resp.request_id)
    assert ok["rpc"] == "score" and ok["outcome"] == "ok" and ok["client_id"] == "tenant-q" and ok["latency_ms"] > 0
    assert {"time", "level", "message"} <= set(ok)
    assert any(x["outcome"] == "not_found" for x in access)
    assert not [x for x in lines if "SECRET" in json.dumps(x)]


def test_a_logged_traceback_stays_apart_from_the_message_through_the_writer_thread(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("info", "json")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("latentwatch.test").error("scoring failed (ref %s)", "abc123", exc_info=True)
    finally:
        logs.stop()
        root.handlers[:], root.level = saved
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "scoring failed (ref abc123)"
    assert "ValueError: boom" in line["exception"] and line["level"] == "error"
