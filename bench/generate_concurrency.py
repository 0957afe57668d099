"""Through the real gRPC server on loopback: 8 concurrent Generate streams vs 1 (aggregate tokens/s,
target >= 3x), and monitoring overhead (same server with vs without detectors, target < 2%).

    .venv/bin/python bench/generate_concurrency.py [--tokens 64] [--model PATH] [--packs DIR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

from monitor.client import Client
from monitor.config import Settings
from monitor.runner import ModelRunner
from monitor.server import Server
from probes.pack import default_pack_dirs

# Chat requests that make SmolLM2 write at length, so streams rarely end before --tokens.
PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain in detail how tides work.",
           "Write a detailed essay on the history of paper.", "Describe the water cycle in detail.",
           "Write a long guide to brewing a good cup of tea.", "Retell the plot of Hamlet scene by scene.",
           "Write a detailed guide to learning to juggle.", "Explain at length why the sky is blue."]


class InProcess:
    def __init__(self, settings: Settings, runner: ModelRunner):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def make():
            return await Server(settings, runner).start()

        self.server = asyncio.run_coroutine_threadsafe(make(), self.loop).result(120)
        self.target = f"127.0.0.1:{self.server.port}"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(5), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)


TOKENS_SEEN: list[int] = []


def run_streams(target: str, n: int, tokens: int) -> float:
    """Aggregate completion tokens/s of n concurrent greedy streams of exactly `tokens` tokens."""
    counts = [0] * n

    def one(i):
        with Client(target, timeout=600) as c:
            chat = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            counts[i] = c.generate_text(chat, max_new_tokens=tokens).completion_tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    TOKENS_SEEN.extend(counts)
    return sum(counts) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--packs", nargs="*", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runner = ModelRunner.load(args.model)
    packs = args.packs if args.packs is not None else default_pack_dirs()
    tmp = Path(tempfile.mkdtemp())
    common = dict(port=0, metrics_port=None, db=f"sqlite:///{tmp}/bench.db", max_new_tokens=4096,
                  generate={"max_batch": 8, "max_wait_ms": 50})
    servers = {name: InProcess(Settings(packs=pk, journal_dir=tmp / f"journal-{name}", serve_unmonitored=not pk,
                                        **common), runner)
               for name, pk in (("monitored", packs), ("bare", []))}
    for srv in servers.values():
        run_streams(srv.target, 1, 8)  # warm-up
    # Interleave the two servers so drift on a shared machine hits both alike; keep the best run.
    best = {(name, n): 0.0 for name in servers for n in (1, 8)}
    metrics = servers["monitored"].server.metrics
    overhead_before, monitored_wall = metrics.value("latentwatch_monitor_overhead_seconds_total") or 0.0, 0.0
    for rep in range(args.repeats):
        order = list(servers.items()) if rep % 2 == 0 else list(reversed(servers.items()))  # no order bias
        for name, srv in order:
            for n in (1, 8):
                started = time.perf_counter()
                best[(name, n)] = max(best[(name, n)], run_streams(srv.target, n, args.tokens))
                if name == "monitored":
                    monitored_wall += time.perf_counter() - started
    overhead_s = (metrics.value("latentwatch_monitor_overhead_seconds_total") or 0.0) - overhead_before
    for srv in servers.values():
        srv.close()
    for name in servers:
        one, eight = best[(name, 1)], best[(name, 8)]
        print(f"{name:9s}: 1 stream {one:7.1f} tok/s, 8 streams {eight:7.1f} tok/s ({eight / one:.2f}x)")
    one_m, eight_m, one_b, eight_b = (best[k] for k in (("monitored", 1), ("monitored", 8), ("bare", 1), ("bare", 8)))
    print(f"detectors: {', '.join(p.name for p in packs)}; model {runner.model_id} on {runner.device}; "
          f"{sum(TOKENS_SEEN) / len(TOKENS_SEEN):.1f} tokens per stream on average (max {args.tokens})")
    print(f"concurrency speed-up (8 vs 1, monitored): {eight_m / one_m:.2f}x   (target >= 3x)")
    print(f"monitoring overhead, 1 stream:  {100 * (1 - one_m / one_b):+.2f}% of tokens/s")
    print(f"monitoring overhead, 8 streams: {100 * (1 - eight_m / eight_b):+.2f}% of tokens/s   (target < 2%)")
    print(f"time in hooks + detector bank (latentwatch_monitor_overhead_seconds_total): {overhead_s:.3f} s "
          f"= {100 * overhead_s / monitored_wall:.2f}% of the monitored server's wall time")


if __name__ == "__main__":
    main()
