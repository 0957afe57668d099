"""Fuzzing every RPC the sidecar serves (Monitor, health, reflection) over real loopback gRPC.

Two kinds of input: raw bytes (often not a valid protobuf at all) and well-formed messages with
hostile contents (huge and odd strings, invalid enum numbers, extreme numbers and timestamps,
NaN/inf, crafted page tokens), built from the proto descriptors so new fields and RPCs are fuzzed
too. Properties: never INTERNAL/UNKNOWN, no exception text in the status, no long echo of an
input, a bounded message, and the server keeps serving. bench/fuzz.py reuses these helpers for
a long run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import threading
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentwatch.v1 import monitor_pb2 as pb
from monitor.grpc_services import add_health_and_reflection

# ------------------------------------------------------------------------------------ RPCs


@dataclass(frozen=True)
class Rpc:
    path: str
    request: type  # request message class
    client_streaming: bool
    server_streaming: bool
    max_responses: int | None = None  # stop reading (cancel) after this many: endless streams

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def _rpcs(service, prefix: str | None = None) -> list[Rpc]:
    out = []
    for m in service.methods:
        full = f"/{prefix or service.full_name}/{m.name}"
        out.append(Rpc(full, message_factory.GetMessageClass(m.input_type), m.client_streaming, m.server_streaming,
                       1 if full.endswith("Health/Watch") else None))
    return out


MONITOR_RPCS = _rpcs(pb.DESCRIPTOR.services_by_name["Monitor"])
HEALTH_RPCS = _rpcs(health_pb2.DESCRIPTOR.services_by_name["Health"])
_REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
REFLECTION_RPCS = _rpcs(_REFLECTION) + _rpcs(_REFLECTION, "grpc.reflection.v1.ServerReflection")  # same wire format
RPCS = MONITOR_RPCS + HEALTH_RPCS + REFLECTION_RPCS
assert {r.path.rsplit("/", 1)[1] for r in MONITOR_RPCS} >= {
    "Generate", "Score", "ListDetectors", "GetAlerts", "ReloadDetectors", "GetServerInfo"}


# ------------------------------------------------------------------------------ strategies


def _token(payload) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


_T = "2024-01-01T00:00:00+00:00"
PAGE_TOKENS = [
    _token({"v": 1, "t": _T, "i": 1}), _token({"v": 1, "t": _T, "i": 10**30}), _token({"v": 1, "t": _T, "i": -(2**70)}),
    _token({"v": 1, "t": "9999-12-31T23:59:59+14:00", "i": 1}), _token({"v": 1, "t": "0001-01-01T00:00:00-14:00",
                                                                      "i": 1}),
    _token({"v": 1, "t": _T, "i": 1.5}), _token({"v": 1, "t": 5, "i": 1}), _token({"v": True, "t": _T, "i": 1}),
    _token({"v": 1, "t": _T + "x" * 200, "i": 1}), _token([]), _token(None), _token("x"), _token({"v": 2}),
    _token({"v": 1, "t": _T, "i": {"$gt": 0}}), "not-a-token", "====", "\u00ff\u00fe", "a" * 5000,
]
_rng = random.Random(0)
HUGE = [  # 100 KB-ish strings; the random one makes an echo check meaningful
    "a" * 100_000, "é" * 60_000, "<|im_start|>" * 9_000,
    "".join(_rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_.") for _ in range(100_000)),
]
STRINGS = [
    "", " ", "always", "never", "fuzz-admin", "user", "system", "assistant", "tool", "USER", "hello world",
    "blocks.1.resid_post", "blocks.0.resid_pre", "blocks.2.attn_out", "blocks.2.mlp_out", "blocks.3.resid_post",
    "blocks.-1.resid_post", "blocks.99999999999999999999999.resid_post", "blocks.1.nope", "embed", "blocks..",
    "latentwatch.v1.Monitor", "latentwatch.v1.ScoreRequest", "latentwatch/v1/monitor.proto", "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection", "google/protobuf/timestamp.proto", "google.protobuf.Timestamp",
    "\x00", "\x00" * 10, "\u202e", "\ufeff", "'; DROP TABLE alerts; --", "%s%s%n%x", "{0}{}",
    "../../../etc/passwd", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "{% for x in y %}", "{{ 7*7 }}", *PAGE_TOKENS,
]
LONG = ["x" * 101, "detector-" + "y" * 150, "\U0001f642" * 120, "\n" * 300, "blocks." + "9" * 2000 + ".resid_post",
        "z" * 5000, *HUGE]  # anything echoed from these is over the limit
_EDGES = {
    FD.TYPE_INT32: [0, 1, 2, 3, 4, 5, 255, -1, 2**31 - 1, -(2**31)],
    FD.TYPE_SINT32: [0, -1, 2**31 - 1, -(2**31)],
    FD.TYPE_UINT32: [0, 1, 2, 3, 4, 5, 1000, 2**31, 2**32 - 1],
    # int64 edges include Timestamp.seconds just outside 0001-01-01 .. 9999-12-31
    FD.TYPE_INT64: [0, 1, -1, 1_700_000_000, -62135596800, -62135596801, 253402300799, 253402300800, 2**63 - 1,
                    -(2**63)],
    FD.TYPE_UINT64: [0, 1, 2**32, 2**63, 2**64 - 1],
}
_RANGES = {FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1), FD.TYPE_SFIXED32: (-(2**31),
           2**31 - 1), FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
           FD.TYPE_INT64: (-(2**63), 2**63 - 1), FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
           FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1), FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1)}
_FLOAT_EDGES = [0.0, -0.0, 0.5, 1.0, 1.0000001, -1.0, 1e-45, 3.4e38, -3.4e38, float("nan"), float("inf"),
                float("-inf")]

strings = st.one_of(st.sampled_from(STRINGS), st.sampled_from(LONG), st.text(max_size=30))


def _scalar(f) -> st.SearchStrategy:
    t = f.type
    if t == FD.TYPE_STRING:
        return strings
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_ENUM:  # proto3 enums are open: any int32 goes on the wire
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]),
                         st.sampled_from([-1, len(f.enum_type.values), 2**31 - 1]), st.integers(-(2**31), 2**31 - 1))
    if t == FD.TYPE_FLOAT:
        return st.one_of(st.sampled_from(_FLOAT_EDGES), st.floats(width=32))
    if t == FD.TYPE_DOUBLE:
        return st.one_of(st.sampled_from(_FLOAT_EDGES + [1e308]), st.floats())
    lo, hi = _RANGES[t]
    return st.one_of(st.sampled_from(_EDGES.get(t, [lo, hi, 0])), st.integers(lo, hi))


def _field(f, depth: int) -> st.SearchStrategy:
    if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
        k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(k), _field(v, depth + 1), max_size=3)
    one = messages(f.message_type, depth + 1) if f.type == FD.TYPE_MESSAGE else _scalar(f)
    if not f.is_repeated:
        return one
    lists = st.lists(one, max_size=3)
    if f.type == FD.TYPE_FLOAT:  # inline steering vectors: also the model's hidden size
        return st.one_of(lists, st.lists(one, min_size=32, max_size=32))
    return lists


def _build(cls, values: dict):
    msg = cls()
    for name, v in values.items():
        f = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
            for k, x in v.items():
                if f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                    target[k].CopyFrom(x)
                else:
                    target[k] = x
        elif f.is_repeated:
            if f.type == FD.TYPE_MESSAGE:
                for x in v:
                    target.add().CopyFrom(x)
            else:
                target.extend(v)
        elif f.type == FD.TYPE_MESSAGE:
            target.CopyFrom(v)
        else:
            setattr(msg, name, v)
    return msg


def messages(desc, depth: int = 0) -> st.SearchStrategy:
    """Well-formed messages of type `desc` with any subset of fields set to hostile values."""
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    fields = {f.name: _field(f, depth) for f in desc.fields}
    return st.fixed_dictionaries({}, optional=fields).map(lambda d: _build(cls, d))


def _mutate(data: bytes, how: int, pos: int, junk: bytes) -> bytes:
    if not data:
        return junk
    pos %= len(data)
    return [data[:pos], data[:pos] + junk + data[pos:], data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:],
            data + junk][how]


def raw_payloads(rpc: Rpc) -> st.SearchStrategy:
    """Raw bodies: random bytes, or a well-formed message truncated, spliced or bit-flipped."""
    valid = wellformed(rpc).map(lambda m: m.SerializeToString())
    mutated = st.builds(_mutate, valid, st.integers(0, 3), st.integers(0, 2**16), st.binary(min_size=1, max_size=8))
    return st.one_of(st.binary(max_size=256), mutated)


_USER = [pb.ChatMessage(role="user", content="hi")]
ADMIN = pb.RequestMetadata(client_id="fuzz-admin")  # may override policy and steer (see start_fuzz_server)
BASES = {  # valid requests that hostile fields are merged into, to get past the first checks
    "/latentwatch.v1.Monitor/Generate": [
        pb.GenerateRequest(prompt="hi", max_new_tokens=2), pb.GenerateRequest(messages=_USER),
        pb.GenerateRequest(prompt="hi", max_new_tokens=2, detectors=["always"], metadata=ADMIN,
                           policy_overrides=[pb.DetectorPolicy(detector_id="always", action=pb.ACTION_STEER)]),
        pb.GenerateRequest(prompt="hi", max_new_tokens=2, metadata=ADMIN, steering=[pb.SteeringRequest(
            vector=[1.0] * 32, hook_point="blocks.1.resid_post", kind=pb.STEERING_KIND_ADD, coefficient=1.0)]),
        pb.GenerateRequest(messages=_USER, max_new_tokens=2, metadata=ADMIN, steering=[pb.SteeringRequest(
            vector=[0.5] * 32, hook_point="blocks.0.resid_pre", kind=pb.STEERING_KIND_ABLATE, coefficient=0.5,
            trigger_detector_id="always")]),
    ],
    "/latentwatch.v1.Monitor/Score": [pb.ScoreRequest(inputs=[pb.ScoreInput(text="hello")]),
                                      pb.ScoreRequest(inputs=[pb.ScoreInput(messages=_USER)], detectors=["never"])],
    "/latentwatch.v1.Monitor/GetAlerts": [pb.GetAlertsRequest(page_size=2), pb.GetAlertsRequest(detector_id="always")],
    "/grpc.health.v1.Health/Check": [health_pb2.HealthCheckRequest(service="")],
    "/grpc.health.v1.Health/Watch": [health_pb2.HealthCheckRequest(service="")],
    **{r.path: [reflection_pb2.ServerReflectionRequest(list_services="")] for r in REFLECTION_RPCS},
}


def _merge(base, hostile):
    msg = type(base)()
    msg.CopyFrom(base)
    msg.MergeFrom(hostile)
    return msg


def wellformed(rpc: Rpc) -> st.SearchStrategy:
    """Hostile messages, alone or merged into a valid request of the RPC."""
    hostile = messages(rpc.request.DESCRIPTOR)
    bases = [b for b in BASES.get(rpc.path, []) if isinstance(b, rpc.request)]
    if not bases:
        return hostile
    return st.one_of(hostile, st.builds(_merge, st.sampled_from(bases), hostile))


def payloads(rpc: Rpc, kind: str) -> st.SearchStrategy:
    """A list of request bodies (one, or 1-3 for a client stream) and the input strings they carry."""
    if kind == "raw":
        one = raw_payloads(rpc).map(lambda b: (b, [b]))
    else:
        one = wellformed(rpc).map(lambda m: (m.SerializeToString(), list(_strings(m))))
    many = st.lists(one, min_size=1, max_size=3) if rpc.client_streaming else st.lists(one, min_size=1, max_size=1)
    return many.map(lambda xs: ([b for b, _ in xs], [s for _, ss in xs for s in ss]))


def _strings(msg):
    for f, v in msg.ListFields():
        vs = v.values() if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry else (
            v if f.is_repeated else [v])
        if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
            yield from (k for k in v.keys() if isinstance(k, str))
        for x in vs:
            if isinstance(x, str):
                yield x
            elif hasattr(x, "ListFields"):
                yield from _strings(x)


# -------------------------------------------------------------------------------- calling


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    trailers: str  # trailing metadata, as text


def call(channel: grpc.Channel, rpc: Rpc, bodies: list[bytes], timeout: float = 5.0) -> Outcome:
    """Send raw bodies (identity serializers) and read the whole answer."""
    try:
        if rpc.client_streaming:
            responses = channel.stream_stream(rpc.path)(iter(bodies), timeout=timeout)
        elif rpc.server_streaming:
            responses = channel.unary_stream(rpc.path)(bodies[0], timeout=timeout)
        else:
            channel.unary_unary(rpc.path)(bodies[0], timeout=timeout)
            return Outcome(grpc.StatusCode.OK, "", "")
        for n, _ in enumerate(responses, 1):
            if rpc.max_responses and n >= rpc.max_responses:
                responses.cancel()
                break
        return Outcome(grpc.StatusCode.OK, "", "")
    except grpc.RpcError as e:
        trailers = " ".join(f"{k}={v!r}" for k, v in (e.trailing_metadata() or ()))
        return Outcome(e.code(), e.details() or "", trailers)


LEAK = re.compile(
    r"Traceback|File \"|\.py\b|site-packages|sqlalchemy|sqlite3|psycopg|SELECT |INSERT |\bline \d+, in\b"
    r"|\b[A-Z]\w*(?:Error|Exception|Warning)\b|object at 0x|Error parsing message|codec can't"
)
MAX_ECHO, MAX_DETAILS = 100, 2000


def echo(details: str, inputs: list) -> str | None:
    """The first run of more than MAX_ECHO characters of `details` that also occurs in an input."""
    for s in inputs:
        text = details.encode() if isinstance(s, bytes) else details
        if len(text) <= MAX_ECHO or len(s) <= MAX_ECHO:
            continue
        block = MAX_ECHO // 2  # any common run of > MAX_ECHO contains a whole aligned block
        for b in range(0, len(text) - block + 1, block):
            if text[b:b + block] in s:
                for p in range(max(0, b - MAX_ECHO), min(b + block, len(text) - MAX_ECHO)):
                    if text[p:p + MAX_ECHO + 1] in s:
                        return repr(text[p:p + 60]) + "..."
    return None


def violations(out: Outcome, inputs: list) -> list[str]:
    """What is wrong with an answer; empty when every property holds."""
    bad = []
    if out.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        bad.append(f"status {out.code.name}")
    text = f"{out.details} {out.trailers}"
    m = LEAK.search(text)
    if m:
        bad.append(f"exception text {m.group(0)!r} in status")
    if len(out.details) >= MAX_DETAILS:
        bad.append(f"details are {len(out.details)} chars")
    if "metadata size exceeds" in out.details:  # the client dropped a status message of over 16 KiB
        bad.append("status message over the client's metadata limit")
    e = echo(out.details, inputs)
    if e:
        bad.append(f"details echo > {MAX_ECHO} chars of an input: {e}")
    return bad


def describe(rpc: Rpc, out: Outcome, bad: list[str]) -> str:
    return f"{rpc.path}: {'; '.join(bad)} -- {out.code.name}: {out.details[:300]!r}"


# ------------------------------------------------------------------------------ servers


class LoopThread:
    """An asyncio loop on a daemon thread, for blocking tests of grpc.aio servers."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_fuzz_server(tmp):
    """The real sidecar with the tiny llama model and two real probe packs, cheap to generate with."""
    from monitor.config import Settings
    from tests.monitor.server_fixtures import RunningServer, make_pack, runner

    r = runner()
    packs = [make_pack(r, tmp / "always", id="always", threshold=0.0),
             make_pack(r, tmp / "never", id="never", threshold=1.0, seed=1)]
    extra = {}
    if "permissions" in Settings.model_fields:  # one client may do everything, so the deep paths get fuzzed too
        extra["permissions"] = {"fuzz-admin": {"policy_overrides": True, "weaken_monitoring": True, "steering": True,
                                               "steer_detector_directions": True}}
    settings = Settings(packs=packs, port=0, metrics_port=None, db=f"sqlite:///{tmp}/fuzz.sqlite",
                        score={"max_batch": 16, "max_wait_ms": 0}, generate={"max_batch": 8, "max_wait_ms": 0},
                        max_new_tokens=4, default_max_new_tokens=2, max_input_tokens=256, **extra)
    return RunningServer(settings, r)


