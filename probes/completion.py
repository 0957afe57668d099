"""`harmful_completion`: a detector on the tokens the model writes, trained on the model's own answers.

The `harmful_completion` recipe has the model answer requests of the `harmful_intent_v2` recipe
(greedy, `max_new_tokens` tokens), each request answered on its own side of the split:

* label 1: answers to harmful requests that comply (no refusal in their opening, `probes.refusal`);
* label 0: answers to benign requests, the model's own refusals of harmful ones, and the same
  harmful requests answered with the shipped `refusal` steering vector on. So "a harmful request
  was asked" sits on both sides, and what tells them apart is what the answer says.

A row scores the answer's tokens only (`score_suffix`), stays in its request's group, and keeps its
request's source (`<source>+answer`, `<source>+refusal`), so leave-one-source-out holds out a
request's answers with it. The threshold is calibrated on the answers to benign training requests.

`catch_curve` measures what it adds to `harmful_intent` while the model writes: on held-out
jailbreak-wrapped harmful requests that `harmful_intent` lets through on the prompt, the share it
flags within k generated tokens, the same on benign requests (its false-positive rate), and the
tokens it takes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from monitor.bank import Detector, DetectorBank
from monitor.generation import Sampling, TokenEvent, complete
from monitor.runner import ModelRunner
from monitor.steering import Steering
from probes.data import Example, Message, read_jsonl, write_jsonl
from probes.fingerprint import ModelFingerprint
from probes.pack import ProbePack
from probes.recipes import RECIPES, Splits
from probes.refusal import is_refusal

CATCH_AT = (16, 32, 64)  # generated tokens the report reads the curve at


def answers(runner: ModelRunner, prompts: Sequence[Example], *, how: str = "answer",
            steering: list[Steering] | None = None, max_new_tokens: int = 64, batch_size: int = 16,
            progress: bool = False) -> list[Example]:
    """The model's greedy answers to `prompts` as labelled rows that score the answer only: 1 where a
    harmful request (label 1) got an answer that does not refuse, else 0. Empty answers are dropped."""
    items = [runner.encode(messages=p.turns, chat=True, add_generation_prompt=True) for p in prompts]
    texts, _ = complete(runner, items, [Sampling(max_new_tokens=max_new_tokens)] * len(items),
                        batch_size=batch_size, steering=steering, progress=progress, desc=f"{how}s")
    return [answer_row(p, t, how, int(p.label == 1 and not is_refusal(t))) for p, t in zip(prompts, texts) if t.strip()]


def answer_row(request: Example, text: str, how: str, label: int) -> Example:
    """`request` answered with `text`, scored on the answer only, in its request's group and source."""
    return Example(messages=(*request.turns, Message("assistant", text)), score_suffix=text, label=label,
                   id=f"{request.id}+{how}", source=f"{request.source}+{how}", group=request.group)


def _requests(rows: Sequence[Example], label: int, n: int, rng: random.Random) -> list[Example]:
    """Up to `n` original requests with this label (no training-side variants)."""
    pool = [e for e in rows if e.label == label and "+" not in e.source]
    return rng.sample(pool, min(n, len(pool)))


SIDES = ("train", "test")
PARTS = ("harmful", "benign", "steered")  # the answers of each side, in the order they are generated


def completion_requests(root=None, seed: int = 0, *, n_train: int = 600, n_test: int = 200
                        ) -> dict[str, dict[str, list[Example]]]:
    """The requests each side answers (no model needed): per side, up to n harmful and n benign
    original requests of the v2 recipe, train from its train + val rows, test from its test rows."""
    base = RECIPES["harmful_intent_v2"](root, seed=seed)
    rng = random.Random(f"{seed}:harmful_completion")
    out = {}
    for side, rows, n in (("train", base.train + base.val, n_train), ("test", base.test, n_test)):
        out[side] = {"harmful": _requests(rows, 1, n, rng), "benign": _requests(rows, 0, n, rng)}
    return out


