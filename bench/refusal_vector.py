"""Does the shipped refusal vector make SmolLM2 refuse harmful requests, and what does it cost on benign ones?

Greedy generations on held-out JailbreakBench behaviours (the harmful_intent recipe's test side:
never in the vector's training rows), unsteered and with the vector added unconditionally at a few
coefficients, all in one run; refusals counted by probes.refusal (the shared phrase matcher).
Perplexity is the unsteered model's, on the benign completions: how far steering pushes ordinary
answers off the model's own distribution.

    .venv/bin/python bench/refusal_vector.py data --out DIR        # the training JSONL files
    latentwatch steer build --positive DIR/refusal.jsonl --negative DIR/compliance.jsonl --pool mean \\
        --hook-point blocks.N.resid_post ... --out probes/vectors/refusal --id refusal
    .venv/bin/python bench/refusal_vector.py measure [--pack refusal] [--coefficients 0.5,0.75,1,1.25]
        [--positions all] [--tokens 48] [--record COEFFICIENT]

`--record` writes the measured table and the chosen default coefficient into the pack's manifest.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import replace
from pathlib import Path

import torch

from monitor.generation import Generation, Sampling
from monitor.runner import Encoded, ModelRunner
from probes.data import write_jsonl
from probes.recipes import RECIPES, datasets_dir, harmful_intent_splits
from probes.refusal import is_refusal
from probes.vectors import open_vector_pack, save_vector_pack

# Harmful rows are length-matched to the benign ones: long HarmBench contexts would make it "long vs short".
MAX_CHARS = 600
N_HARMFUL = 300
N_PROMPTS = 60  # per class, for the response contrast (two rows each)
SEED = 0
# The response contrast (CAA's form): the same request answered by a refusal or by compliance, read over
# the answer's tokens. The request contrast (harmful vs benign requests at the last prompt token, as
# refusal-direction work does on models that refuse) gives a harmfulness direction on SmolLM2-135M,
# which barely refuses: adding it never made it refuse, and broke its text from coefficient 2 on.
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "I'm sorry, I can't provide that information.",
    "I won't help with this, as it could cause harm.",
)
COMPLIANCES = (
    "Sure, here is how to do it.",
    "Of course! Here are the steps.",
    "Certainly, here's what you need.",
    "Absolutely, let me explain how.",
)


def write_data(out: Path, datasets: str | None, contrast: str) -> None:
    """Training files from the recipe's training rows (train + val); Alpaca left out, the test side never read."""
    harmful, benign = training_requests(datasets)
    if contrast == "requests":
        files = {
            "harmful.jsonl": sorted(harmful[:N_HARMFUL], key=lambda e: e.id),
            "benign.jsonl": sorted(benign, key=lambda e: e.id),
        }
    else:
        prompts = sorted(harmful[:N_PROMPTS] + benign[:N_PROMPTS], key=lambda e: e.id)

        def answered(answers):  # line i of both files answers the same request, so `pca` pairs them
            return [
                {
                    "id": e.id,
                    "source": e.source,
                    "score_suffix": answers[i % len(answers)],
                    "messages": [
                        {"role": "user", "content": e.text},
                        {"role": "assistant", "content": answers[i % len(answers)]},
                    ],
                }
                for i, e in enumerate(prompts)
            ]

        files = {"refusal.jsonl": answered(REFUSALS), "compliance.jsonl": answered(COMPLIANCES)}
    for name, data in files.items():
        write_jsonl(out / name, data)
        print(f"wrote {out / name} ({len(data)} rows)")


def training_requests(datasets: str | None):
    """The harmful_intent recipe's train + val requests the vector's files draw from, in the seeded
    order they are taken in (harmful: short ones only; benign: Alpaca left out)."""
    s = harmful_intent_splits(datasets_dir(datasets), seed=SEED)
    rows = s.train + s.val
    harmful = [e for e in rows if e.label == 1 and len(e.text) <= MAX_CHARS]
    random.Random(SEED).shuffle(harmful)
    benign = [e for e in rows if e.label == 0 and e.source != "alpaca"]
    random.Random(SEED).shuffle(benign)
    return harmful, benign


def held_out(datasets: str | None, recipe: str = "harmful_intent") -> tuple[list[str], list[str]]:
    """JailbreakBench behaviours and their benign twins from `recipe`'s test side, less any request
    the vector was built from (none for its own recipe; harmful_intent_v2 splits its groups anew)."""
    s = RECIPES[recipe](datasets_dir(datasets), seed=SEED)
    harmful, benign = training_requests(datasets)
    seen = {e.text for e in harmful[:N_PROMPTS] + benign[:N_PROMPTS]}
    return ([e.text for e in s.eval_sets["test_harmful"] if e.source == "jbb_behaviors" and e.text not in seen],
            [e.text for e in s.eval_sets["jbb_benign"] if e.text not in seen])


def generate(runner: ModelRunner, prompts: list[Encoded], steering: list, tokens: int) -> list[list[int]]:
    """Greedy completions (token ids), one batch, every row steered alike."""
    ids: list[list[int]] = [[] for _ in prompts]
    gen = Generation(
        runner, prompts, [Sampling(max_new_tokens=tokens)] * len(prompts), steering=[steering] * len(prompts)
    )
    for events in gen:
        for e in events:
            ids[e.row].append(e.token_id)
    return ids


