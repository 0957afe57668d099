"""Long fuzz run against an in-process sidecar (tiny llama + two real probe packs, SQLite in a temp dir).

    .venv/bin/python bench/fuzz.py --cases 10000 --seed 0

Every RPC of latentwatch.v1.Monitor, grpc.health.v1.Health and server reflection gets raw bytes
(mostly) and well-formed-but-hostile messages, with the strategies and properties of
tests/monitor/test_fuzz.py. Prints status codes per RPC and the first violations; exits 1 if any
call got INTERNAL/UNKNOWN, leaked exception text, echoed a long input or sent a huge message, or
if the server stops answering afterwards.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.monitor.test_fuzz import RPCS, assert_still_serving, call, payloads, start_fuzz_server, violations  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="number of calls to send (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    ap.add_argument("--raw-share", type=float, default=0.7, help="share of raw-bytes cases (default 0.7)")
    ap.add_argument("--show", type=int, default=20, help="violations to print (default 20)")
    ap.add_argument("--verbose", action="store_true", help="keep the server's error logs")
    args = ap.parse_args(argv)
    if not args.verbose:  # the server logs a traceback per INTERNAL; the table and examples say enough
        logging.disable(logging.CRITICAL)

    codes: dict[str, Counter] = defaultdict(Counter)
    bad: list[str] = []
    n_bad = Counter()
    kinds_seen: dict[tuple, list] = {}  # distinct failure -> [count, first example]
    raw_weight = max(1, round(args.raw_share * 10))
    kinds = ["raw"] * raw_weight + ["msg"] * max(1, 10 - raw_weight)

    with tempfile.TemporaryDirectory(prefix="latentwatch-fuzz-") as tmp:
        srv = start_fuzz_server(Path(tmp))
        opts = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
        try:
            with grpc.insecure_channel(srv.target, options=opts) as channel:
                t0 = time.monotonic()

                @seed(args.seed)
                @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(data=st.data())
                def one(data):
                    rpc = data.draw(st.sampled_from(RPCS))
                    kind = data.draw(st.sampled_from(kinds))
                    bodies, inputs = data.draw(payloads(rpc, kind))
                    out = call(channel, rpc, bodies)
                    name = rpc.path.lstrip("/")
                    codes[name][out.code.name] += 1
                    problems = violations(out, inputs)
                    if problems:
                        n_bad[name] += 1
                        what = tuple(p.split(":")[0] for p in problems)
                        key = (name, what, out.code.name, re.sub(r"\d+", "N", out.details[:60]))
                        if key not in kinds_seen:
                            kinds_seen[key] = [0, f"[{kind}] {name}: {'; '.join(problems)} -- {out.code.name}: "
                                                  f"{out.details[:200]!r} <- {_short(bodies)}"]
                        kinds_seen[key][0] += 1

                one()
                elapsed = time.monotonic() - t0
                try:
                    assert_still_serving(channel)
                    alive = True
                except (AssertionError, grpc.RpcError) as e:
                    alive = False
                    bad.append(f"server no longer serves ListDetectors + Score: {e!r}")
        finally:
            srv.stop()
    ranked = sorted(kinds_seen.values(), key=lambda x: -x[0])
    bad = [f"{n:5d}x {example}" for n, example in ranked[: args.show]] + bad

    total = sum(sum(c.values()) for c in codes.values())
    _table(codes, n_bad)
    print(f"\n{total} cases in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.0f}/s); "
          f"{sum(n_bad.values())} violating ({len(kinds_seen)} distinct); "
          f"server {'still serving' if alive else 'NOT SERVING'}")
    for line in bad:
        print("-", line)
    return 1 if n_bad or not alive else 0


def _short(bodies: list[bytes]) -> str:
    text = repr(bodies)
    return text if len(text) <= 160 else f"{text[:150]}... ({sum(map(len, bodies))} bytes)"


def _table(codes: dict[str, Counter], n_bad: Counter) -> None:
    cols = sorted({c for counter in codes.values() for c in counter})
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="status codes per RPC")
        t.add_column("rpc")
        for c in cols:
            t.add_column(c, justify="right", style="red" if c in ("INTERNAL", "UNKNOWN") else None)
        t.add_column("violations", justify="right", style="red")
        for rpc in sorted(codes):
            t.add_row(rpc, *(str(codes[rpc].get(c, "")) for c in cols), str(n_bad.get(rpc, "")))
        Console(width=200).print(t)
    except ImportError:
        w = max(len(r) for r in codes)
        print("rpc".ljust(w), *(c.rjust(len(c)) for c in cols), "violations")
        for rpc in sorted(codes):
            print(rpc.ljust(w), *(str(codes[rpc].get(c, "")).rjust(len(c)) for c in cols), n_bad.get(rpc, ""))


if __name__ == "__main__":
    sys.exit(main())