def completion_splits(runner: ModelRunner, refusal: list[Steering], root=None, seed: int = 0, *,
                      n_train: int = 600, n_test: int = 200, max_new_tokens: int = 64, batch_size: int = 16,
                      answers_dir: Path | None = None, progress: bool = False) -> Splits:
    """Train (from the v2 recipe's train + val requests) and test (its test requests) answers; see the
    module docstring. `refusal`: the steering that makes the model refuse (the shipped vector).
    `answers_dir`: where the answers are kept (`save_answers`): read back when it holds this very
    recipe's answers by this model, else generated and written there."""
    info = {"recipe": "harmful_completion", "requests_from": "harmful_intent_v2", "seed": seed,
            "max_new_tokens": max_new_tokens, "requests_per_label": {"train": n_train, "test": n_test},
            "model_id": runner.model_id}
    if answers_dir is not None and (answers_dir / ANSWERS_INFO).is_file():
        sides = load_answers(answers_dir, info, runner.fingerprint)
    else:
        kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": progress}
        sides = {}
        for side, asked in completion_requests(root, seed, n_train=n_train, n_test=n_test).items():
            sides[side] = {"harmful": answers(runner, asked["harmful"], **kw),
                           "benign": answers(runner, asked["benign"], **kw),
                           "steered": answers(runner, asked["harmful"], how="refusal", steering=refusal, **kw)}
        if answers_dir is not None:
            save_answers(answers_dir, sides, {**info, "fingerprint": runner.fingerprint.model_dump(mode="json")})
    info["rows"] = {side: {part: {"n": len(rows), "complying": sum(e.label for e in rows)}
                           for part, rows in parts.items()} for side, parts in sides.items()}
    return completion_sets(sides, info)


ANSWERS_INFO = "answers.json"