def assert_still_serving(channel: grpc.Channel) -> None:
    from latentwatch.v1 import monitor_pb2_grpc

    stub = monitor_pb2_grpc.MonitorStub(channel)
    dets = stub.ListDetectors(pb.ListDetectorsRequest(), timeout=10)
    assert {d.id for d in dets.detectors} == {"always", "never"}
    res = stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="hello world")]), timeout=10)
    assert len(res.results) == 1 and {d.detector_id for d in res.results[0].detectors} == {"always", "never"}


# ----------------------------------------------------- health + reflection on a bare server


@pytest.fixture(scope="module")
def bare():
    lt = LoopThread()

    async def start():
        server = grpc.aio.server()
        hs = add_health_and_reflection(server, ["latentwatch.v1.Monitor"])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await hs.set("latentwatch.v1.Monitor", health_pb2.HealthCheckResponse.NOT_SERVING)
        return server, hs, port

    server, hs, port = lt.run(start())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch, hs, lt
    lt.run(server.stop(0))
    lt.close()


def _reflect(channel, service: str, *requests):
    rpc = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    return list(rpc(iter(requests), timeout=10))


def test_health_and_reflection_answer_valid_requests(bare):
    from grpc_health.v1 import health_pb2_grpc

    ch, hs, lt = bare
    stub = health_pb2_grpc.HealthStub(ch)
    S = health_pb2.HealthCheckResponse
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == S.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(service="latentwatch.v1.Monitor"), timeout=5).status == \
        S.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    listed = stub.List(health_pb2.HealthListRequest(), timeout=5).statuses
    assert {k: v.status for k, v in listed.items()} == {"": S.SERVING, "latentwatch.v1.Monitor": S.NOT_SERVING}
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)
    assert next(watch).status == S.SERVING
    watch.cancel()

    for service in ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"):
        listing, found, missing = _reflect(
            ch, service, reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="latentwatch.v1.Monitor"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Thing"))
        names = {s.name for s in listing.list_services_response.service}
        assert names == {"latentwatch.v1.Monitor", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
        assert found.file_descriptor_response.file_descriptor_proto
        assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x01\xff", b"\x08"]  # bad tag, truncated, bad UTF-8, no value


@pytest.mark.parametrize("rpc", HEALTH_RPCS + REFLECTION_RPCS, ids=lambda r: r.path)
@pytest.mark.parametrize("body", GARBAGE, ids=["tag", "truncated", "utf8", "varint"])
def test_garbage_to_health_and_reflection_is_invalid_argument(bare, rpc, body):
    if rpc.name == "List" and body == b"\x0a\x01\xff":  # HealthListRequest has no fields: unknown bytes parse
        body = b"\xff\xff"
    out = call(bare[0], rpc, [body])
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT, out
    assert 0 < len(out.details) < 100 and not violations(out, [body]), out


def test_reflection_checks_every_message_of_the_stream(bare):
    ok = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    rpc = REFLECTION_RPCS[0]
    got = []
    stream = bare[0].stream_stream(rpc.path)(iter([ok, b"\xff\xff"]), timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        for r in stream:
            got.append(r)
    assert len(got) == 1 and e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_health_and_reflection_fuzz(bare, data):
    rpc = data.draw(st.sampled_from(HEALTH_RPCS + REFLECTION_RPCS), label="rpc")
    bodies, inputs = data.draw(payloads(rpc, data.draw(st.sampled_from(["raw", "msg"]), label="kind")),
                               label="bodies")
    out = call(bare[0], rpc, bodies)
    bad = violations(out, inputs)
    assert not bad, describe(rpc, out, bad)


# ------------------------------------------------------------------ the whole sidecar, fuzzed


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    srv = start_fuzz_server(tmp_path_factory.mktemp("fuzz"))
    with grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as ch:
        yield ch
    srv.stop()


FUZZ = settings(max_examples=15, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _fuzz(channel, rpc: Rpc, kind: str, data) -> None:
    bodies, inputs = data.draw(payloads(rpc, kind), label="bodies")
    out = call(channel, rpc, bodies)
    bad = violations(out, inputs)
    assert not bad, describe(rpc, out, bad)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.path.lstrip("/"))
@FUZZ
@given(data=st.data())
def test_raw_bytes(fuzz_server, rpc, data):
    _fuzz(fuzz_server, rpc, "raw", data)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.path.lstrip("/"))
@FUZZ
@given(data=st.data())
def test_wellformed_but_wrong(fuzz_server, rpc, data):
    _fuzz(fuzz_server, rpc, "msg", data)


def test_server_still_serves_after_fuzzing(fuzz_server):
    assert_still_serving(fuzz_server)