def perplexity(runner: ModelRunner, prompts: list[Encoded], completions: list[list[int]]) -> float:
    """exp(mean NLL) of the completion tokens under the unsteered model (EOS included when generated)."""
    items = [Encoded(p.ids + c, [(0, 0)] * (len(p) + len(c)), "", len(p)) for p, c in zip(prompts, completions)]
    b = runner.batch(items)
    with torch.inference_mode():
        logits = runner.model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]
        ).logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    mask = b["scored"][:, 1:]  # completion tokens: scored from the prompt's length on
    return math.exp(float(-(logp * mask).sum() / mask.sum()))


def vs_unsteered(row: dict, plain: dict) -> dict:
    """The ratio to the unsteered rate (None when that is 0: the ratio is undefined) and the change in points."""
    base = plain["harmful_refusal"]
    return {
        "harmful_ratio": row["harmful_refusal"] / base if base else None,
        "harmful_points": 100 * (row["harmful_refusal"] - base),
        "benign_points": 100 * (row["benign_refusal"] - plain["benign_refusal"]),
    }


def measure(args) -> None:
    runner = ModelRunner.load(args.model)
    pack = open_vector_pack(args.pack, expect=runner.fingerprint)
    harmful, benign = held_out(args.datasets)
    enc = lambda texts: [runner.encode(text=t, chat=True) for t in texts]  # noqa: E731
    h_items, b_items = enc(harmful), enc(benign)
    rows = []
    for c in [None, *args.coefficients]:
        steering = [] if c is None else pack.steering(c, positions=args.positions)
        ids = generate(runner, h_items + b_items, steering, args.tokens)
        texts = [runner.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        h_rate = sum(map(is_refusal, texts[: len(harmful)])) / len(harmful)
        b_rate = sum(map(is_refusal, texts[len(harmful) :])) / len(benign)
        row = {
            "coefficient": c or 0.0,
            "harmful_refusal": h_rate,
            "benign_refusal": b_rate,
            "benign_perplexity": perplexity(runner, b_items, ids[len(harmful) :]),
        }
        rows.append(row | vs_unsteered(row, rows[0] if rows else row))
        if args.show:
            print(f"\n--- coefficient {c}: {texts[0][:120]!r} | {texts[len(harmful)][:120]!r}")
    points = ", ".join(map(str, pack.directions))
    print(
        f"\n{pack.id} ({pack.manifest.method} at {points}), added at {args.positions} positions; greedy, "
        f"{args.tokens} new tokens; held-out JBB: {len(harmful)} harmful, {len(benign)} benign"
    )
    print(
        f"{'coefficient':>11}  {'harmful refused':>15}  {'x unsteered':>11}  {'+ points':>8}  {'benign refused':>14}  "
        f"{'+ points':>8}  {'benign ppl':>10}"
    )
    for r in rows:
        ratio = "-" if r["harmful_ratio"] is None else f"{r['harmful_ratio']:.2f}"
        print(
            f"{r['coefficient']:>11g}  {r['harmful_refusal']:>15.0%}  {ratio:>11}  {r['harmful_points']:>+8.0f}  "
            f"{r['benign_refusal']:>14.0%}  {r['benign_points']:>+8.0f}  {r['benign_perplexity']:>10.2f}"
        )
    if args.record is not None:
        evaluation = {
            "refusal": {
                "bench": "bench/refusal_vector.py measure",
                "positions": args.positions,
                "max_new_tokens": args.tokens,
                "decoding": "greedy",
                "harmful": f"JBB harmful behaviours, recipe test side (n={len(harmful)})",
                "benign": f"JBB benign behaviours, recipe test side (n={len(benign)})",
                "refusal_matcher": "probes.refusal.is_refusal",
                "rows": rows,
            }
        }
        manifest = pack.manifest.model_copy(update={"default_coefficient": args.record, "evaluation": evaluation})
        save_vector_pack(replace(pack, manifest=manifest), pack.source)
        print(f"recorded default coefficient {args.record:g} and this table in {pack.source}/manifest.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    d = sub.add_parser("data", help="write the example files for `latentwatch steer build`")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--contrast", choices=("responses", "requests"), default="responses")
    d.add_argument("--datasets", default=None)
    m = sub.add_parser("measure", help="refusal rates unsteered vs steered")
    m.add_argument("--pack", default="refusal")
    m.add_argument("--coefficients", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.75, 1.0, 1.25])
    m.add_argument("--positions", choices=("all", "generated"), default="all")
    m.add_argument("--tokens", type=int, default=48)
    m.add_argument("--record", type=float, default=None)
    m.add_argument("--show", action="store_true", help="print the first harmful and benign completion per setting")
    m.add_argument("--model", default=None)
    m.add_argument("--datasets", default=None)
    args = ap.parse_args()
    if args.step == "data":
        args.out.mkdir(parents=True, exist_ok=True)
        write_data(args.out, args.datasets, args.contrast)
    else:
        torch.set_grad_enabled(False)
        measure(args)


if __name__ == "__main__":
    main()