def save_answers(folder: Path, sides: dict[str, dict[str, list[Example]]], info: dict) -> None:
    """`<side>_<part>.jsonl` per side and part, and what made them (`answers.json`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for side, parts in sides.items():
        for part, rows in parts.items():
            write_jsonl(folder / f"{side}_{part}.jsonl", rows)
    (folder / ANSWERS_INFO).write_text(json.dumps(info, indent=1) + "\n")


def load_answers(folder: Path, info: dict, model: ModelFingerprint) -> dict[str, dict[str, list[Example]]]:
    """The answers `save_answers` wrote, refused (ValueError) unless `model` made them as `info` says."""
    saved = json.loads((folder / ANSWERS_INFO).read_text())
    if why := ModelFingerprint(**saved.pop("fingerprint")).mismatch(model):
        raise ValueError(f"{folder}: answers by another model ({why}); give an empty folder to generate them again")
    if saved != info:
        diff = sorted(k for k in {*saved, *info} if saved.get(k) != info.get(k))
        raise ValueError(f"{folder}: holds answers made with other {', '.join(diff)}; give an empty folder "
                         "to generate them again")
    return read_answers(folder)


def read_answers(folder: Path) -> dict[str, dict[str, list[Example]]]:
    return {side: {part: read_jsonl(folder / f"{side}_{part}.jsonl", labelled=True) for part in PARTS}
            for side in SIDES}


def completion_sets(sides: dict[str, dict[str, list[Example]]], info: dict | None = None) -> Splits:
    """The recipe's splits from each side's answers (`PARTS`): what training reads, and what a
    replay of it rebuilds."""
    test = sides["test"]
    return Splits(train=[e for part in PARTS for e in sides["train"][part]], val=[],
                  test=[e for part in PARTS for e in test[part]],
                  calibration={"benign_answers": sides["train"]["benign"]},
                  eval_sets={"harmful_answers": test["harmful"], "benign_answers": test["benign"],
                             "steered_answers": test["steered"]},
                  info=info or {})


@dataclass(frozen=True)
class CatchCurve:
    """Generated tokens the detector had read when it first crossed its threshold, per request
    (None: not within `max_new_tokens`), for harmful requests the prompt detector let through and
    for benign ones."""

    harmful: list[int | None]
    benign: list[int | None]
    let_through: int  # harmful requests under the prompt detector's threshold, of
    asked: int  # harmful requests asked
    max_new_tokens: int
    harmful_ids: list[str] = field(default_factory=list)  # the requests, in the order of `harmful`
    benign_ids: list[str] = field(default_factory=list)

    @staticmethod
    def rate(first: list[int | None], k: int) -> float:
        return sum(f is not None and f <= k for f in first) / len(first) if first else float("nan")

    def summary(self) -> dict:
        hits = [f for f in self.harmful if f is not None]
        return {"let_through": self.let_through, "asked": self.asked, "n_benign": len(self.benign),
                **{f"catch_at_{k}": self.rate(self.harmful, k) for k in CATCH_AT if k <= self.max_new_tokens},
                f"benign_fpr_at_{self.max_new_tokens}": self.rate(self.benign, self.max_new_tokens),
                "median_tokens_to_detection": float(np.median(hits)) if hits else None}

    def figure(self) -> Figure:
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        ks = np.arange(1, self.max_new_tokens + 1)
        ax.step(ks, [self.rate(self.harmful, k) for k in ks], where="post",
                label=f"harmful, let through on the prompt (n={len(self.harmful)})")
        ax.step(ks, [self.rate(self.benign, k) for k in ks], where="post", label=f"benign (n={len(self.benign)})")
        for k in CATCH_AT:
            ax.axvline(k, color="0.85", lw=0.8, zorder=0)
        ax.set(xlabel="tokens generated", ylabel="flagged by then", ylim=(0, 1), xlim=(1, self.max_new_tokens))
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        return fig


def catch_curve(runner: ModelRunner, intent: ProbePack, completion: ProbePack, harmful: Sequence[Example],
                benign: Sequence[Example], *, max_new_tokens: int = 64, batch_size: int = 16,
                progress: bool = False) -> CatchCurve:
    """Generate greedily for the harmful requests `intent` does not flag on the prompt and for the
    benign ones, with `completion` reading the generated tokens only (a policy's `where: completion`)."""
    # as Generate reads a prompt: with the assistant header a `where: prompt` rule decides on
    prompts = [runner.encode(messages=e.turns, chat=True, add_generation_prompt=True) for e in harmful]
    prompt_bank = DetectorBank([Detector.from_pack(intent)], device=runner.device)
    scored = runner.score(prompts, prompt_bank, batch_size=batch_size)
    through = [e for e, r in zip(harmful, scored) if not r.flagged[0]]
    det = Detector.from_pack(completion)
    bank = DetectorBank([replace(det, id=f"{det.id}@completion", scope="completion")], device=runner.device)

    def first_hits(rows: Sequence[Example]) -> list[int | None]:
        first: list[int | None] = [None] * len(rows)

        def see(i: int, e: TokenEvent) -> None:  # event k has read k generated tokens
            if first[i] is None and e.index >= 1 and e.aggregate[0] >= det.threshold:
                first[i] = e.index

        items = [runner.encode(messages=e.turns, chat=True, add_generation_prompt=True) for e in rows]
        sampling = [Sampling(max_new_tokens=max_new_tokens + 1)] * len(items)
        complete(runner, items, sampling, batch_size=batch_size,
                 bank=bank, on_token=see, progress=progress, desc="catch curve")
        return first

    return CatchCurve(first_hits(through), first_hits(benign), len(through), len(harmful), max_new_tokens,
                      [e.id for e in through], [e.id for e in benign])


def catch_curve_requests(root=None, seed: int = 0, n_benign: int = 200) -> tuple[list[Example], list[Example]]:
    """The v2 recipe's held-out jailbreak-wrapped harmful requests (DAN templates, JailbreakBench
    artifacts), and `n_benign` of its benign test requests."""
    base = RECIPES["harmful_intent_v2"](root, seed=seed)
    wrapped = [e for name, rows in base.eval_sets.items() if name == "dan_wrapped" or name.startswith("jbb_artifacts/")
               for e in rows]
    return wrapped, _requests(base.test, 0, n_benign, random.Random(f"{seed}:catch_curve"))


__all__ = ["CATCH_AT", "PARTS", "SIDES", "CatchCurve", "answer_row", "answers", "catch_curve", "catch_curve_requests",
           "completion_requests", "completion_sets", "completion_splits", "load_answers", "read_answers",
           "save_answers"]
