"""Scoring without generating: early stop after the deepest hook point vs a full forward.

Runs on SmolLM2-135M-Instruct (30 blocks) with a bank of probes at blocks.14.resid_post, on
real prompts from ../shared/datasets, and prints throughput for three ways of getting the same
scores, all measured in this run:

  early stop   forward ends after block 14; no final norm, no LM head    (latentwatch default)
  full, last   full forward, LM head on the last position only
  full, all    full forward with logits at every position (a plain HF forward)

Usage: python bench/score_early_stop.py [--n 512] [--batch-size 16] [--probes 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from monitor.bank import Detector, DetectorBank
from monitor.domain import HookPoint
from monitor.runner import HookPass, ModelRunner, encode_all
from probes.kinds.base import ScoringHead
from probes.recipes import harmful_intent_splits


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    runner = ModelRunner.load(device=args.device)
    point = HookPoint.parse(f"blocks.{args.layer}.resid_post")
    g = torch.Generator().manual_seed(0)
    bank = DetectorBank(
        [Detector(f"p{i}", "1", point, ScoringHead(torch.randn(runner.d_model, 1, generator=g) * 0.05, torch.zeros(1)))
         for i in range(args.probes)],
        device=runner.device,
    )
    examples = (harmful_intent_splits().train * 4)[: args.n]
    items = encode_all(runner, examples, chat=True)
    tokens = sum(len(i) for i in items)

    def full_all_logits():
        with runner.attached(bank.hook_points):
            for _, b in runner.batches(items, args.batch_size, "", False):
                state = bank.state(b["input_ids"].shape[0])
                runner.hook_pass = HookPass(bank_state=state)
                state.begin_step(*b["input_ids"].shape)
                with torch.inference_mode():
                    runner.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 position_ids=b["position_ids"])
                state.update(b["scored"]).sigmoid().cpu()

    runs = {
        "early stop": lambda: runner.score(items, bank, batch_size=args.batch_size),
        "full, last": lambda: runner.score(items, bank, batch_size=args.batch_size, early_stop=False),
        "full, all": full_all_logits,
    }
    early = np.array([r.probs for r in runs["early stop"]()])
    late = np.array([r.probs for r in runs["full, last"]()])
    assert np.allclose(early, late, atol=1e-5), "early stop changed the scores"
    secs = {name: timed(fn, args.repeats) for name, fn in runs.items()}
    print(f"model {runner.model_id} on {runner.device} ({runner.dtype}), {args.probes} probes at {point}, "
          f"{len(items)} prompts, {tokens} tokens, batch {args.batch_size}")
    for name, s in secs.items():
        print(f"  {name:<11} {tokens / s:10.0f} tokens/s")
    print(f"early stop vs full forward (last-position logits): {secs['full, last'] / secs['early stop']:.2f}x")
    print(f"early stop vs full forward (all logits, plain HF): {secs['full, all'] / secs['early stop']:.2f}x")


if __name__ == "__main__":
    main()
