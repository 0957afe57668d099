"""Overload: many concurrent Generate streams against a `latentwatch serve` process configured for
fewer. Prints how many were admitted and finished, how fast the excess was refused
(RESOURCE_EXHAUSTED, measured by a client in this process, the server in its own), and the
server's RSS before and after. Exits 1 if an admitted stream failed or a refusal took >= 100 ms.

    .venv/bin/python bench/overload.py [--streams 200 --in-flight 16 --queue 32] [--model PATH --pack DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
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
from soak import rss_mb  # noqa: E402


async def storm(target: str, n: int, tokens: int) -> list[tuple[str, float]]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.MonitorStub(ch)
        await stub.ListDetectors(pb.ListDetectorsRequest())  # connected before the clock starts

        async def one(i: int):
            t0 = time.monotonic()
            req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=f"Write a story number {i}.")],
                                     max_new_tokens=tokens)
            try:
                async for _ in stub.Generate(req, timeout=600):
                    pass
                return "OK", time.monotonic() - t0
            except grpc.aio.AioRpcError as e:
                return e.code().name, time.monotonic() - t0

        return await asyncio.gather(*(one(i) for i in range(n)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--queue", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--model")
    ap.add_argument("--pack", action="append")
    args = ap.parse_args()
    extra = (["--model", args.model] if args.model else []) + [a for p in args.pack or [] for a in ("--pack", p)]
    srv = ServeProcess("--db", "sqlite:////tmp/latentwatch-overload.db", *extra,
                       env={"LATENTWATCH_GENERATE__MAX_BATCH": str(args.in_flight),
                            "LATENTWATCH_GENERATE__MAX_QUEUE": str(args.queue)})
    try:
        before = rss_mb(srv.proc.pid)
        results = asyncio.run(storm(srv.target, args.streams, args.tokens))
        after = rss_mb(srv.proc.pid)
    finally:
        srv.signal(signal.SIGTERM)
        srv.wait()
        srv.kill()
    ok = [t for c, t in results if c == "OK"]
    refused = [t for c, t in results if c == "RESOURCE_EXHAUSTED"]
    other = [c for c, _ in results if c not in ("OK", "RESOURCE_EXHAUSTED")]
    print(f"{args.streams} streams against {args.in_flight} in flight + {args.queue} queued:")
    print(f"  finished  {len(ok)} (slowest {max(ok, default=0):.1f} s)")
    if refused:
        print(f"  refused   {len(refused)} RESOURCE_EXHAUSTED in p50 {1000 * np.median(refused):.1f} ms, "
              f"p99 {1000 * np.percentile(refused, 99):.1f} ms, max {1000 * max(refused):.1f} ms")
    print(f"  other     {len(other)} {sorted(set(other))}")
    print(f"  server RSS {before:.1f} MB before, {after:.1f} MB after")
    good = not other and len(ok) >= args.in_flight + args.queue and (not refused or max(refused) < 0.1)
    print("  verdict   " + ("PASS" if good else "FAIL"))
    return 0 if good else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
