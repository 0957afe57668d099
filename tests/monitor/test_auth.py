"""Bearer tokens and roles over real loopback gRPC, with a tiny model; the token file; `latentwatch token`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from typer.testing import CliRunner

from latentwatch.v1 import monitor_pb2 as pb
from monitor import cli
from monitor.auth import RPCS, TokenFileError, read_tokens
from monitor.client import AsyncClient, Client, Summary
from monitor.config import Settings
from monitor.runner import ModelRunner
from tests.monitor.server_fixtures import RunningServer, make_pack, runner

BUF = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "buf"
# token -> (client id, roles); long and distinctive, so a leak into logs or metrics would show
TOKENS = {
    "gen-secret-0123456789": ("app", ["generate"]),
    "audit-secret-0123456789": ("app", ["audit"]),
    "other-secret-0123456789": ("other", ["generate"]),
    "soc-secret-0123456789": ("soc", ["audit:*"]),
    "admin-secret-0123456789": ("red-team", ["generate", "admin"]),
    "trusted-secret-0123456789": ("trusted", ["generate"]),
    "ops-secret-0123456789": ("ops", ["generate", "admin"]),
    "dash-secret-0123456789": ("dash", []),
}
GEN, AUDIT, OTHER, SOC, ADMIN, TRUSTED, OPS, DASH = TOKENS
BOGUS = "bogus-secret-0123456789"
ALLOWED = {"policy_overrides": True, "steering": True}
BLOCK = [pb.DetectorPolicy(detector_id="always", action=pb.ACTION_BLOCK)]
STEER = [pb.SteeringRequest(vector=[0.0] * 31 + [1.0], hook_point="blocks.2.resid_post", kind=pb.STEERING_KIND_ADD,
                            coefficient=1.0)]


def write_tokens(path: Path, tokens: dict, extra: str = "") -> None:
    """Replace the file at once, as an editor or a config management tool would."""
    lines = [f"- {{sha256: {hashlib.sha256(t.encode()).hexdigest()}, client_id: {c}, roles: {json.dumps(r)}}}"
             for t, (c, r) in tokens.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n" + extra)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    r = runner()
    write_tokens(tmp / "tokens.yaml", TOKENS)
    settings = Settings(packs=[make_pack(r, tmp / "always", id="always", threshold=0.0)], port=0, metrics_port=None,
                        db=f"sqlite:///{tmp}/db.sqlite", auth_tokens=tmp / "tokens.yaml",
                        permissions={"red-team": ALLOWED, "trusted": ALLOWED})
    srv = RunningServer(settings, r)
    yield srv, tmp / "tokens.yaml"
    srv.stop()


def as_(setup, token):
    return Client(setup[0].target, timeout=30, token=token)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def generate(c: Client, **kw) -> list:
    return list(c.stub.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=2, **kw), timeout=30))


def metric(setup, name, **labels) -> float:
    return setup[0].server.metrics.value(name, labels) or 0.0


# ------------------------------------------------------------------------------ the file


def entry(sha="a" * 64, client="a", roles="[generate]") -> str:
    return f"- {{sha256: {sha}, client_id: {client}, roles: {roles}}}\n"


@pytest.mark.parametrize("text, message", [
    (entry() + entry("b" * 64) + entry("c" * 64, "b", "[root]"), "entries[2].roles: unknown role 'root'"),
    ("- {token: gen-secret-0123456789, client_id: a}\n", "entries[0].sha256: Field required (and 1 more)"),
    (entry("gen-secret-0123456789"), "entries[0].sha256: must be the 64 hex digits"),
    (entry("F" * 64) + entry("f" * 64, "b"), "entries[1].sha256: the same token as entries[0]"),
    (entry(client="''"), "entries[0].client_id: String should have at least 1 character"),
    ("sha256: abc\n", "expected a YAML list of {sha256, client_id, roles} entries, got dict"),
    ("- {sha256: 'gen-secret-0123456789\n", "not valid YAML at line 2, column 1"),
])
def test_a_bad_token_file_is_refused_in_one_line_naming_the_entry(tmp_path, text, message):
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(TokenFileError) as e:
        read_tokens(tmp_path / "t.yaml")
    text = str(e.value)
    assert text.startswith(f"auth tokens file {tmp_path / 't.yaml'}: ") and message in text and "\n" not in text
    assert "gen-secret" not in text  # never quotes what was pasted into the file


def test_every_monitor_rpc_has_a_role_rule():
    methods = pb.DESCRIPTOR.services_by_name["Monitor"].methods_by_name
    assert sorted(m for m, _ in RPCS.values()) == sorted(methods)


def test_serve_refuses_a_bad_token_file_before_loading_the_model(tmp_path, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ModelRunner, "load", load)
    (tmp_path / "t.yaml").write_text(entry(roles="[root]"))
    result = CliRunner().invoke(cli.app, ["serve", "--port", "0", "--metrics-port", "0", "--db",
                                          f"sqlite:///{tmp_path}/lw.db", "--auth-tokens", str(tmp_path / "t.yaml")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: auth tokens file {tmp_path / 't.yaml'}: entries[0].roles: unknown role 'root'" in result.stderr


# ------------------------------------------------------------------------------ the server


def test_no_token_or_a_bogus_one_is_unauthenticated_and_health_stays_open(setup):
    for token in (None, BOGUS, "x"):
        with as_(setup, token) as c:
            for call in (c.list_detectors, c.get_server_info, lambda: c.score(["hi"]), c.reload_detectors):
                assert code_of(call) == (grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
    with grpc.insecure_channel(setup[0].target) as ch:
        for value in (f"Basic {GEN}", f"Bearer {GEN}, Bearer {GEN}"):
            stub = pb.DESCRIPTOR.services_by_name["Monitor"]
            call = ch.unary_unary(f"/{stub.full_name}/ListDetectors",
                                  request_serializer=pb.ListDetectorsRequest.SerializeToString,
                                  response_deserializer=pb.ListDetectorsResponse.FromString)
            assert code_of(lambda: call(pb.ListDetectorsRequest(), metadata=[("authorization", value)],
                                        timeout=30))[0] == grpc.StatusCode.UNAUTHENTICATED
        # the body of an anonymous call is never read: garbage is UNAUTHENTICATED, not INVALID_ARGUMENT
        garbage = ch.unary_unary(f"/{stub.full_name}/Score")
        assert code_of(lambda: garbage(b"\xff\xff\xff\xff", timeout=30))[0] == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_each_rpc_needs_its_role(setup):
    with as_(setup, GEN) as gen, as_(setup, AUDIT) as audit, as_(setup, DASH) as dash:
        assert code_of(gen.get_alerts) == (grpc.StatusCode.PERMISSION_DENIED,
                                           "GetAlerts needs the 'audit' role; client 'app' has generate")
        assert code_of(gen.reload_detectors) == (grpc.StatusCode.PERMISSION_DENIED,
                                                 "ReloadDetectors needs the 'admin' role; client 'app' has generate")
        assert code_of(lambda: audit.score(["hi"])) == (grpc.StatusCode.PERMISSION_DENIED,
                                                        "Score needs the 'generate' role; client 'app' has audit")
        assert "'generate' role; client 'dash' has no roles" in code_of(lambda: list(dash.generate("hi")))[1]
        assert [d.id for d in dash.list_detectors()] == ["always"] and dash.get_server_info().model_id
    with as_(setup, ADMIN) as admin:
        assert [d.id for d in admin.reload_detectors()] == ["always"]


def test_the_stored_client_id_is_the_tokens_whatever_the_request_says(setup):
    spoof = pb.RequestMetadata(client_id="red-team")
    with as_(setup, GEN) as gen, as_(setup, SOC) as soc:
        events = generate(gen, metadata=spoof)
        summary = events[-1].summary
        assert {a.metadata.client_id for a in summary.alerts} == {"app"}
        scored = gen.stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="hi")], metadata=spoof), timeout=30)
        for request_id in (summary.request_id, scored.request_id):
            stored, _ = soc.get_alerts(request_id=request_id)
            assert stored and {a.client_id for a in stored} == {"app"}


def test_an_audit_token_sees_its_own_clients_alerts_only_and_audit_star_sees_all(setup):
    with as_(setup, GEN) as gen, as_(setup, OTHER) as other, as_(setup, AUDIT) as audit, as_(setup, SOC) as soc:
        gen.score(["mine"])
        theirs = other.score(["theirs"]).request_id
        own, _ = audit.get_alerts()
        assert own and {a.client_id for a in own} == {"app"}
        assert {a.client_id for a in audit.get_alerts(client_id="app")[0]} == {"app"}
        assert audit.get_alerts(request_id=theirs)[0] == []  # a request id does not widen the filter
        assert code_of(lambda: audit.get_alerts(client_id="other")) == (
            grpc.StatusCode.PERMISSION_DENIED, "client_id 'other' needs the 'audit:*' role; client 'app' has audit")
        assert {"app", "other"} <= {a.client_id for a in soc.get_alerts(page_size=1000)[0]}
        assert {a.client_id for a in soc.get_alerts(client_id="other")[0]} == {"other"}
        assert [a.request_id for a in soc.get_alerts(request_id=theirs)[0]] == [theirs]


def test_overrides_and_steering_need_the_admin_role_as_well_as_the_permission(setup):
    denied = grpc.StatusCode.PERMISSION_DENIED
    with as_(setup, TRUSTED) as trusted, as_(setup, OPS) as ops, as_(setup, ADMIN) as admin:
        assert code_of(lambda: generate(trusted, policy_overrides=BLOCK)) == (
            denied, "policy_overrides needs the 'admin' role; client 'trusted' has generate")
        assert code_of(lambda: generate(trusted, steering=STEER)) == (
            denied, "steering needs the 'admin' role; client 'trusted' has generate")
        # admin, but no permission for its own client id; claiming one that has it changes nothing
        code, details = code_of(lambda: generate(ops, policy_overrides=BLOCK,
                                                 metadata=pb.RequestMetadata(client_id="red-team")))
        assert code == denied and "client 'ops' lacks the 'policy_overrides' permission" in details
        events = generate(admin, policy_overrides=BLOCK, steering=STEER, metadata=pb.RequestMetadata(client_id="x"))
        first = [e.intervention for e in events[:2]]
        assert [i.kind for i in first] == [pb.INTERVENTION_KIND_OVERRIDE, pb.INTERVENTION_KIND_STEER]
        assert {i.metadata.client_id for i in first} == {"red-team"}
        assert events[-1].summary.finish_reason == pb.FINISH_REASON_BLOCKED


def test_the_token_file_is_reloaded_on_change_and_a_bad_version_keeps_the_old_tokens(setup, caplog):
    _, path = setup
    new = "new-secret-0123456789"
    caplog.set_level(logging.INFO, logger="monitor.auth")
    try:
        with as_(setup, new) as c:
            assert code_of(c.list_detectors)[0] == grpc.StatusCode.UNAUTHENTICATED
            write_tokens(path, {**TOKENS, new: ("late", ["generate"])})
            assert c.list_detectors() and c.score(["hi"])  # no restart
            write_tokens(path, {GEN: TOKENS[GEN]}, extra=f"- {{sha256: {new}, client_id: late, roles: [root]}}\n")
            assert c.list_detectors()  # still the tokens of the last good version
            with as_(setup, AUDIT) as audit:
                assert audit.get_alerts()[0]
            assert "entries[1].sha256: must be the 64 hex digits" in caplog.text
            assert "the 9 token(s) loaded before stay in force" in caplog.text
            write_tokens(path, {k: v for k, v in TOKENS.items() if k != GEN})
            assert code_of(c.list_detectors)[0] == grpc.StatusCode.UNAUTHENTICATED  # removed: revoked
    finally:
        write_tokens(path, TOKENS)
    assert new not in caplog.text


def test_failures_are_counted_and_no_token_appears_in_metrics_or_logs(setup, caplog):
    caplog.set_level(logging.DEBUG)
    name = "latentwatch_auth_failures_total"
    before = {r: metric(setup, name, reason=r) for r in ("missing", "invalid", "forbidden")}
    outcomes = {o: metric(setup, "latentwatch_requests_total", kind="get_alerts", outcome=o)
                for o in ("unauthenticated", "permission_denied")}
    for token in (None, BOGUS, GEN):
        with as_(setup, token) as c:
            code_of(c.get_alerts)
    with as_(setup, TRUSTED) as trusted:
        code_of(lambda: generate(trusted, policy_overrides=BLOCK))
    assert {r: metric(setup, name, reason=r) - v for r, v in before.items()} == {
        "missing": 1, "invalid": 1, "forbidden": 2}
    assert metric(setup, "latentwatch_requests_total", kind="get_alerts", outcome="unauthenticated") \
        == outcomes["unauthenticated"] + 2
    assert metric(setup, "latentwatch_requests_total", kind="get_alerts", outcome="permission_denied") \
        == outcomes["permission_denied"] + 1
    exposition = generate_latest(setup[0].server.metrics.registry).decode()
    assert 'latentwatch_auth_failures_total{reason="invalid"}' in exposition
    assert "GetAlerts refused: invalid bearer token" in caplog.text  # the logs were captured
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for token in (*TOKENS, BOGUS):
        assert token not in exposition and token not in logged
        assert hashlib.sha256(token.encode()).hexdigest() not in logged


def test_async_client_sends_its_token(setup):
    async def main():
        async with AsyncClient(setup[0].target, timeout=30, token=GEN) as c:
            events = [e async for e in c.generate("hi", max_new_tokens=2, client_id="nope")]
            return await c.list_detectors(), events[-1]

    detectors, summary = asyncio.run(main())
    assert [d.id for d in detectors] == ["always"]
    assert isinstance(summary, Summary) and {a.client_id for a in summary.alerts} == {"app"}


def test_buf_curl_with_an_authorization_header(setup):
    if not BUF.exists():
        pytest.fail("buf not found (npm devDependency @bufbuild/buf): run `make install`")

    def curl(*headers):
        return subprocess.run([str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *headers,
                               "-d", "{}", f"http://{setup[0].target}/latentwatch.v1.Monitor/ListDetectors"],
                              capture_output=True, text=True, timeout=60)

    ok = curl("-H", f"Authorization: Bearer {GEN}")  # schema from reflection, which needs no token
    assert ok.returncode == 0, ok.stderr
    assert [d["id"] for d in json.loads(ok.stdout)["detectors"]] == ["always"]
    refused = curl()
    assert refused.returncode != 0 and "missing or invalid bearer token" in refused.stderr


def test_the_cli_sends_a_token_from_a_file_or_the_environment_never_an_argument(setup, tmp_path):
    from tests.monitor.cli_helpers import error_line, run

    target = setup[0].target
    assert "UNAUTHENTICATED: missing or invalid bearer token" in error_line(run("info", "--target", target))
    (tmp_path / "token").write_text(GEN + "\n")
    by_file = run("info", "--target", target, "--token-file", tmp_path / "token")
    assert by_file.exit_code == 0 and "always" in by_file.stdout, by_file.output
    by_env = run("info", "--target", target, "--format", "json", env={"LATENTWATCH_TOKEN": GEN})
    assert by_env.exit_code == 0 and json.loads(by_env.stdout)["detectors"][0]["id"] == "always"
    assert GEN not in by_file.output + by_env.output


# ------------------------------------------------------------------------------ latentwatch token


def test_token_new_prints_the_token_once_and_the_entry_for_the_file(tmp_path):
    result = CliRunner().invoke(cli.app, ["token", "new", "--client-id", "app", "--roles", "generate,audit:*"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("lw_") and len(token) > 40 and token not in result.stderr
    entry = result.stderr.strip().splitlines()[-1]
    (tmp_path / "t.yaml").write_text(entry + "\n")
    [read] = read_tokens(tmp_path / "t.yaml")
    assert read.sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert (read.client_id, read.roles) == ("app", ("generate", "audit:*"))


def test_token_hash_reads_the_token_from_stdin():
    run = CliRunner().invoke
    result = run(cli.app, ["token", "hash", "--client-id", "app", "--roles", "admin"], input=GEN + "\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.removeprefix("- ")) == {
        "sha256": hashlib.sha256(GEN.encode()).hexdigest(), "client_id": "app", "roles": ["admin"]}
    assert "unknown role 'root'" in run(cli.app, ["token", "hash", "--client-id", "a", "--roles", "root"],
                                        input=GEN).stderr
    assert "at least 16" in run(cli.app, ["token", "hash", "--client-id", "a"], input="short").stderr
