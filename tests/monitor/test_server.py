"""The gRPC sidecar over real loopback gRPC, with a tiny model and tiny probe packs."""

from __future__ import annotations

import gc
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor.client import Alert, Client, Intervention, Summary, Token
from monitor.config import Settings
from tests.monitor.server_fixtures import RunningServer, make_pack, runner


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    r = runner()
    packs = [make_pack(r, tmp / "always", id="always", threshold=0.0),
             make_pack(r, tmp / "never", id="never", threshold=1.0, seed=1)]
    settings = Settings(packs=packs, port=0, metrics_port=0, db=f"sqlite:///{tmp}/db.sqlite",
                        score={"max_batch": 16, "max_wait_ms": 300}, generate={"max_batch": 8, "max_wait_ms": 50},
                        max_new_tokens=200, max_input_tokens=200,
                        permissions={"trusted": {"policy_overrides": True, "steering": True},
                                     "lax": {"policy_overrides": True, "weaken_monitoring": True}})
    srv = RunningServer(settings, r)
    yield srv, r, tmp
    srv.stop()


@pytest.fixture(scope="module")
def client(setup):
    with Client(setup[0].target, timeout=30) as c:
        yield c


def metric(srv, name, **labels):
    return srv.server.metrics.value(name, labels) or 0.0


def test_finished_requests_leave_nothing_for_the_cyclic_gc(client):
    """Reference counting frees a request when it ends. In a server holding a model the cyclic GC
    runs rarely, so every cycle left behind (stream and job, a rebuilt SQL statement) was memory
    that grew with traffic: the soak's RSS slope."""
    def ours(o) -> bool:
        module = getattr(type(o), "__module__", "") or ""
        return module.startswith(("monitor", "probes", "sqlalchemy", "latentwatch", "asyncio"))

    for _ in range(2):  # warm: first-use caches, compiled statements, the journal's segment
        list(client.generate("hello there", max_new_tokens=4))
        client.score(["hello"])
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            list(client.generate("hello there", max_new_tokens=4))
            client.score(["hello"])
        time.sleep(0.5)  # the storage thread's last flush
        gc.collect()
        left = sorted({type(o).__qualname__ for o in gc.garbage if ours(o)})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


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


def _generate(client, **kw):
    return list(client.stub.Generate(pb.GenerateRequest(**kw), timeout=30))


def _refused(client, code, **kw) -> str:
    with pytest.raises(grpc.RpcError) as e:
        _generate(client, **kw)
    assert e.value.code() == code, e.value.details()
    return e.value.details()


TRUSTED = pb.RequestMetadata(client_id="trusted")


def test_block_policy_stops_generation_before_any_token_and_is_on_the_trail(setup, client):
    events = _generate(client, prompt="x y z", max_new_tokens=10, metadata=TRUSTED,
                       policy_overrides=[pb.DetectorPolicy(detector_id="always", action=pb.ACTION_BLOCK)])
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["intervention", "alert", "intervention", "summary"]
    assert events[0].intervention.kind == pb.INTERVENTION_KIND_OVERRIDE
    assert events[0].intervention.override.action == pb.ACTION_BLOCK
    assert events[2].intervention.kind == pb.INTERVENTION_KIND_BLOCK
    assert events[-1].summary.finish_reason == pb.FINISH_REASON_BLOCKED
    stored = {i.intervention_id: i.kind for i in _stored_interventions(setup, events[-1].summary.request_id)}
    assert stored == {events[0].intervention.intervention_id: "override",
                      events[2].intervention.intervention_id: "block"}


def _stored_interventions(setup, request_id):
    from monitor.storage import get_interventions

    srv = setup[0].server
    srv.writer.flush(5.0)
    rows, _ = get_interventions(srv.writer.engine, request_id=request_id, page_size=100)
    return rows


def test_steer_policy_ablates_the_detectors_direction_from_the_first_token(setup, client):
    """Decided on the prompt, the ablation runs from the start (the request runs again with it), so
    the detector reads h - (h.u)u on every token: its logit is exactly its bias."""
    _, r, _ = setup
    events = _generate(client, prompt="x y z", max_new_tokens=4, metadata=TRUSTED, include_token_scores=True,
                       policy_overrides=[pb.DetectorPolicy(detector_id="always", action=pb.ACTION_STEER)])
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[:3] == ["intervention", "alert", "intervention"] and kinds.count("token") == 4
    steer = events[2].intervention
    assert steer.kind == pb.INTERVENTION_KIND_STEER and steer.steering.kind == pb.STEERING_KIND_ABLATE
    assert steer.token_index == 0 and steer.steering.positions == pb.STEERING_POSITIONS_ALL
    snap = setup[0].server.service.snapshot
    bias = float(snap.bank.detectors[snap.by_id["always"].slot].head.b1[0])
    scores = [e.token.scores["always"] for e in events if e.WhichOneof("event") == "token"]
    expected = 1 / (1 + np.exp(-bias))
    assert scores == pytest.approx([expected] * 4, abs=1e-6)
    plain = _generate(client, prompt="x y z", max_new_tokens=4, include_token_scores=True)
    plain_scores = [e.token.scores["always"] for e in plain if e.WhichOneof("event") == "token"]
    assert abs(plain_scores[0] - expected) > 1e-5  # unsteered, the first token reads the direction


