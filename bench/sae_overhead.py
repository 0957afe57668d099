"""Serving cost of an SAE at its hook point: decode tokens/s of one server with the linear probe alone vs
the same server with SAE-feature detectors reading an SAE there too (target on CPU: <= 10% slower).

Both servers run in this process on the same model, interleaved so drift on a shared machine hits both;
the best of --repeats runs counts. Through real gRPC on loopback, greedy streams of exactly --tokens.

    .venv/bin/python bench/sae_overhead.py [--tokens 64] [--repeats 3] [--streams 1 8]
        [--base harmful_intent] [--sae-packs harmful_intent_sae_probe harmful_intent_sae_latent]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from generate_concurrency import InProcess, run_streams

from monitor.config import Settings
from monitor.runner import ModelRunner
from probes.pack import ProbePack, shipped_packs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--model", default=None)
    ap.add_argument("--base", nargs="+", default=["harmful_intent"], help="shipped detector ids both servers load")
    ap.add_argument("--sae-packs", nargs="+", default=["harmful_intent_sae_probe", "harmful_intent_sae_latent"],
                    help="shipped SAE-feature detector ids only the second server loads")
    args = ap.parse_args()
    shipped = shipped_packs()
    unknown = [d for d in args.base + args.sae_packs if d not in shipped]
    if unknown:
        ap.error(f"not shipped: {', '.join(unknown)}; shipped: {', '.join(sorted(shipped))}")
    runner = ModelRunner.load(args.model)
    base = [shipped[d][0] for d in args.base]
    features = [ProbePack.load(shipped[d][0], runner.fingerprint) for d in args.sae_packs]
    saes = {p.probe.sae.id: p.probe.sae for p in features}
    tmp = Path(tempfile.mkdtemp())
    common = dict(port=0, metrics_port=None, db=f"sqlite:///{tmp}/bench.db", max_new_tokens=4096,
                  generate={"max_batch": max(args.streams), "max_wait_ms": 50})
    with_sae = base + [shipped[d][0] for d in args.sae_packs]
    servers = {name: InProcess(Settings(packs=packs, journal_dir=tmp / f"journal-{name}", **common), runner)
               for name, packs in (("probe only", base), ("probe + SAE", with_sae))}
    for srv in servers.values():
        run_streams(srv.target, 1, 8)  # warm-up
    best = {(name, n): 0.0 for name in servers for n in args.streams}
    for rep in range(args.repeats):
        order = list(servers.items()) if rep % 2 == 0 else list(reversed(servers.items()))
        for name, srv in order:
            for n in args.streams:
                best[(name, n)] = max(best[(name, n)], run_streams(srv.target, n, args.tokens))
    for srv in servers.values():
        srv.close()
    for sae in saes.values():
        print(f"SAE {sae.id}: {sae.kind}, {sae.d_sae} latents at {sae.hook_point} (full encoder per token)")
    print(f"detectors: {', '.join(args.base)}  vs  + {', '.join(args.sae_packs)}; model {runner.model_id} on "
          f"{runner.device}; {args.tokens} tokens per stream, best of {args.repeats}")
    for n in args.streams:
        plain, with_sae = best[("probe only", n)], best[("probe + SAE", n)]
        print(f"{n} stream(s): probe only {plain:7.1f} tok/s, probe + SAE {with_sae:7.1f} tok/s: "
              f"SAE overhead {100 * (1 - with_sae / plain):+.2f}% of decode tokens/s   (target <= 10%)")


if __name__ == "__main__":
    main()
