"""Overload: many concurrent Generate streams against a `latentwatch serve` process configured for
fewer. Two bursts, each measured by a client in this process (the server runs in its own):

- **into a full server**: `in-flight + queue` streams are admitted first and decoding, then the
  rest arrive at once (the usual overload: traffic beyond what a busy replica holds);
- **from idle**: every stream at once against a server with nothing running (the admitted
  requests' setup competes with the refusals).

Baseline, same run and machine: a bare `grpc.aio` server that refuses every Generate with
RESOURCE_EXHAUSTED and does nothing else, hit by the same burst; refusal times are printed as a
ratio to it. Beside each client-side figure, the server's own time for the same refusals (its
access log's `latency_ms`: interceptor entry to abort) says how much of the wait is the refusal
path and how much is the call waiting to reach it (event loop, CPU, client). Each burst runs
`--bursts` times (one burst's slowest refusal swings by tens of ms on a small machine). Exits 1
if an admitted stream failed or a refusal took >= 100 ms.

    .venv/bin/python bench/overload.py [--streams 200 --in-flight 16 --queue 32 --bursts 3]
                                       [--model PATH --pack DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentwatch.v1 import monitor_pb2 as pb  # noqa: E402
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc  # noqa: E402
from tests.monitor.server_fixtures import ServeProcess  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import memory_mb  # noqa: E402


async def storm(target: str, n: int, tokens: int, admitted_first: int = 0, running: int = 0):
    """(code, seconds) per stream. With `admitted_first`, that many streams start first and the
    rest only once `running` of them are decoding (have received a token), half a second later."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.MonitorStub(ch)
        await stub.ListDetectors(pb.ListDetectorsRequest())  # connected before the clock starts
        decoding = asyncio.Semaphore(0)

        async def one(i: int):
            t0, first = time.monotonic(), True
            req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=f"Write a story number {i}.")],
                                     max_new_tokens=tokens)
            try:
                async for _ in stub.Generate(req, timeout=600):
                    if first:
                        first = False
                        decoding.release()
                return "OK", time.monotonic() - t0
            except grpc.aio.AioRpcError as e:
                return e.code().name, time.monotonic() - t0

        early = [asyncio.ensure_future(one(i)) for i in range(admitted_first)]
        for _ in range(running):
            await asyncio.wait_for(decoding.acquire(), 300)
        if early:
            await asyncio.sleep(0.5)
        late = await asyncio.gather(*(one(i) for i in range(admitted_first, n)))
        return list(await asyncio.gather(*early)), list(late)


class _RefuseAll(pb_grpc.MonitorServicer):
    async def ListDetectors(self, request, context):
        return pb.ListDetectorsResponse()

    async def Generate(self, request, context):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        yield  # a stream handler