def test_overrides_and_steering_are_refused_unless_the_config_allows_them(client):
    block = [pb.DetectorPolicy(detector_id="always", action=pb.ACTION_BLOCK)]
    details = _refused(client, grpc.StatusCode.PERMISSION_DENIED, prompt="x", policy_overrides=block)
    assert "policy_overrides" in details and "permission" in details
    vec = pb.SteeringRequest(vector=[0.0] * 31 + [1.0], hook_point="blocks.2.resid_post", kind=pb.STEERING_KIND_ADD,
                             coefficient=1.0)
    assert "steering" in _refused(client, grpc.StatusCode.PERMISSION_DENIED, prompt="x", steering=[vec],
                                  metadata=pb.RequestMetadata(client_id="lax"))


def test_a_request_may_not_weaken_its_monitoring_without_explicit_permission(client):
    """Raising the threshold to 1.0 or turning block into alert switched monitoring off before."""
    details = _refused(client, grpc.StatusCode.PERMISSION_DENIED, prompt="x", metadata=TRUSTED,
                       policy_overrides=[pb.DetectorPolicy(detector_id="always", threshold=1.0)])
    assert "policy_overrides[0].threshold" in details and "weaken_monitoring" in details
    lax = pb.RequestMetadata(client_id="lax")
    events = _generate(client, prompt="x", max_new_tokens=2, metadata=lax,
                       policy_overrides=[pb.DetectorPolicy(detector_id="always", threshold=1.0)])
    assert events[0].intervention.override.threshold == pytest.approx(1.0)  # allowed, and on the trail


def test_steering_that_would_blind_a_detector_is_refused(setup, client):
    """Ablating a probe's own direction before its hook point would silence it."""
    srv, r, _ = setup
    snap = srv.server.service.snapshot
    direction = snap.bank.directions(snap.by_id["always"].slot)[:, 0]
    blind = pb.SteeringRequest(vector=direction.tolist(), hook_point="blocks.0.resid_post",
                               kind=pb.STEERING_KIND_ABLATE, coefficient=1.0)
    details = _refused(client, grpc.StatusCode.PERMISSION_DENIED, prompt="x", steering=[blind], metadata=TRUSTED)
    assert "steering[0].vector" in details and "'always'" in details and "steer_detector_directions" in details
    # after the detector's hook point it cannot change what the detector reads: allowed, and streamed
    after = pb.SteeringRequest(vector=direction.tolist(), hook_point="blocks.2.resid_post",
                               kind=pb.STEERING_KIND_ADD, coefficient=0.5)
    events = _generate(client, prompt="x", max_new_tokens=2, steering=[after], metadata=TRUSTED)
    first = events[0].intervention
    assert first.kind == pb.INTERVENTION_KIND_STEER and first.steering.hook_point == "blocks.2.resid_post"
    assert first.steering.coefficient == pytest.approx(0.5) and first.detector_id == ""


