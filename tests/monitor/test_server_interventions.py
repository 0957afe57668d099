"""GetInterventions over real loopback gRPC: the decision trail a request wrote, read back page by page,
filtered, scoped to the caller's client by its `audit` token, and refused with the field named."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from latentwatch.v1 import monitor_pb2 as pb
from monitor.client import AsyncClient, Client, EscalationVerdict, Intervention, SteeringInfo
from monitor.config import Settings
from monitor.storage import InterventionRecord
from tests.monitor.server_fixtures import RunningServer, make_pack, runner

BUF = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "buf"
TOKENS = {  # token -> (client id, roles)
    "app-secret-0123456789": ("app", ["generate", "admin"]),
    "audit-secret-0123456789": ("app", ["audit"]),
    "soc-secret-0123456789": ("soc", ["audit:*"]),
}
APP, AUDIT, SOC = TOKENS
T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
N = 11  # written straight to the trail: the rule kinds the policy engine writes, triples sharing a time


def _t(i: int) -> datetime:
    return T0 + timedelta(seconds=i // 3)


def _trail_record(i: int) -> InterventionRecord:
    kind = ("log", "alert", "escalate", "shadow")[i % 4]
    extra = {
        "escalate": {
            "escalation": {
                "endpoint": "moderation",
                "flagged": i % 2 == 0,
                "categories": ["violence"],
                "scores": {"violence": 0.9},
                "latency_s": 0.25,
                "error": None,
            }
        },
        "shadow": {"shadow_action": "block"},
    }.get(kind, {})
    return InterventionRecord(
        "trail-req",
        kind,
        i,
        detector_id=f"d{i % 2}",
        client_id=("app", "other")[i % 3 == 0],
        rule_id=f"rule-{kind}",
        policy_version="p1",
        detector_version="1.0",
        score=0.5 + i / 100,
        outcome={"log": "logged", "alert": "alerted", "escalate": "blocked", "shadow": "shadowed"}[kind],
        created_at=_t(i),
        **extra,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trail")
    r = runner()
    (tmp / "tokens.yaml").write_text(
        "".join(
            f"- {{sha256: {hashlib.sha256(t.encode()).hexdigest()}, client_id: {c}, roles: {json.dumps(roles)}}}\n"
            for t, (c, roles) in TOKENS.items()
        )
    )
    settings = Settings(
        packs=[make_pack(r, tmp / "always", id="always", threshold=0.0)],
        port=0,
        metrics_port=None,
        db=f"sqlite:///{tmp}/db.sqlite",
        auth_tokens=tmp / "tokens.yaml",
        detectors={"always": {"action": "block"}},
        permissions={"app": {"steering": True}},
        max_page_size=5,
    )
    srv = RunningServer(settings, r)
    records = [_trail_record(i) for i in range(N)]
    for rec in sorted(records, key=lambda rec: (rec.token_start * 7) % N):  # not in time order
        srv.server.writer.submit(rec)
    yield srv, r, records
    srv.stop()


def as_(setup, token) -> Client:
    return Client(setup[0].target, timeout=30, token=token)


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def all_pages(c: Client, **filters) -> tuple[list[Intervention], int]:
    got, token, pages = [], "", 0
    while True:
        page, token = c.get_interventions(page_token=token, **filters)
        got, pages = got + page, pages + 1
        if not token:
            return got, pages


def test_what_a_blocked_steered_generate_wrote_is_what_get_interventions_returns(setup):
    steer = pb.SteeringRequest(
        vector=[0.0] * (setup[1].d_model - 1) + [1.0],
        hook_point="blocks.2.resid_post",
        kind=pb.STEERING_KIND_ADD,
        coefficient=0.5,
    )
    with as_(setup, APP) as app, as_(setup, AUDIT) as audit:
        events = list(
            app.stub.Generate(pb.GenerateRequest(prompt="x y", max_new_tokens=4, steering=[steer]), timeout=30)
        )
        assert events[-1].summary.finish_reason == pb.FINISH_REASON_BLOCKED
        streamed = [e.intervention for e in events if e.WhichOneof("event") == "intervention"]
        request_id = events[-1].summary.request_id
        stored = audit.stub.GetInterventions(pb.GetInterventionsRequest(request_id=request_id), timeout=30)
        assert list(stored.interventions) == streamed and stored.next_page_token == ""  # every field, as streamed
        typed, _ = audit.get_interventions(request_id=request_id)
    assert [i.intervention_id for i in typed] == [i.intervention_id for i in streamed]
    (start,) = [i for i in typed if i.kind == "steer"]  # admitted with the request: first on the trail
    (block,) = [i for i in typed if i.kind == "block"]
    assert typed[0] == start and typed[-1] == block
    assert (start.kind, start.detector_id, start.token_index, start.client_id) == ("steer", "", 0, "app")
    assert start.steering == SteeringInfo("add", "blocks.2.resid_post", 0.5, "inline", "generated", "")
    assert (block.kind, block.detector_id, block.request_id, block.snapshot_version) == (
        "block",
        "always",
        request_id,
        events[-1].summary.snapshot_version,
    )
    assert block.steering is None and block.escalation is None and block.shadow_action is None


def test_every_field_of_a_rule_record_crosses_the_wire(setup):
    with as_(setup, SOC) as soc:
        got, _ = all_pages(soc, request_id="trail-req")
    by_id = {i.intervention_id: i for i in got}
    for rec in setup[2]:
        i = by_id[rec.intervention_id]
        assert (i.kind, i.rule_id, i.policy_version, i.detector_id, i.detector_version, i.outcome, i.token_index) == (
            rec.kind,
            rec.rule_id,
            "p1",
            rec.detector_id,
            "1.0",
            rec.outcome,
            rec.token_start,
        )
        assert i.score == pytest.approx(rec.score) and i.create_time == rec.created_at
        assert i.shadow_action == ("block" if rec.kind == "shadow" else None)
        assert i.escalation == (
            EscalationVerdict("moderation", rec.token_start % 2 == 0, ["violence"], 0.25)
            if rec.kind == "escalate"
            else None
        )


@pytest.mark.parametrize("page_size", [1, 2, 0])  # 0: the server's default, capped by max_page_size=5
def test_pages_neither_repeat_nor_skip(setup, page_size):
    with as_(setup, SOC) as soc:
        got, pages = all_pages(soc, request_id="trail-req", page_size=page_size)
    expected = sorted(setup[2], key=lambda rec: (rec.created_at, rec.intervention_id))
    assert [i.intervention_id for i in got] == [rec.intervention_id for rec in expected]
    assert pages == -(-N // (page_size or 5))


@pytest.mark.parametrize(
    "filters, keep",
    [
        ({"kind": "escalate"}, lambda rec: rec.kind == "escalate"),
        ({"rule_id": "rule-shadow"}, lambda rec: rec.rule_id == "rule-shadow"),
        ({"detector_id": "d1"}, lambda rec: rec.detector_id == "d1"),
        ({"client_id": "other"}, lambda rec: rec.client_id == "other"),
        ({"detector_id": "d0", "kind": "log"}, lambda rec: rec.detector_id == "d0" and rec.kind == "log"),
        ({"since": _t(3), "until": _t(9)}, lambda rec: _t(3) <= rec.created_at < _t(9)),
        ({"kind": "block"}, lambda rec: False),
    ],
)
def test_filters(setup, filters, keep):
    with as_(setup, SOC) as soc:
        got, _ = all_pages(soc, request_id="trail-req", page_size=2, **filters)
    expected = sorted((rec for rec in setup[2] if keep(rec)), key=lambda rec: (rec.created_at, rec.intervention_id))
    assert [i.intervention_id for i in got] == [rec.intervention_id for rec in expected]


def test_an_audit_token_sees_its_own_clients_trail_only_and_audit_star_sees_all(setup):
    mine = {rec.intervention_id for rec in setup[2] if rec.client_id == "app"}
    with as_(setup, AUDIT) as audit, as_(setup, SOC) as soc, as_(setup, APP) as app:
        assert {i.intervention_id for i in all_pages(audit, request_id="trail-req")[0]} == mine
        assert {i.intervention_id for i in all_pages(audit, request_id="trail-req", client_id="app")[0]} == mine
        assert refused(lambda: audit.get_interventions(client_id="other")) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "client_id 'other' needs the 'audit:*' role; client 'app' has audit",
        )
        assert {i.client_id for i in all_pages(soc, request_id="trail-req")[0]} == {"app", "other"}
        assert {i.client_id for i in all_pages(soc, request_id="trail-req", client_id="other")[0]} == {"other"}
        assert refused(app.get_interventions) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "GetInterventions needs the 'audit' role; client 'app' has generate, admin",
        )
        with Client(setup[0].target, timeout=30) as anonymous:
            assert refused(anonymous.get_interventions)[0] == grpc.StatusCode.UNAUTHENTICATED


def _ts(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.GetInterventionsRequest(page_token="garbage"), "page_token: invalid"),
        (pb.GetInterventionsRequest(page_size=-1), "page_size: must be >= 0, got -1"),
        (pb.GetInterventionsRequest(kind=99), "kind: unknown enum value 99"),
        (pb.GetInterventionsRequest(start_time=_ts(T0), end_time=_ts(T0)), "end_time: must be after start_time"),
        (pb.GetInterventionsRequest(start_time=Timestamp(seconds=2**62)), "start_time: timestamp out of range"),
        (pb.GetInterventionsRequest(rule_id="a\x00b"), "rule_id: must be text without NUL characters"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(setup, request_, field):
    with as_(setup, SOC) as soc:
        code, details = refused(lambda: soc.stub.GetInterventions(request_, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details


def test_a_page_token_continues_only_its_own_filters(setup):
    with as_(setup, SOC) as soc:
        _, token = soc.get_interventions(request_id="trail-req", kind="log", page_size=1)
        assert token
        assert soc.get_interventions(request_id="trail-req", kind="log", page_token=token)[0]
        code, details = refused(lambda: soc.get_interventions(request_id="trail-req", kind="alert", page_token=token))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == (
        "page_token: was issued for other filters; start again without it"
    )


def test_the_client_refuses_an_unknown_kind_before_any_call(setup):
    with as_(setup, SOC) as soc, pytest.raises(ValueError, match="kind: unknown value 'blocked'"):
        soc.get_interventions(kind="blocked")


def test_async_client_pages_the_same_trail(setup):
    async def main():
        async with AsyncClient(setup[0].target, timeout=30, token=SOC) as c:
            return await c.get_interventions(request_id="trail-req", kind="shadow")

    got, token = asyncio.run(main())
    assert token == "" and [i.shadow_action for i in got] == ["block"] * len(got) and got


def test_without_a_database_it_is_failed_precondition(setup):
    """A service with no writer (as embedded without storage) over its own loopback server."""
    from monitor.interceptor import ErrorInterceptor
    from monitor.metrics import Metrics
    from monitor.server import SERVICE, MonitorService
    from monitor.wire import add_service

    async def main():
        settings = Settings(packs=[], port=0, metrics_port=None)
        service = MonitorService(settings, setup[1], writer=None)
        server = grpc.aio.server(interceptors=[ErrorInterceptor(Metrics(), (SERVICE.full_name,))])
        add_service(service, server, SERVICE)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=30) as c:
                with pytest.raises(grpc.RpcError) as e:
                    await c.get_interventions()
                return e.value.code(), e.value.details()
        finally:
            await server.stop(None)
            service.tokenizer_pool.shutdown(wait=False)

    assert asyncio.run(main()) == (grpc.StatusCode.FAILED_PRECONDITION, "no database is configured")


def test_buf_curl_pages_the_trail_as_the_readme_shows(setup):
    if not BUF.exists():
        pytest.fail("buf not found (npm devDependency @bufbuild/buf): run `make install`")
    body = json.dumps({"requestId": "trail-req", "kind": "INTERVENTION_KIND_ESCALATE", "pageSize": 2})
    got = subprocess.run(
        [
            str(BUF),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "-H",
            f"Authorization: Bearer {SOC}",
            "-d",
            body,
            f"http://{setup[0].target}/latentwatch.v1.Monitor/GetInterventions",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    page = json.loads(got.stdout)  # protobuf JSON: lowerCamelCase names, enums by name
    escalated = [rec for rec in setup[2] if rec.kind == "escalate"]
    assert [i["interventionId"] for i in page["interventions"]] == [rec.intervention_id for rec in escalated][:2]
    first = page["interventions"][0]
    assert (first["kind"], first["ruleId"], first["escalation"]["endpoint"]) == (
        "INTERVENTION_KIND_ESCALATE",
        "rule-escalate",
        "moderation",
    )
    assert bool(page.get("nextPageToken")) == (len(escalated) > 2)