def bare_server() -> None:
    async def run():
        server = grpc.aio.server()
        pb_grpc.add_MonitorServicer_to_server(_RefuseAll(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def refusals(results) -> list[float]:
    return [t for c, t in results if c == "RESOURCE_EXHAUSTED"]


def describe(times: list[float]) -> str:
    if not times:
        return "none"
    return (f"{len(times)} in p50 {1000 * np.median(times):.1f} ms, p99 {1000 * np.percentile(times, 99):.1f} ms, "
            f"max {1000 * max(times):.1f} ms")


def slowest(bursts: list[list]) -> str:
    return ", ".join(f"{1000 * max(refusals(b), default=0):.0f}" for b in bursts) + " ms"


def server_refusals_ms(log: str) -> list[float]:
    """The access log's own latency for every RESOURCE_EXHAUSTED answer in `log` (JSON lines)."""
    lines = (json.loads(line) for line in log.splitlines() if line.startswith("{"))
    return [d["latency_ms"] for d in lines if d.get("outcome") == "resource_exhausted"]


def describe_ms(ms: list[float]) -> str:
    return f"p50 {np.median(ms):.2f} ms, max {max(ms):.2f} ms" if ms else "none logged"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--queue", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--bursts", type=int, default=3, help="times each burst runs")
    ap.add_argument("--model")
    ap.add_argument("--pack", action="append")
    ap.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)  # the baseline's process
    args = ap.parse_args()
    if args.bare_server:
        bare_server()
        return 0
    held = args.in_flight + args.queue

    bare = subprocess.Popen([sys.executable, __file__, "--bare-server"], stdout=subprocess.PIPE, text=True)
    try:
        target = f"127.0.0.1:{bare.stdout.readline().strip()}"
        base = [asyncio.run(storm(target, args.streams, args.tokens))[1] for _ in range(args.bursts)]
    finally:
        bare.kill()
        bare.wait()

    extra = (["--model", args.model] if args.model else []) + [a for p in args.pack or [] for a in ("--pack", p)]
    srv = ServeProcess("--db", "sqlite:////tmp/latentwatch-overload.db", "--log-format", "json", *extra,
                       env={"LATENTWATCH_GENERATE__MAX_BATCH": str(args.in_flight),
                            "LATENTWATCH_GENERATE__MAX_QUEUE": str(args.queue)})
    admitted, full, idle, full_ms, idle_ms = [], [], [], [], []
    try:
        before = memory_mb(srv.proc.pid)["VmRSS"]
        for _ in range(args.bursts):
            mark = len(srv.output())
            first, late = asyncio.run(storm(srv.target, args.streams, args.tokens, held, args.in_flight))
            admitted += first
            full.append(late)
            full_ms += server_refusals_ms(srv.output()[mark:])
            mark = len(srv.output())
            idle.append(asyncio.run(storm(srv.target, args.streams, args.tokens))[1])
            idle_ms += server_refusals_ms(srv.output()[mark:])
        after = memory_mb(srv.proc.pid)["VmRSS"]
    finally:
        srv.signal(signal.SIGTERM)
        srv.wait()
        srv.kill()
    every = admitted + [r for b in full + idle for r in b]
    finished = [t for c, t in every if c == "OK"]
    other = sorted({c for c, _ in every if c not in ("OK", "RESOURCE_EXHAUSTED")})
    base_t, full_t, idle_t = (refusals([r for b in x for r in b]) for x in (base, full, idle))

    def ratio(times: list[float]) -> str:
        return f"p50 {np.median(times) / np.median(base_t):.2f}x, max {max(times) / max(base_t):.2f}x the baseline" \
            if times and base_t else ""

    print(f"{args.streams} streams against {args.in_flight} in flight + {args.queue} queued, {args.bursts} bursts "
          f"each ({os.cpu_count()} CPUs, client and server on this machine):")
    print(f"  baseline          bare grpc.aio server refusing all: {describe(base_t)}"
          f"\n                    slowest per burst {slowest(base)}")
    print(f"  into full server  {held} admitted first, then {args.streams - held} at once: refused {describe(full_t)}"
          f"\n                    slowest per burst {slowest(full)}; {ratio(full_t)}"
          f"\n                    server side (interceptor to abort): {describe_ms(full_ms)}")
    print(f"  from idle         {args.streams} at once: refused {describe(idle_t)}"
          f"\n                    slowest per burst {slowest(idle)}; {ratio(idle_t)}"
          f"\n                    server side (interceptor to abort): {describe_ms(idle_ms)}")
    want = 2 * held * args.bursts
    print(f"  finished          {len(finished)} of {want} admitted (slowest {max(finished, default=0):.1f} s)")
    print(f"  other codes       {other or 'none'}")
    print(f"  server RSS        {before:.1f} MB before, {after:.1f} MB after")
    good = not other and len(finished) >= want and bool(full_t) and bool(idle_t) and max(full_t + idle_t) < 0.1
    print("  verdict           " + ("PASS" if good else "FAIL") + " (every admitted stream finished; every refusal "
          "under 100 ms)")
    return 0 if good else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