def test_unknown_enum_values_are_invalid_not_mapped(client):
    details = _refused(client, grpc.StatusCode.INVALID_ARGUMENT, prompt="x", metadata=TRUSTED,
                       policy_overrides=[pb.DetectorPolicy(detector_id="always", action=77)])
    assert "policy_overrides[0].action" in details
    bad = pb.SteeringRequest(vector=[1.0] * 32, hook_point="blocks.2.resid_post", kind=9)
    assert "steering[0].kind" in _refused(client, grpc.StatusCode.INVALID_ARGUMENT, prompt="x", steering=[bad],
                                          metadata=TRUSTED)


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
    scheduler, jobs = srv.server.service.scheduler, []
    submit = scheduler.submit_generate
    monkeypatch.setattr(scheduler, "submit_generate", lambda job: (jobs.append(job), submit(job))[1])
    call = client.stub.Generate(pb.GenerateRequest(prompt="count", max_new_tokens=150), timeout=30)
    seen = 0
    for msg in call:
        seen += msg.WhichOneof("event") == "token"
        if seen == 3:
            call.cancel()
            break
    assert jobs[0].finished.wait(10)
    job = jobs[0]
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
    (pb.GenerateRequest(prompt="a", policy_overrides=[pb.DetectorPolicy(detector_id="zz")],
                        metadata=pb.RequestMetadata(client_id="trusted")),
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
    stopper = threading.Thread(target=srv.stop, kwargs={"drain": 1.0, "linger": 1.0})
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



def test_streamed_alerts_are_the_stored_alerts_with_kind_input_conversation_and_tags(client):
    md = pb.RequestMetadata(client_id="tenant-b", conversation_id="conv-7", tags={"team": "red"})
    events = _generate(client, prompt="x y", max_new_tokens=2, metadata=md)
    streamed = [e.alert for e in events if e.WhichOneof("event") == "alert"]
    stored = client.stub.GetAlerts(pb.GetAlertsRequest(request_id=events[-1].summary.request_id), timeout=30).alerts
    assert [a.alert_id for a in stored] == [a.alert_id for a in streamed] != []
    assert stored[0].request_kind == pb.REQUEST_KIND_GENERATE and stored[0].metadata == md
    assert stored[0].snapshot_version == events[-1].summary.snapshot_version != ""
    score = client.stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="a"), pb.ScoreInput(text="b")], metadata=md),
                              timeout=30)
    alerts = client.stub.GetAlerts(pb.GetAlertsRequest(request_id=score.request_id), timeout=30).alerts
    assert sorted(a.input_index for a in alerts) == [0, 1]
    assert {(a.request_kind, a.metadata.conversation_id, a.metadata.tags["team"]) for a in alerts} == {
        (pb.REQUEST_KIND_SCORE, "conv-7", "red")}


def test_alerts_only_stores_the_text_of_the_inputs_that_alerted_only(setup, client):
    from monitor.storage import get_request

    srv = setup[0].server
    resp = client.stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="first input"),
                                                     pb.ScoreInput(text="second input")],
                                             detectors=["never"]), timeout=30)
    srv.writer.flush(5.0)
    row = get_request(srv.writer.engine, resp.request_id)
    assert row.alerted and "first input" in row.prompt_text  # "always" still monitors, though not reported
    assert [d.detector_id for d in resp.results[0].detectors] == ["never"]


def test_deadline_and_not_found_are_outcomes_of_their_own(setup, client, monkeypatch):
    srv, r, _ = setup
    real = r.model.forward
    monkeypatch.setattr(r.model, "forward", lambda *a, **k: time.sleep(0.05) or real(*a, **k))
    before = metric(srv, "latentwatch_requests_total", kind="generate", outcome="deadline_exceeded")
    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.Generate(pb.GenerateRequest(prompt="slow", max_new_tokens=150), timeout=1.0))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 10
    while metric(srv, "latentwatch_requests_total", kind="generate", outcome="deadline_exceeded") == before:
        assert time.time() < deadline
        time.sleep(0.05)
    _refused(client, grpc.StatusCode.NOT_FOUND, prompt="x", detectors=["nope"])
    assert metric(srv, "latentwatch_requests_total", kind="generate", outcome="not_found") >= 1


def test_a_hundred_kilobyte_detector_id_is_not_found_with_a_short_message(client):
    details = _refused(client, grpc.StatusCode.NOT_FOUND, prompt="x", detectors=["z" * 100_000])
    assert "detectors[0]" in details and len(details) < 300


def test_server_info_describes_model_and_snapshot(setup, client):
    info = client.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    assert info.model_id == "tiny-llama" and info.device == "cpu" and info.dtype == "float32"
    assert len(info.model_fingerprint) == 64 and info.server_version
    assert info.snapshot_version == setup[0].server.service.snapshot.version
    assert {d.id for d in info.detectors} == {"always", "never"}


def test_a_server_without_detectors_refuses_to_generate_unmonitored(tmp_path):
    r = runner()
    common = dict(packs=[], port=0, metrics_port=None, db=f"sqlite:///{tmp_path}/db.sqlite", max_new_tokens=64)
    srv = RunningServer(Settings(**common), r)
    try:
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(srv.target))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=2), timeout=30))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "unmonitored" in e.value.details()
    finally:
        srv.stop()
    bench = RunningServer(Settings(serve_unmonitored=True, **{**common, "db": f"sqlite:///{tmp_path}/b.sqlite"}), r)
    try:
        stub = pb_grpc.MonitorStub(grpc.insecure_channel(bench.target))
        events = list(stub.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=2), timeout=30))
        assert events[-1].summary.usage.completion_tokens == 2
    finally:
        bench.stop()
