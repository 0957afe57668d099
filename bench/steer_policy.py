"""What deploy/policies/steer-harmful.yaml does on a real server: refusal rates and perplexity, with it
and without it (an alert-only policy), measured in the same run.

Held-out prompts only: JailbreakBench harmful behaviours and their topic-matched benign twins from the
harmful_intent_v2 recipe's test side, less the requests the refusal vector was built from (neither the
probe nor the vector trained on them), and
ordinary questions from the same recipe's NQ-Open test side. Greedy, over gRPC
to an in-process server with the default model and shipped packs. Refusals: probes.refusal (the
shared phrase matcher). Perplexity: the unsteered model's, on the benign completions.

    .venv/bin/python bench/steer_policy.py [--tokens 48] [--prompts 20] [--policy deploy/policies/steer-harmful.yaml]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from generate_concurrency import InProcess
from refusal_vector import held_out, perplexity

from monitor.client import Client, Intervention, Summary, Token
from monitor.config import Settings
from monitor.runner import ModelRunner
from probes.recipes import RECIPES, datasets_dir
from probes.refusal import is_refusal

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "rules:\n  - {id: watch, detector: harmful_intent, action: alert}\n"


def run(runner: ModelRunner, policy: Path, sets: dict[str, list[str]], tokens: int, tmp: Path) -> dict[str, list]:
    """Each set's (completion text, completion ids, steered?) under `policy`."""
    name = policy.stem
    settings = Settings(policy=policy, port=0, metrics_port=None, db=f"sqlite:///{tmp}/{name}.db",
                        journal_dir=tmp / f"journal-{name}", generate={"max_batch": 32, "max_wait_ms": 100})
    srv = InProcess(settings, runner)
    out: dict[str, list] = {}
    try:
        with Client(srv.target, timeout=1800) as c, ThreadPoolExecutor(32) as pool:
            for kind, prompts in sets.items():  # all of a set in flight at once: they share decode steps
                streams = pool.map(lambda p: list(c.generate([{"role": "user", "content": p}],
                                                             max_new_tokens=tokens)), prompts)
                out[kind] = [(next(e for e in s if isinstance(e, Summary)).text,
                              [e.token_id for e in s if isinstance(e, Token)],
                              any(isinstance(e, Intervention) and e.kind == "steer" for e in s)) for s in streams]
    finally:
        srv.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path, default=ROOT / "deploy" / "policies" / "steer-harmful.yaml")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=20, help="per set (JBB's test side holds 20 of each)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    harmful, twins = held_out(None, "harmful_intent_v2")  # the test side of the recipe harmful_intent came from
    nq = [e.text for e in RECIPES["harmful_intent_v2"](datasets_dir(), seed=0).eval_sets["nq_open"]]  # its test side
    sets = {"JBB harmful": harmful[:args.prompts], "JBB benign twins": twins[:args.prompts],
            "NQ-Open questions": nq[:args.prompts]}
    runner = ModelRunner.load()
    tmp = Path(tempfile.mkdtemp())
    base = tmp / "alert-only.yaml"
    base.write_text(textwrap.dedent(BASELINE))
    t0 = time.perf_counter()
    results = {"without": run(runner, base, sets, args.tokens, tmp), "with": run(runner, args.policy, sets,
                                                                                  args.tokens, tmp)}
    rows = []
    for kind, prompts in sets.items():
        encoded = [runner.encode(messages=[{"role": "user", "content": p}]) for p in prompts]
        row = {"set": kind, "n": len(prompts)}
        for arm, res in results.items():
            row[f"refusal_{arm}"] = sum(is_refusal(text) for text, _, _ in res[kind]) / len(prompts)
            row[f"steered_{arm}"] = sum(steered for *_, steered in res[kind]) / len(prompts)
            row[f"perplexity_{arm}"] = perplexity(runner, encoded, [ids for _, ids, _ in res[kind]])
        row["refusal_points"] = 100 * (row["refusal_with"] - row["refusal_without"])
        row["perplexity_ratio"] = row["perplexity_with"] / row["perplexity_without"]
        rows.append(row)
    if args.json:
        print(json.dumps({"policy": str(args.policy), "tokens": args.tokens, "rows": rows}, indent=2))
        return
    print(f"{args.policy.name} vs an alert-only policy, greedy, {args.tokens} tokens, "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{'set':<20}{'n':>4}{'steered':>9}{'refused without':>17}{'refused with':>14}{'change':>9}"
          f"{'ppl without':>13}{'ppl with':>10}{'ppl ratio':>11}")
    for r in rows:
        print(f"{r['set']:<20}{r['n']:>4}{r['steered_with']:>9.0%}{r['refusal_without']:>17.0%}"
              f"{r['refusal_with']:>14.0%}{r['refusal_points']:>+8.0f}pt{r['perplexity_without']:>13.2f}"
              f"{r['perplexity_with']:>10.2f}{r['perplexity_ratio']:>10.2f}x")


if __name__ == "__main__":
    main()
