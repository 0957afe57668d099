"""What clamping one SAE latent does to generation, through the real server: the same greedy requests
with and without `STEERING_KIND_CLAMP`, in one run.

Prints, per prompt and overall: the share of generated tokens that differ from the unclamped
answer, the clamped latent's activation as the SAE reads it (before vs after, on each answer), a
detector's mean score over the answers, and the interventions the server streamed.

    .venv/bin/python bench/clamp_effect.py --latent N [--value 20] [--sae topk-18-resid-post-4096]
        [--detector harmful_intent] [--tokens 48]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from generate_concurrency import InProcess

from monitor.client import Client, Intervention, Summary, Token
from monitor.config import Settings
from monitor.runner import Encoded, HookPass, ModelRunner
from monitor.sae.store import open_sae
from probes.pack import shipped_packs

PROMPTS = ["Write a short story about a lighthouse keeper.", "Give me three tips for a job interview.",
           "Explain how bread rises.", "What should I pack for a weekend of hiking?",
           "Describe your favourite season.", "How do I keep houseplants alive?"]


def latent_mean(runner: ModelRunner, sae, latent: int, prompt: str, answer_ids: list[int]) -> float:
    """Mean activation of `latent` over an answer's tokens, as the SAE reads the unsteered model."""
    enc = runner.encode(messages=[{"role": "user", "content": prompt}])
    ids = enc.ids + answer_ids
    got: list[torch.Tensor] = []
    with runner.attached([sae.hook_point]):
        b = runner.batch([Encoded(ids, [(0, 0)] * len(ids), "", len(enc.ids))])
        runner.hook_pass = HookPass(capture={sae.hook_point: got.append}, stop_at=sae.hook_point)
        runner.forward(b, logits=False)
    return float(sae.encode(got[0][0, -len(answer_ids):].float())[:, latent].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", type=int, required=True)
    ap.add_argument("--value", type=float, default=20.0)
    ap.add_argument("--sae", default="topk-18-resid-post-4096")
    ap.add_argument("--detector", default="harmful_intent")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    runner = ModelRunner.load(args.model)
    sae = open_sae(args.sae, expect=runner.fingerprint, d_model=runner.d_model)
    tmp = Path(tempfile.mkdtemp())
    settings = Settings(packs=[shipped_packs()[args.detector][0]], saes=[args.sae], port=0, metrics_port=None,
                        db=f"sqlite:///{tmp}/bench.db", journal_dir=tmp / "journal",
                        permissions={"bench": {"steering": True}})
    srv = InProcess(settings, runner)
    clamp = [{"kind": "clamp", "sae_id": sae.id, "latent": args.latent, "value": args.value, "positions": "generated"}]
    rows = []
    try:
        with Client(srv.target, timeout=600) as c:
            for prompt in PROMPTS:
                chat = [{"role": "user", "content": prompt}]
                out = {}
                for name, steering in (("plain", ()), ("clamped", clamp)):
                    events = list(c.generate(chat, max_new_tokens=args.tokens, client_id="bench", steering=steering,
                                             include_token_scores=True))
                    summary = next(e for e in events if isinstance(e, Summary))
                    tokens = [e for e in events if isinstance(e, Token)]
                    out[name] = (summary, [t.token_id for t in tokens],
                                 [e for e in events if isinstance(e, Intervention)])
                (plain, ids0, _), (clamped, ids1, interventions) = out["plain"], out["clamped"]
                n = max(len(ids0), len(ids1))
                differ = sum(a != b for a, b in zip(ids0, ids1)) + abs(len(ids0) - len(ids1))
                rows.append({
                    "prompt": prompt, "plain": plain.text, "clamped": clamped.text, "differ": differ / n,
                    "act_plain": latent_mean(runner, sae, args.latent, prompt, ids0),
                    "act_clamped": latent_mean(runner, sae, args.latent, prompt, ids1),
                    "score_plain": plain.scores[args.detector], "score_clamped": clamped.scores[args.detector],
                    "interventions": [(i.kind, i.steering.kind, i.steering.sae_id, i.steering.latent)
                                      for i in interventions],
                })
    finally:
        srv.close()
    for r in rows:
        print(f"\n{r['prompt']}\n  plain  : {r['plain'][:160]!r}\n  clamped: {r['clamped'][:160]!r}")
        print(f"  tokens differing {r['differ']:.0%}; latent {args.latent} mean activation on the answer "
              f"{r['act_plain']:.2f} -> {r['act_clamped']:.2f}; {args.detector} {r['score_plain']:.3f} -> "
              f"{r['score_clamped']:.3f}; interventions streamed {r['interventions']}")
    print(f"\nSAE {sae.id} ({sae.kind}, {sae.d_sae} latents at {sae.hook_point}); latent {args.latent} clamped to "
          f"{args.value} on generated tokens; {len(rows)} greedy prompts, {args.tokens} tokens each")
    print(f"tokens differing from the unclamped answer: mean {np.mean([r['differ'] for r in rows]):.0%}")
    print(f"latent {args.latent} mean activation on the answers (unsteered re-read): "
          f"{np.mean([r['act_plain'] for r in rows]):.2f} -> {np.mean([r['act_clamped'] for r in rows]):.2f}")
    print(f"{args.detector} score: {np.mean([r['score_plain'] for r in rows]):.3f} -> "
          f"{np.mean([r['score_clamped'] for r in rows]):.3f}")
    print(f"clamp interventions streamed: {sum(len(r['interventions']) for r in rows)} of {len(rows)} requests")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
