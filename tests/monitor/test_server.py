"""The gRPC sidecar over real loopback gRPC, with a tiny model and tiny probe packs."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentwatch.v1 import monitor_pb2 as pb
from monitor.client import Alert, Client, Intervention, Summary, Token
from monitor.config import DetectorPolicyConfig, Settings
from tests.monitor.server_fixtures import RunningServer, make_pack, runner


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    r = runner()
    packs = [make_pack(r, tmp / "always", id="always", threshold=0.0),
             make_pack(r, tmp / "never", id="never", threshold=1.0, seed=1)]
    settings = Settings(packs=packs, port=0, metrics_port=0, db=f"sqlite:///{tmp}/db.sqlite",
                        score={"max_batch": 16, "max_wait_ms": 300}, generate={"max_batch": 8, "max_wait_ms": 50},
                        max_new_tokens=200, max_input_tokens=200)
    srv = RunningServer(settings, r)
    yield srv, r, tmp
    srv.stop()


@pytest.fixture(scope="module")
def client(setup):
    with Client(setup[0].target, timeout=30) as c:
        yield c


def metric(srv, name, **labels):
    return srv.server.metrics.value(name, labels) or 0.0


def test_plain_text_is_scored_the_way_the_packs_were_trained(client):
    """Chat-trained packs see a plain-text Score input as a user turn: no train/serve skew."""
    text, chat = client.score(["is this a user turn?", [{"role": "user", "content": "is this a user turn?"}]])
    assert text.token_count == chat.token_count and text.scores == pytest.approx(chat.scores, abs=1e-6)


def test_list_detectors_and_score(client):
    dets = {d.id: d for d in client.list_detectors()}
    assert set(dets) == {"always", "never"} and dets["always"].hook_point == "blocks.1.resid_post"
    res = client.score(["hello world", [{"role": "user", "content": "hi there"}]], include_token_scores=True)
    assert [r.flagged for r in res] == [{"always": True, "never": False}] * 2
    assert 0 < len(res[0].tokens) == len(res[0].token_scores["always"]) < res[0].token_count  # user turn on


def test_generate_streams_tokens_alert_and_summary_and_alerts_are_stored(client):
    events = list(client.generate([{"role": "user", "content": "tell me"}], max_new_tokens=6,
                                  include_token_scores=True, client_id="tenant-a"))
    summary = events[-1]
    assert isinstance(summary, Summary) and summary.finish_reason == "length" and summary.completion_tokens == 6
    tokens = [e for e in events if isinstance(e, Token)]
    assert len(tokens) == 6 and set(tokens[0].scores) == {"always", "never"}
    assert [a.detector_id for a in summary.alerts] == ["always"]
    stored, _ = client.get_alerts(request_id=summary.request_id)
    assert [a.detector_id for a in stored] == ["always"] and stored[0].client_id == "tenant-a"
    by_client, _ = client.get_alerts(client_id="tenant-a", detector_id="always")
    assert by_client


def test_block_policy_stops_generation_before_any_token(client):
    req = pb.GenerateRequest(prompt="x y z", max_new_tokens=10, policy_overrides=[
        pb.DetectorPolicy(detector_id="always", action=pb.ACTION_BLOCK)])
    events = list(client.stub.Generate(req, timeout=30))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["alert", "intervention", "summary"]
    assert events[-1].summary.finish_reason == pb.FINISH_REASON_BLOCKED


def test_steer_policy_switches_ablation_on(client):
    req = pb.GenerateRequest(prompt="x y z", max_new_tokens=4, policy_overrides=[
        pb.DetectorPolicy(detector_id="always", action=pb.ACTION_STEER)])
    events = [e.WhichOneof("event") for e in client.stub.Generate(req, timeout=30)]
    assert events[:2] == ["alert", "intervention"] and events.count("token") == 4


def test_sixteen_concurrent_scores_share_forward_passes(setup, client):
    srv = setup[0]
    before = metric(srv, "latentwatch_forward_passes_total", kind="score")
    errors = []

    def call(i):
        try:
            client.score([f"text number {i}"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    passes = metric(srv, "latentwatch_forward_passes_total", kind="score") - before
    assert 1 <= passes < 16
    assert metric(srv, "latentwatch_batch_size_count", kind="score") >= passes


def test_concurrent_generates_share_decode_steps(setup, client):
    srv = setup[0]
    before = metric(srv, "latentwatch_forward_passes_total", kind="decode")
    out = []
    threads = [threading.Thread(target=lambda: out.append(client.generate_text("abc", max_new_tokens=5)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4 and all(s.completion_tokens == 5 for s in out)
    assert metric(srv, "latentwatch_forward_passes_total", kind="decode") - before < 4 * 4


def test_cancelled_generate_stops_within_one_step(setup, client, monkeypatch):
    srv, r, _ = setup
    real = r.model.forward

    def slow(*a, **k):  # make steps slow enough that the client can cancel mid-stream
        time.sleep(0.02)
        return real(*a, **k)

    monkeypatch.setattr(r.model, "forward", slow)
    scheduler = srv.server.service.scheduler
    call = client.stub.Generate(pb.GenerateRequest(prompt="count", max_new_tokens=150), timeout=30)
    seen = 0
    for msg in call:
        seen += msg.WhichOneof("event") == "token"
        if seen == 3:
            call.cancel()
            break
    deadline = time.time() + 10
    while not scheduler.finished_jobs or scheduler.finished_jobs[-1].steps_at_cancel is None:
        assert time.time() < deadline
        time.sleep(0.01)
    job = scheduler.finished_jobs[-1]
    assert job.reason == "cancelled"
    assert job.steps - job.steps_at_cancel <= 1
    assert job.steps < 150


@pytest.mark.parametrize("request_, code, field", [
    (pb.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
    (pb.ScoreRequest(inputs=[pb.ScoreInput(text="  ")]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].text"),
    (pb.ScoreRequest(inputs=[pb.ScoreInput()]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]"),
    (pb.ScoreRequest(inputs=[pb.ScoreInput(text="a")], detectors=["nope"]), grpc.StatusCode.NOT_FOUND, "detectors[0]"),
    (pb.ScoreRequest(inputs=[pb.ScoreInput(text="a " * 300)]), grpc.StatusCode.RESOURCE_EXHAUSTED, "inputs[0].text"),
    (pb.ScoreRequest(inputs=[pb.ScoreInput(messages=[pb.ChatMessage(role="robot", content="x")])]),
     grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].messages[0].role"),
])
def test_bad_score_requests(client, request_, code, field):
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Score(request_, timeout=30)
    assert e.value.code() == code and field in e.value.details()


@pytest.mark.parametrize("request_, code, field", [
    (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.top_p"),
    (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.temperature"),
    (pb.GenerateRequest(prompt="a", max_new_tokens=10_000), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (pb.GenerateRequest(prompt="a", detectors=["nope"]), grpc.StatusCode.NOT_FOUND, "detectors[0]"),
    (pb.GenerateRequest(prompt="a " * 300), grpc.StatusCode.RESOURCE_EXHAUSTED, "prompt"),
    (pb.GenerateRequest(prompt="a", steering=[pb.SteeringRequest(vector=[1.0] * 3, hook_point="blocks.0.resid_post",
                                                                 kind=pb.STEERING_KIND_ADD)]),
     grpc.StatusCode.INVALID_ARGUMENT, "steering[0].vector"),
    (pb.GenerateRequest(prompt="a", policy_overrides=[pb.DetectorPolicy(detector_id="zz")]),
     grpc.StatusCode.NOT_FOUND, "policy_overrides[0].detector_id"),
])
def test_bad_generate_requests(client, request_, code, field):
    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.Generate(request_, timeout=30))
    assert e.value.code() == code and field in e.value.details()


def test_invalid_utf8_names_the_field_and_server_keeps_serving(setup, client):
    raw = pb.ScoreRequest(inputs=[pb.ScoreInput(text="ok"), pb.ScoreInput(text="ab")]).SerializeToString()
    raw = raw.replace(b"ab", b"\xff\xfe")
    call = grpc.insecure_channel(setup[0].target).unary_unary(
        "/latentwatch.v1.Monitor/Score", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        call(raw, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs[1].text" in e.value.details()
    assert client.score(["still serving"])[0].flagged["always"]


def test_bad_page_token(client):
    with pytest.raises(grpc.RpcError) as e:
        client.get_alerts(page_token="garbage")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in e.value.details()


def test_reload_detectors(setup, client):
    assert {d.id for d in client.reload_detectors()} == {"always", "never"}
    assert client.score(["after reload"])[0].flagged == {"always": True, "never": False}


def test_metrics_move(setup):
    srv = setup[0]
    assert metric(srv, "latentwatch_requests_total", kind="score", outcome="ok") > 0
    assert metric(srv, "latentwatch_requests_total", kind="score", outcome="invalid_argument") > 0
    assert metric(srv, "latentwatch_requests_total", kind="generate", outcome="ok") > 0  # finished, not cancelled
    assert metric(srv, "latentwatch_alerts_total", detector="always", action="alert") > 0
    assert metric(srv, "latentwatch_monitor_overhead_seconds_total") > 0  # hooks + bank were timed
    assert metric(srv, "latentwatch_time_to_first_token_seconds_count") > 0


def test_health_serving_then_not_serving_on_shutdown(tmp_path):
    r = runner()
    settings = Settings(packs=[make_pack(r, tmp_path / "p", id="p")], port=0, metrics_port=None,
                        db=f"sqlite:///{tmp_path}/db.sqlite")
    srv = RunningServer(settings, r)
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.target))
    check = lambda: stub.Check(health_pb2.HealthCheckRequest(service="latentwatch.v1.Monitor"), timeout=5).status  # noqa: E731
    assert check() == health_pb2.HealthCheckResponse.SERVING
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 1.0, "drain": 1.0})
    stopper.start()
    statuses = set()
    deadline = time.time() + 5
    while time.time() < deadline and health_pb2.HealthCheckResponse.NOT_SERVING not in statuses:
        try:
            statuses.add(check())
        except grpc.RpcError:
            break
        time.sleep(0.02)
    stopper.join()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses


def test_client_typed_events(client):
    events = list(client.generate("hi", max_new_tokens=2))
    assert isinstance(events[0], (Alert, Token, Intervention)) and isinstance(events[-1], Summary)


def test_policy_config_for_unknown_action_is_rejected():
    with pytest.raises(ValueError):
        DetectorPolicyConfig(action="explode")

