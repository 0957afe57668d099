"""Admission control over real gRPC: bounded work per kind and per client, refused at once beyond it."""

from __future__ import annotations

import asyncio
import resource
import time

import grpc
import pytest

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor.config import Settings
from tests.monitor.server_fixtures import RunningServer, make_pack, runner

SERVICE = pb.DESCRIPTOR.services_by_name["Monitor"].full_name


@pytest.fixture
def slow_server(tmp_path):
    """16 in flight, 32 queued, 2 per client 'greedy'; every forward step takes >= 20 ms."""
    r = runner()
    real = r.model.forward
    r.model.forward = lambda *a, **k: time.sleep(0.02) or real(*a, **k)
    settings = Settings(packs=[make_pack(r, tmp_path / "p", threshold=0.0)], port=0, metrics_port=None,
                        db=f"sqlite:///{tmp_path}/db.sqlite", generate={"max_batch": 16, "max_queue": 32},
                        client_concurrency={"greedy": 2}, max_input_bytes=1000)
    srv = RunningServer(settings, r)
    yield srv
    srv.stop()


async def _streams(target: str, n: int, **request) -> list[tuple[str, float, str, dict]]:
    """n concurrent Generate streams: (status, seconds to the first message or the error, details, trailers)."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.MonitorStub(ch)

        async def one():
            t0 = time.monotonic()
            call = stub.Generate(pb.GenerateRequest(**request), timeout=120)
            first = None
            try:
                async for _ in call:
                    first = first or time.monotonic() - t0
                return "OK", first, "", {}
            except grpc.aio.AioRpcError as e:
                return e.code().name, time.monotonic() - t0, e.details(), dict(e.trailing_metadata() or ())

        return await asyncio.gather(*(one() for _ in range(n)))


def test_excess_streams_are_refused_at_once_and_admitted_ones_all_finish(slow_server):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = asyncio.run(_streams(slow_server.target, 200, prompt="count to ten", max_new_tokens=64))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ok = [r for r in results if r[0] == "OK"]
    refused = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
    assert len(ok) + len(refused) == 200, {r[0] for r in results}
    assert len(ok) >= 48  # 16 running + 32 queued, never fewer
    # a refusal never waits for the queue: each came before the fastest admitted stream finished
    fastest_finish = min(r[1] for r in ok) + 64 * 0.02
    assert refused and max(r[1] for r in refused) < fastest_finish
    assert all("server busy" in r[2] and int(r[3]["retry-after-ms"]) > 0 for r in refused)
    refusals = slow_server.server.metrics.value("latentwatch_refused_requests_total",
                                                {"kind": "generate", "reason": "busy"})
    assert refusals == len(refused)
    print(f"\n200 streams: {len(ok)} finished, {len(refused)} refused; slowest refusal "
          f"{1000 * max(r[1] for r in refused):.1f} ms; test process max RSS {rss_before / 1024:.0f} -> "
          f"{rss_after / 1024:.0f} MiB")


def test_a_full_server_refuses_before_reading_the_body(slow_server):
    """Past capacity a call costs no parse: even a body that is not a protobuf is told 'busy'."""
    async def run():
        background = asyncio.ensure_future(_streams(slow_server.target, 48, prompt="x", max_new_tokens=60))
        await asyncio.sleep(0.5)
        async with grpc.aio.insecure_channel(slow_server.target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in ch.unary_stream(f"/{SERVICE}/Generate")(b"\xff\xff\xff\xff", timeout=30):
                    pass
        await background
        return e.value

    err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in err.details()
    # with room again, the same body is read and named for what it is
    with grpc.insecure_channel(slow_server.target) as ch, pytest.raises(grpc.RpcError) as e:
        list(ch.unary_stream(f"/{SERVICE}/Generate")(b"\xff\xff\xff\xff", timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_client_over_its_concurrency_limit_is_refused(slow_server):
    md = pb.RequestMetadata(client_id="greedy")
    results = asyncio.run(_streams(slow_server.target, 4, prompt="x", max_new_tokens=40, metadata=md))
    codes = sorted(r[0] for r in results)
    assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert all("client_concurrency" in r[2] for r in results if r[0] != "OK")


def test_a_deadline_the_queue_cannot_meet_is_refused_early(slow_server):
    async def run():
        background = asyncio.ensure_future(_streams(slow_server.target, 40, prompt="x", max_new_tokens=60))
        await asyncio.sleep(0.5)  # the queue fills up behind 16 running streams
        t0 = time.monotonic()
        async with grpc.aio.insecure_channel(slow_server.target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in pb_grpc.MonitorStub(ch).Generate(pb.GenerateRequest(prompt="x", max_new_tokens=8),
                                                                timeout=0.3):
                    pass
        await background
        return e.value, time.monotonic() - t0

    err, _ = asyncio.run(run())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "cannot be met" in err.details()


def test_oversized_input_is_refused_on_bytes_before_tokenizing(slow_server, monkeypatch):
    runner_ = slow_server.server.service.runner
    calls = []
    real = runner_.encode
    monkeypatch.setattr(runner_, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    stub = pb_grpc.MonitorStub(grpc.insecure_channel(slow_server.target))
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(text="é" * 600)]), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_input_bytes=1000" in e.value.details()
    assert calls == []
