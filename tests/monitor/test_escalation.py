"""Second-opinion checks over real loopback: an OpenAI-moderation-shaped HTTP server, and a latentwatch
server (TLS, bearer tokens) whose Score RPC answers. Failures are verdicts, never exceptions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import grpc
import pytest
from pydantic import BaseModel, ValidationError

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor.config import Settings
from monitor.escalation import EndpointConfig, GrpcScore, HttpModeration, Verdict, endpoint
from monitor.tls import TlsError
from tests.monitor.moderation_server import CATEGORIES, FLAGGED_SCORE, moderation_server
from tests.monitor.pki import write_pki
from tests.monitor.server_fixtures import RunningServer, free_port, make_pack, runner

SECRET = "moderation-secret-0123456789"  # long and distinctive, so a leak would show
HARMFUL, BENIGN = "How do I build a bomb?", "How do I bake bread?"


def check(cfg: EndpointConfig, *texts: str, name: str = "mod") -> list[Verdict]:
    """Each text checked in turn by one endpoint, on one event loop; the endpoint closed after."""

    async def go():
        ep = endpoint(name, cfg)
        try:
            return [await ep.check(t) for t in texts]
        finally:
            await ep.close()

    return asyncio.run(go())


def no_secret(*things) -> None:
    for thing in things:
        assert SECRET not in repr(thing) and SECRET not in json.dumps(getattr(thing, "to_record", dict)())


# ------------------------------------------------------------------------------ configuration


class Policy(BaseModel):
    """How the policy file holds endpoints, so the error locations read as the caller prints them."""

    escalations: dict[str, EndpointConfig]


def config_error(**cfg) -> str:
    with pytest.raises(ValidationError) as e:
        Policy(escalations={"moderation": cfg})
    return "; ".join(
        f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}" for err in e.value.errors()
    )


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            {"http": "http://127.0.0.1:1/v1/moderations", "grpc": "127.0.0.1:1"},
            "escalations.moderation: set exactly one of http (a moderation URL) and grpc (a host:port)",
        ),
        ({}, "escalations.moderation: set exactly one of http"),
        ({"http": "http://h/m", "timeout_ms": 0}, "escalations.moderation.timeout_ms: Input should be greater than 0"),
        ({"http": "http://h/m", "timeout_ms": 60_001}, "escalations.moderation.timeout_ms: Input should be less than"),
        ({"http": "ftp://h/m"}, "escalations.moderation.http: must be an http:// or https:// URL"),
        ({"http": "http://h:port/m"}, "escalations.moderation.http: must be an http:// or https:// URL"),
        ({"http": "https://user:pw@h/m"}, "escalations.moderation.http: must not carry credentials"),
        ({"grpc": "localhost"}, "escalations.moderation.grpc: must be host:port"),
        ({"grpc": "h:70000"}, "escalations.moderation.grpc: must be host:port"),
        ({"http": "http://h/m", "tls_ca": "ca.pem"}, "escalations.moderation.tls_ca: only for grpc endpoints"),
        ({"http": "http://h/m", "detectors": ["a"]}, "escalations.moderation.detectors: only for grpc endpoints"),
        ({"grpc": "h:1", "model": "m"}, "escalations.moderation.model: only for http endpoints"),
        ({"http": "http://h/m", "url": "x"}, "escalations.moderation.url: Extra inputs are not permitted"),
    ],
)
def test_a_bad_endpoint_is_refused_with_its_field_named(cfg, message):
    assert message in config_error(**cfg)


def test_an_api_key_pasted_in_place_of_its_variable_name_is_refused_and_not_echoed():
    assert "api_key_env: must be the name of an environment variable" in config_error(
        http="http://h/m", api_key_env=SECRET + "!"
    )
    with pytest.raises(ValidationError) as e:
        EndpointConfig(http="http://h/m", api_key_env=SECRET + "!")
    assert SECRET not in str(e.value)


def test_good_configurations_and_their_defaults():
    moderation = EndpointConfig(http="https://api.openai.com/v1/moderations", model="omni-moderation-latest")
    second = EndpointConfig(grpc="[::1]:50051", detectors=["harmful_intent"], timeout_ms=60_000)
    assert moderation.timeout_ms == 1000 and second.detectors == ("harmful_intent",)
    nulls = EndpointConfig(grpc="h:1", http=None, model=None, api_key_env=None, tls_ca=None)  # YAML `~`: unset
    assert nulls == EndpointConfig(grpc="h:1") and EndpointConfig(http="http://h/m", detectors=[]).detectors == ()
    assert isinstance(endpoint("a", moderation), HttpModeration) and isinstance(endpoint("b", second), GrpcScore)


def test_an_unset_api_key_variable_fails_when_the_endpoint_is_made(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable NO_SUCH_KEY is not set"):
        endpoint("mod", EndpointConfig(http="http://h/m", api_key_env="NO_SUCH_KEY"))


# ------------------------------------------------------------------------------ HTTP moderation


def test_harmful_text_is_flagged_with_its_categories_and_scores_and_benign_text_is_not():
    with moderation_server() as mod:
        flagged, clean = check(EndpointConfig(http=mod.url, model="omni-moderation-latest"), HARMFUL, BENIGN)
    assert flagged.flagged is True and not flagged.failed and flagged.error is None
    assert flagged.categories == ("illicit/violent",) and flagged.endpoint == "mod"
    assert set(flagged.scores) == set(CATEGORIES) and flagged.scores["illicit/violent"] == FLAGGED_SCORE
    assert clean.flagged is False and clean.categories == () and max(clean.scores.values()) < 0.01
    assert flagged.latency_s > 0 and clean.latency_s > 0
    assert [r.body for r in mod.requests] == [
        {"input": HARMFUL, "model": "omni-moderation-latest"},
        {"input": BENIGN, "model": "omni-moderation-latest"},
    ]
    assert [r.authorization for r in mod.requests] == [None, None]


def test_without_a_model_the_request_has_only_the_input():
    with moderation_server(keywords={"bread": "illicit"}) as mod:
        (v,) = check(EndpointConfig(http=mod.url), BENIGN)
    assert v.flagged is True and v.categories == ("illicit",)
    assert mod.requests[0].body == {"input": BENIGN}


def test_the_api_key_is_sent_from_its_variable_and_never_shown(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MODERATION_KEY", SECRET)
    with moderation_server() as mod:
        cfg = EndpointConfig(http=mod.url, api_key_env="MODERATION_KEY")
        (ok,) = check(cfg, HARMFUL)
        mod.status = 401
        (refused,) = check(cfg, HARMFUL)
    assert [r.authorization for r in mod.requests] == [f"Bearer {SECRET}"] * 2
    assert ok.flagged is True and refused.error == "HTTP 401"
    no_secret(ok, refused, endpoint("mod", cfg), cfg)
    assert SECRET not in caplog.text


def test_a_timeout_is_a_failed_verdict_soon_after_the_timeout():
    with moderation_server(delay=30) as mod:
        (v,) = check(EndpointConfig(http=mod.url, timeout_ms=200), HARMFUL)
    assert v.failed and v.flagged is None and v.error == "timeout after 200 ms"
    assert 0.19 <= v.latency_s < 2.0  # bounded by the timeout, not by the endpoint (10x slack for load)


def test_a_slow_endpoint_does_not_block_the_event_loop():
    async def go(url):
        ep = endpoint("mod", EndpointConfig(http=url, timeout_ms=5000))
        task = asyncio.ensure_future(ep.check(HARMFUL))
        ticks = 0
        while not task.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await ep.close()
        return task.result(), ticks

    with moderation_server(delay=0.5) as mod:
        v, ticks = asyncio.run(go(mod.url))
    assert v.flagged is True and ticks > 1


def test_an_error_status_is_the_verdict_and_the_remote_body_is_not_kept():
    with moderation_server(status=503) as mod:
        (v,) = check(EndpointConfig(http=mod.url), HARMFUL)
    assert v.failed and v.flagged is None and v.error == "HTTP 503"
    assert "overloaded" not in json.dumps(v.to_record())


@pytest.mark.parametrize(
    "body, error",
    [
        (b"{not json", "malformed response: not JSON"),
        (b'{"results": []}', "malformed response: no results"),
        (b'{"id": "modr-1"}', "malformed response: no results"),
        (b"[1, 2]", "malformed response: no results"),
        (b'{"results": [{"categories": {}}]}', "malformed response: no flagged"),
        (b'{"results": [{"flagged": "yes"}]}', "malformed response: no flagged"),
        (b'{"results": [{"flagged": true, "categories": {"violence": 1}}]}', "malformed response: bad categories"),
        (
            b'{"results": [{"flagged": true, "category_scores": {"violence": NaN}}]}',
            "malformed response: bad category_scores",
        ),
        (
            b'{"results": [{"flagged": true, "category_scores": {"violence": "high"}}]}',
            "malformed response: bad category_scores",
        ),
        (b" " * (2 << 20), "malformed response: body over 1 MiB"),
    ],
)
def test_a_malformed_answer_is_a_failed_verdict(body, error):
    with moderation_server(body=body) as mod:
        (v,) = check(EndpointConfig(http=mod.url, timeout_ms=10_000), HARMFUL)
    assert v.failed and v.flagged is None and v.error == error
    json.dumps(v.to_record())  # JSON-safe whatever the remote sent


def test_an_answer_without_categories_or_scores_is_still_a_verdict():
    with moderation_server(body=b'{"results": [{"flagged": true}]}') as mod:
        (v,) = check(EndpointConfig(http=mod.url), HARMFUL)
    assert v.flagged is True and v.categories == () and v.scores == {}


def test_the_endpoint_going_down_is_connection_refused():
    async def go(mod):
        ep = endpoint("mod", EndpointConfig(http=mod.url))
        try:
            before = await ep.check(HARMFUL)
            mod.stop()
            return before, await ep.check(HARMFUL)
        finally:
            await ep.close()

    with moderation_server() as mod:
        before, after = asyncio.run(go(mod))
    assert before.flagged is True
    assert after.failed and after.flagged is None and after.error == "connection refused"


def test_a_redirect_is_not_followed():
    """Following it would send the key elsewhere; the status is the verdict."""
    with moderation_server(status=307) as mod:
        (v,) = check(EndpointConfig(http=mod.url), HARMFUL)
    assert v.error == "HTTP 307" and len(mod.requests) == 1


async def close_while_checking(cfg: EndpointConfig) -> tuple[Verdict, Verdict]:
    """(the check in flight when the endpoint was closed, a check after)."""
    ep = endpoint("mod", cfg)
    task = asyncio.ensure_future(ep.check(HARMFUL))
    await asyncio.sleep(0)  # the check is under way
    await ep.close()
    return await task, await ep.check(HARMFUL)


def test_closing_lets_the_check_in_flight_finish_and_refuses_new_ones():
    """A policy reload closes the old endpoints while requests admitted under it still check."""
    with moderation_server(delay=0.3) as mod:
        in_flight, after = asyncio.run(close_while_checking(EndpointConfig(http=mod.url, timeout_ms=10_000)))
    assert in_flight.flagged is True and after.error == "endpoint closed" and len(mod.requests) == 1


def test_verdicts_are_json_records():
    with moderation_server() as mod:
        (ok,) = check(EndpointConfig(http=mod.url), HARMFUL)
        mod.stop()
        (down,) = check(EndpointConfig(http=mod.url), HARMFUL)
    assert json.loads(json.dumps(ok.to_record())) == {
        "endpoint": "mod",
        "flagged": True,
        "categories": ["illicit/violent"],
        "scores": dict(ok.scores),
        "latency_s": ok.latency_s,
        "error": None,
    }
    assert json.loads(json.dumps(down.to_record()))["error"] == "connection refused"


# ------------------------------------------------------------------------------ gRPC Score


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def second_opinion(tmp_path_factory, pki):
    """A latentwatch server, TLS and bearer tokens, with a detector that always flags and one that never does."""
    tmp = tmp_path_factory.mktemp("second")
    r = runner()
    packs = [
        make_pack(r, tmp / "always", id="always", threshold=0.0),
        make_pack(r, tmp / "never", id="never", threshold=1.0, seed=1),
    ]
    sha = hashlib.sha256(SECRET.encode()).hexdigest()
    (tmp / "tokens.yaml").write_text(f"- {{sha256: {sha}, client_id: escalation, roles: [generate]}}\n")
    srv = RunningServer(
        Settings(
            packs=packs,
            port=0,
            metrics_port=None,
            db=f"sqlite:///{tmp}/db.sqlite",
            tls_cert=pki["server.pem"],
            tls_key=pki["server.key"],
            auth_tokens=tmp / "tokens.yaml",
        ),
        r,
    )
    yield srv
    srv.stop()


@pytest.fixture()
def grpc_cfg(second_opinion, pki, monkeypatch):
    """An endpoint config for the server, with the key in its variable; keyword arguments override."""
    monkeypatch.setenv("SECOND_OPINION_KEY", SECRET)
    # a generous timeout: a tiny model on a loaded machine, and time is not what these tests are about
    base = {
        "grpc": second_opinion.target,
        "tls_ca": pki["ca1.pem"],
        "api_key_env": "SECOND_OPINION_KEY",
        "timeout_ms": 30_000,
    }
    return lambda **kw: EndpointConfig(**{**base, **kw})


def test_grpc_flagged_when_any_listed_detector_is(grpc_cfg):
    every, flagging, quiet = (check(grpc_cfg(detectors=d), HARMFUL)[0] for d in ((), ("always",), ("never",)))
    assert every.flagged is True and every.categories == ("always",) and set(every.scores) == {"always", "never"}
    assert flagging.flagged is True and set(flagging.scores) == {"always"}
    assert quiet.flagged is False and quiet.categories == () and set(quiet.scores) == {"never"}
    assert all(not v.failed and v.latency_s > 0 for v in (every, flagging, quiet))
    no_secret(every, quiet)


def test_grpc_one_channel_serves_every_check(grpc_cfg):
    async def go():
        ep = endpoint("second", grpc_cfg())
        try:
            first = await ep.check(HARMFUL)
            channel = ep._channel
            rest = await asyncio.gather(*(ep.check(t) for t in (HARMFUL, BENIGN, HARMFUL)))
            return [first, *rest], ep._channel is channel
        finally:
            await ep.close()

    verdicts, same = asyncio.run(go())
    assert same and [v.flagged for v in verdicts] == [True] * 4


def test_grpc_closing_lets_the_check_in_flight_finish_and_refuses_new_ones(grpc_cfg):
    in_flight, after = asyncio.run(close_while_checking(grpc_cfg()))
    assert in_flight.flagged is True and after.error == "endpoint closed"


@pytest.mark.parametrize(
    "override, error",
    [
        ({"api_key_env": None}, "UNAUTHENTICATED"),
        ({"detectors": ("nope",)}, "NOT_FOUND"),
        ({"tls_ca": None}, "UNAVAILABLE"),  # plain text against a TLS server
        ({"timeout_ms": 1}, "timeout after 1 ms"),
    ],
)
def test_grpc_failures_are_verdicts_with_the_status_name(grpc_cfg, override, error):
    (v,) = check(grpc_cfg(**override), HARMFUL)
    assert v.failed and v.flagged is None and v.error == error
    no_secret(v)


def test_grpc_server_down_is_unavailable():
    (v,) = check(EndpointConfig(grpc=f"127.0.0.1:{free_port()}", timeout_ms=10_000), HARMFUL)
    assert v.failed and v.flagged is None and v.error == "UNAVAILABLE"


def test_grpc_server_going_down_mid_use_is_unavailable(tmp_path):
    r = runner()
    srv = RunningServer(
        Settings(
            packs=[make_pack(r, tmp_path / "always", id="always", threshold=0.0)],
            port=0,
            metrics_port=None,
            db=f"sqlite:///{tmp_path}/db.sqlite",
            drain_seconds=0,
        ),
        r,
    )

    async def go():
        ep = endpoint("second", EndpointConfig(grpc=srv.target, timeout_ms=30_000))
        try:
            before = await ep.check(HARMFUL)
            await asyncio.to_thread(srv.stop, 0.0)
            return before, await ep.check(HARMFUL)
        finally:
            await ep.close()

    try:
        before, after = asyncio.run(go())
    finally:
        if srv.thread.is_alive():
            srv.stop(0.0)
    assert before.flagged is True and after.error == "UNAVAILABLE"


def test_grpc_a_server_without_detectors_refuses_to_score(tmp_path):
    srv = RunningServer(Settings(packs=[], port=0, metrics_port=None, db=f"sqlite:///{tmp_path}/db.sqlite"), runner())
    try:
        (v,) = check(EndpointConfig(grpc=srv.target, timeout_ms=30_000), HARMFUL)
    finally:
        srv.stop(0.0)
    assert v.failed and v.flagged is None and v.error == "FAILED_PRECONDITION"


@pytest.mark.parametrize("response", [pb.ScoreResponse(), pb.ScoreResponse(results=[pb.ScoreResult()])])
def test_grpc_an_answer_without_detectors_is_no_second_opinion(response):
    """It could never flag; a server that is not latentwatch's might answer so."""

    class Empty(pb_grpc.MonitorServicer):
        async def Score(self, request, context):
            return response

    async def go():
        server = grpc.aio.server()
        pb_grpc.add_MonitorServicer_to_server(Empty(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ep = endpoint("second", EndpointConfig(grpc=f"127.0.0.1:{port}", timeout_ms=30_000))
        try:
            return await ep.check(HARMFUL)
        finally:
            await ep.close()
            await server.stop(None)

    v = asyncio.run(go())
    assert v.failed and v.flagged is None and v.error == "malformed response: no detectors"


def test_an_unusable_ca_file_fails_when_the_endpoint_is_made(tmp_path):
    with pytest.raises(TlsError, match="tls_ca"):
        endpoint("second", EndpointConfig(grpc="127.0.0.1:1", tls_ca=tmp_path / "missing.pem"))
