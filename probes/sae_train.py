"""Train a TopK sparse autoencoder on a model's activations at one hook point; write it as an SAE pack.

Activations are read through the serving hooks (`ModelRunner`'s `HookPass.capture`, as
`ModelRunner.capture` reads them, but per token instead of pooled), from the tokens detectors
score: the last user turn on, special tokens left out. The text is the train side of the probe
recipes (their test sets stay unseen by the SAE as well) plus the model's own answers to some of
those prompts, so the SAE also learns the activations of generated tokens, where detectors run
during generation. Activations stream through a bounded, shuffled host buffer.

The trainer follows OpenAI's "Scaling and evaluating sparse autoencoders" (Gao et al. 2024): TopK,
unit-norm decoder rows (the gradient component along each row is removed, rows renormalised after
every step), b_dec initialised to the geometric median, encoder initialised as the decoder's
transpose, Adam, and the AuxK loss, which lets latents that have not fired for `dead_tokens` tokens
reconstruct the residual error (coefficient 1/32). Held-out texts, never trained on, give the report:
L0, fraction of variance explained, dead latents, and next-token loss with the reconstruction
spliced into the forward pass.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from monitor.domain import HookPoint
from monitor.generation import Sampling, complete
from monitor.runner import Encoded, HookPass, ModelRunner, encode_all
from monitor.sae import TopKConfig, TopKSAE
from monitor.sae.loaders import LATENTWATCH_DTYPES, LATENTWATCH_FILES, LATENTWATCH_FORMAT, latentwatch_weights
from probes.data import Example, Message, data_sha256
from probes.fingerprint import ModelFingerprint
from probes.train import _git_commit, _version

ADAM_EPS = 6.25e-10  # OpenAI's: the normalised loss has small gradients, which Adam's default 1e-8 would damp
PACK_ID = r"^[a-z0-9_\-]+$"


@dataclass
class SAETrainSpec:
    """What to train and how; recorded whole in the pack's provenance."""

    hook_point: str
    d_sae: int = 4096
    k: int = 32
    tokens: int = 2_000_000  # activations trained on; the data repeats when it holds fewer
    batch_size: int = 4096  # activations per Adam step
    lr: float | None = None  # default: OpenAI's 2e-4 / sqrt(d_sae / 2**14)
    lr_decay: float = 0.2  # share of the steps at the end over which the learning rate falls linearly to 0
    aux_k: int | None = None  # dead latents AuxK reconstructs the error with; default d_in // 2 (eai-sparsify)
    aux_coef: float = 1 / 32
    dead_tokens: int | None = None  # tokens without firing that make a latent dead; default min(10M, tokens / 10)
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    buffer_tokens: int = 2**16  # the shuffle buffer (d_in float32 each: 150 MB at d_in 576)
    cache_gib: float = 3.0  # activations kept for later epochs when one epoch fits (1.4M tokens at d_model 576)
    capture_batch: int = 32  # texts per forward pass
    max_text_tokens: int = 512  # longer texts are cut (an activation's context is all before it anyway)
    generate: int = 256  # training prompts the model answers (every other one greedy, the rest sampled)
    max_new_tokens: int = 64
    max_prompt_chars: int = 400  # prompts answered are at most this long
    temperature: float = 0.8  # for the sampled answers
    input_format: Literal["chat", "raw"] = "chat"
    dtype: str = "int8"  # how the pack stores W_enc and W_dec
    seed: int = 0

    def check(self) -> None:
        """Everything that can be wrong before a model is loaded; a ValueError says what to change."""
        HookPoint.parse(self.hook_point)
        if self.d_sae < 1 or not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be between 1 and the number of latents ({self.d_sae}): "
                             "a TopK SAE keeps k of its latents per token")
        if self.dtype not in LATENTWATCH_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(LATENTWATCH_DTYPES)}")
        if self.batch_size < 1 or self.tokens < self.batch_size:
            raise ValueError(f"tokens={self.tokens} is less than one batch of {self.batch_size} activations")
        if self.buffer_tokens < 2 * self.batch_size:
            raise ValueError(f"buffer_tokens={self.buffer_tokens} must hold at least two batches "
                             f"({2 * self.batch_size}) to shuffle them")
        if self.generate < 0 or self.max_new_tokens < 1:
            raise ValueError("generate must be >= 0 and max_new_tokens >= 1")


@dataclass
class SAEData:
    """Texts to train on and held-out texts (never trained on) to report on; `info` is their provenance."""

    train: list[Example]
    held_out: list[Example]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainedSAE:
    sae: TopKSAE  # float32, in the model's units
    report: dict[str, Any]
    data: dict[str, Any]  # provenance of the text, completions included
    spec: SAETrainSpec


# ------------------------------------------------------------------------------------- data


def split_held_out(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded split by `group` (a behaviour and its pairs stay on one side)."""
    groups = sorted({e.group or f"row:{i}" for i, e in enumerate(examples)})
    random.Random(f"{seed}:sae-held-out").shuffle(groups)
    held = set(groups[: max(1, round(fraction * len(groups)))])
    train, out = [], []
    for i, e in enumerate(examples):
        (out if (e.group or f"row:{i}") in held else train).append(e)
    return train, out


# Unlabelled text the SAE also reads: every shared dataset the recipes do not train on (Alpaca aside),
# minus any text a detector is evaluated on (see `recipe_data`).
EXTRA_SOURCES = (
    ("liedetector_qa", "liedetector_qa.jsonl"),
    ("jailbreak_templates", "jailbreak_templates.jsonl"),
    ("jbb_artifacts", "jbb_artifacts.jsonl"),
    ("tense_reformulations", "future_tense.jsonl"),
    ("catqa", "catqa.jsonl"),
    ("harmfulqa", "harmfulqa.jsonl"),
    ("nq_open", "nq_open_dev.jsonl"),
)


def _extra_rows(root: Path, evaluated: Sequence[Example]) -> tuple[list[Example], dict[str, int]]:
    """Rows of `EXTRA_SOURCES` whose text does not occur inside any evaluated text (so no test row,
    nor a template the recipes wrap test requests in, is ever trained on); counts of rows dropped."""
    from probes.recipes import DAN_TEMPLATES, normalise

    seen = "\n".join(normalise(e.final_content) for e in evaluated)
    rows, texts, dropped = [], set(), Counter()
    for folder, name in EXTRA_SOURCES:
        for line in (root / folder / name).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            text = normalise(r["text"])
            if text in texts or not text:
                continue
            texts.add(text)
            if text in seen or r["id"] in DAN_TEMPLATES:
                dropped[folder] += 1
                continue
            # LieDetector pairs a lie and the truth to one prompt: group them so they stay on one side
            group = f"{folder}:{r.get('prompt') or r.get('behavior') or r['id']}"
            rows.append(Example(text=r["text"], source=folder, group=group))
    return rows, dict(sorted(dropped.items()))


def recipe_data(datasets=None, seed: int = 0, *, alpaca: bool = False, held_out: float = 0.1) -> SAEData:
    """The train and val rows of both probe recipes (harmful intent, deception), plus the unlabelled
    `EXTRA_SOURCES`, read from the datasets folder.

    No text any detector is tested or evaluated on (the recipes' test and eval sets) is trained on,
    so an SAE-feature detector evaluated on them faces text its dictionary never saw; `seed` is the
    recipes' split seed, which must be the one the probes were split with (0 for the shipped packs),
    not the SAE's training seed. Alpaca (CC BY-NC 4.0) is left out unless `alpaca`: the SAE is meant
    to be shipped, and its weights would be derived from non-commercial data.
    """
    from probes.recipes import datasets_dir, deception_splits, harmful_intent_splits

    root = datasets_dir(datasets)
    harm, dec = harmful_intent_splits(root, seed), deception_splits(root, seed)
    evaluated = [e for s in (harm, dec) for e in s.test + [x for v in s.eval_sets.values() for x in v]]
    rows = [e for e in harm.train + harm.val + dec.train + dec.val if alpaca or e.source != "alpaca"]
    extra, dropped = _extra_rows(root, evaluated)
    train, held = split_held_out(rows + extra, held_out, seed)
    info = {"recipes": ["harmful_intent", "deception"], "sides": "train+val",
            "extra_sources": [folder for folder, _ in EXTRA_SOURCES], "extra_rows": len(extra),
            "extra_dropped_as_evaluated": dropped, "datasets": str(root), "alpaca": alpaca,
            "held_out_fraction": held_out, "seed": seed}
    return SAEData(train, held, info)


def answer(runner: ModelRunner, prompts: Sequence[Example], spec: SAETrainSpec, *, seed: int,
           progress: bool = False, desc: str = "answering prompts") -> list[Example]:
    """The model's answers to `prompts` as new examples (user turn + answer); every other one greedy."""
    chat = spec.input_format == "chat"
    sampling = [Sampling(max_new_tokens=spec.max_new_tokens, temperature=0.0 if i % 2 == 0 else spec.temperature,
                         seed=seed + i) for i in range(len(prompts))]
    texts, _ = complete(runner, encode_all(runner, prompts, chat=chat), sampling, batch_size=spec.capture_batch,
                        progress=progress, desc=desc)
    return [Example(messages=(Message("user", p.text), Message("assistant", text)), source=f"{p.source}+answer")
            if chat else Example(text=p.text + text, source=f"{p.source}+answer")
            for p, text in zip(prompts, texts) if text.strip()]


def _with_answers(runner: ModelRunner, data: SAEData, spec: SAETrainSpec, progress: bool):
    """Train and held-out examples, each side with answers to some of its own single-turn prompts."""
    rng = random.Random(f"{spec.seed}:sae-prompts")
    sides = []
    for name, rows, n in (("train", data.train, spec.generate),
                          ("held_out", data.held_out, math.ceil(spec.generate * len(data.held_out)
                                                                / max(len(data.train), 1)))):
        # short requests only: answers are what is wanted, and a long template's prefill costs as much as
        # a whole answer to a short one
        prompts = [e for e in rows if e.text is not None and len(e.text) <= spec.max_prompt_chars]
        picked = rng.sample(prompts, min(n, len(prompts)))
        answers = answer(runner, picked, spec, seed=spec.seed + (0 if name == "train" else 10**6),
                           progress=progress, desc=f"answering {name.replace('_', '-')} prompts")
        sides.append((rows, answers))
    return sides


# ------------------------------------------------------------------------------ activations


def _special_ids(runner: ModelRunner) -> torch.Tensor:
    return torch.tensor(sorted(set(runner.tokenizer.all_special_ids)), dtype=torch.long, device=runner.device)


def _sae_tokens(batch: dict, special: torch.Tensor) -> torch.Tensor:
    """[rows, width] bool: the tokens the SAE reads (scored by detectors, not padding, not special)."""
    return batch["scored"] & ~torch.isin(batch["input_ids"], special)


def _cut(items: Sequence[Encoded], n: int) -> list[Encoded]:
    return [e if len(e) <= n else Encoded(e.ids[:n], e.offsets[:n], e.text, min(e.score_from, n)) for e in items]


def n_tokens(runner: ModelRunner, items: Sequence[Encoded]) -> int:
    """How many activations `items` give the SAE, without running the model."""
    special = set(runner.tokenizer.all_special_ids)
    return sum(sum(t not in special for t in e.ids[e.score_from :]) for e in items)


def token_activations(runner: ModelRunner, items: Sequence[Encoded], point: HookPoint,
                      batch_size: int) -> Iterator[torch.Tensor]:
    """Host float32 [tokens, d_model] per forward pass of `batch_size` items (in their order), read by
    the serving hook at `point`; the forward stops there."""
    special = _special_ids(runner)
    with runner.attached([point]):
        for start in range(0, len(items), batch_size):
            b = runner.batch(items[start : start + batch_size])
            got: list[torch.Tensor] = []
            runner.hook_pass = HookPass(capture={point: got.append}, stop_at=point)
            runner.forward(b, logits=False)
            yield got[0][_sae_tokens(b, special)].float().cpu()


def activation_stream(runner: ModelRunner, items: Sequence[Encoded], point: HookPoint, batch_size: int,
                      seed: int, cache_tokens: int = 0) -> Iterator[torch.Tensor]:
    """Endless epochs over `items` in seeded random order, length-sorted within windows of 8 batches
    (little padding, and the order still varies). When one epoch's activations fit in `cache_tokens` (float32)
    they are kept and replayed, in a new order each epoch, instead of running the model again."""
    rng = np.random.default_rng(seed)
    window = 8 * batch_size
    cache: list[torch.Tensor] | None = []
    while True:
        if cache:
            for i in rng.permutation(len(cache)):
                yield cache[i]
            continue
        order = rng.permutation(len(items))
        epoch = [items[i] for w in range(0, len(order), window)
                 for i in sorted(order[w : w + window], key=lambda i: len(items[i]))]
        size = 0
        for chunk in token_activations(runner, epoch, point, batch_size):
            size += len(chunk)
            cache = cache if cache is not None and size <= cache_tokens else None
            if cache is not None:
                cache.append(chunk)
            yield chunk


def shuffled_batches(chunks: Iterator[torch.Tensor], capacity: int, batch_size: int,
                     generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Batches drawn at random from a buffer of `capacity` activations, refilled as it empties: the
    tokens of one text are strongly correlated, and a batch of them would give biased steps.

    Once the buffer is full, half of it (at random) is handed out as batches and refilled from
    `chunks` (endless, like `activation_stream`), so every activation is trained on once.
    """
    buf: torch.Tensor | None = None
    free = torch.arange(capacity)
    per_round = capacity // 2 // batch_size * batch_size
    for chunk in chunks:
        if buf is None:
            buf = torch.empty(capacity, chunk.shape[1])
        while len(chunk):
            take = min(len(free), len(chunk))
            buf[free[:take]] = chunk[:take]
            free, chunk = free[take:], chunk[take:]
            if not len(free):
                free = torch.randperm(capacity, generator=generator)[:per_round]
                for i in range(0, per_round, batch_size):
                    yield buf[free[i : i + batch_size]]


# ---------------------------------------------------------------------------------- trainer


def geometric_median(x: torch.Tensor, iters: int = 64, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm. b_dec starts here rather than at the mean, which the few tokens of
    enormous norm some models have would drag away from the bulk of the activations."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - m).norm() <= tol * m.norm().clamp_min(1e-8)
        m = new
        if done:
            break
    return m


class TopKTrainer:
    """A TopK SAE under Adam, in normalised units (mean squared norm d_in, set by `initialise`), so
    one learning rate suits every model; `sae()` folds the scale back out."""

    def __init__(self, d_in: int, d_sae: int, k: int, *, lr: float, aux_k: int, aux_coef: float, dead_tokens: int,
                 seed: int = 0, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, d_in, generator=gen)
        w /= w.norm(dim=1, keepdim=True)
        self.W_enc = w.T.contiguous().to(device).requires_grad_()
        self.W_dec = w.to(device).requires_grad_()
        self.b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d_in, device=device, requires_grad=True)
        self.k, self.aux_k, self.aux_coef, self.dead_tokens = k, min(aux_k, d_sae), aux_coef, dead_tokens
        self.scale = 1.0
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.opt = torch.optim.Adam([self.W_enc, self.b_enc, self.W_dec, self.b_dec], lr=lr, eps=ADAM_EPS)

    def initialise(self, sample: torch.Tensor, b_dec_init: str = "geometric_median") -> None:
        """The input scale and b_dec from a sample of activations (model units)."""
        sample = sample.to(self.b_dec.device).float()
        self.scale = float((sample.pow(2).sum(1).mean() / sample.shape[1]).sqrt().clamp_min(1e-8))
        x = sample / self.scale
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(x) if b_dec_init == "geometric_median" else x.mean(0))

    def decode(self, idx: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """Sum of `acts`-weighted decoder rows `idx`, without the bias; never a dense [tokens, d_sae] matmul."""
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=acts, mode="sum")

    def step(self, x: torch.Tensor, lr: float) -> dict[str, float]:
        """One Adam step on a batch x [n, d_in] in model units; returns its FVU, AuxK loss and dead count."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        x = x.to(self.b_dec.device).float() / self.scale
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1, sorted=False)
        acts = top.values.relu()
        err = x - self.decode(top.indices, acts) - self.b_dec
        total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = err.pow(2).sum() / total
        dead = self.since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        aux = torch.zeros((), device=x.device)
        if n_dead and self.aux_coef:
            # the dead latents' best guess at what the live ones miss (OpenAI: ê = W_dec z_aux, no bias)
            top_dead = pre.masked_fill(~dead, -torch.inf).topk(min(self.aux_k, n_dead), dim=-1, sorted=False)
            aux = (self.decode(top_dead.indices, top_dead.values.relu()) - err.detach()).pow(2).sum() / total
        self.opt.zero_grad(set_to_none=True)
        (fvu + self.aux_coef * aux).backward()
        with torch.no_grad():
            g = self.W_dec.grad
            # the part along a row only changes its norm, which renormalising discards; left in, it
            # would still move Adam's moments
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec
            self.opt.step()
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            fired = torch.zeros_like(dead)
            fired[top.indices[acts > 0]] = True
            self.since_fired += len(x)
            self.since_fired[fired] = 0
        return {"fvu": fvu.item(), "aux": aux.item(), "dead": n_dead}

    def sae(self, point: HookPoint) -> TopKSAE:
        """The trained SAE in model units: TopK and ReLU are positively homogeneous, so scaling b_enc and
        b_dec by s gives latents s times larger and decoder rows that stay unit norm."""
        s = self.scale
        config = TopKConfig(d_in=self.W_dec.shape[1], d_sae=self.W_dec.shape[0], hook_point=point,
                            apply_b_dec_to_input=True, k=self.k)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc * s, "W_dec": self.W_dec, "b_dec": self.b_dec * s}
        return TopKSAE(config, {n: t.detach().float().cpu().clone() for n, t in tensors.items()})


# --------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def reconstruction_metrics(sae: TopKSAE, x: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """L0, fraction of variance explained (1 - sum sq err / sum sq of centred x) and latents that never fire."""
    mean = x.double().mean(0)
    err = var = 0.0
    active = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for c in x.split(chunk):
        z = sae.encode(c)
        err += float((c - sae.decode(z)).double().pow(2).sum())
        var += float((c.double() - mean).pow(2).sum())
        nz = z > 0
        active += int(nz.sum())
        fired |= nz.any(0).cpu()
    dead = sae.d_sae - int(fired.sum())
    return {"tokens": len(x), "l0": active / max(len(x), 1), "fve": 1 - err / max(var, 1e-30),
            "dead_latents": dead, "dead_fraction": dead / sae.d_sae}


@torch.no_grad()
def next_token_loss(runner: ModelRunner, items: Sequence[Encoded], sae: TopKSAE, point: HookPoint,
                    batch_size: int = 4) -> dict[str, float]:
    """Mean next-token cross-entropy at the SAE's tokens, clean and with the activation at `point`
    replaced by its reconstruction (there only; every other position runs clean)."""
    special = _special_ids(runner)
    sae = sae.to(runner.device)
    sums, n = {"clean": 0.0, "spliced": 0.0}, 0
    for start in range(0, len(items), batch_size):
        b = runner.batch(items[start : start + batch_size])
        keep = _sae_tokens(b, special)
        where, target = keep[:, :-1], b["input_ids"][:, 1:]

        def splice(h: torch.Tensor) -> torch.Tensor:
            out = h.clone()
            out[keep] = sae.decode(sae.encode(h[keep])).to(h.dtype)
            return out

        for name in sums:
            handle = runner.hooks.attach(point, splice) if name == "spliced" else None
            try:
                with torch.inference_mode():
                    logits = runner.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                          position_ids=b["position_ids"]).logits
            finally:
                if handle is not None:
                    handle.remove()
            sums[name] += float(F.cross_entropy(logits[:, :-1][where].float(), target[where], reduction="sum"))
        n += int(where.sum())
    clean, spliced = sums["clean"] / max(n, 1), sums["spliced"] / max(n, 1)
    return {"clean": clean, "spliced": spliced, "increase": spliced - clean, "tokens": n}


def machine(device) -> dict[str, Any]:
    """What the cost was measured on."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = torch.device(device)
    return {"cpu": cpu or "unknown", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


# ------------------------------------------------------------------------------------ storage


def storage_tensors(sae: TopKSAE, dtype: str) -> dict[str, torch.Tensor]:
    """What sae.safetensors holds: W_enc and W_dec in `dtype` (int8: symmetric, one float32 scale per
    latent), the biases in float32. `latentwatch_weights` reads them back."""
    out = {"b_enc": sae.b_enc.float().contiguous(), "b_dec": sae.b_dec.float().contiguous()}
    for name, axis in (("W_enc", 0), ("W_dec", 1)):  # axis: the one a latent's values run along
        w = sae.tensors[name].float()
        if dtype == "int8":
            scale = w.abs().amax(dim=axis) / 127
            q = (w / scale.clamp_min(1e-30).unsqueeze(axis)).round().clamp(-127, 127)
            out[name], out[f"{name}_scale"] = q.to(torch.int8).contiguous(), scale.contiguous()
        else:
            out[name] = w.to(LATENTWATCH_DTYPES[dtype]).contiguous()
    return out


def stored(sae: TopKSAE, dtype: str) -> TopKSAE:
    """The SAE as a pack in `dtype` loads: what the report's metrics describe."""
    return TopKSAE(sae.config, latentwatch_weights(storage_tensors(sae, dtype), dtype, "<memory>"), source="<memory>")


def save_sae_pack(folder, trained: TrainedSAE, *, pack_id: str, model: ModelFingerprint, model_id: str,
                  version: str = "1") -> Path:
    """Write sae.safetensors, then manifest.json with its sha256, the model's fingerprint, provenance and metrics."""
    if not re.fullmatch(PACK_ID, pack_id):
        raise ValueError(f"pack id {pack_id!r} may only use a-z, 0-9, '_' and '-'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_file, weights_file = (folder / f for f in LATENTWATCH_FILES)
    save_file(storage_tensors(trained.sae, trained.spec.dtype), weights_file)
    sae, spec, report = trained.sae, trained.spec, trained.report
    manifest = {
        "format": LATENTWATCH_FORMAT,
        "schema_version": 1,
        "id": pack_id,
        "version": version,
        "kind": "topk",
        "k": sae.config.k,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "hook_point": str(sae.hook_point),
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "input_format": spec.input_format,
        "dtype": spec.dtype,
        "weights_sha256": hashlib.sha256(weights_file.read_bytes()).hexdigest(),
        "model": model.model_dump(),
        "metrics": {key: report[key] for key in ("held_out", "storage", "training")},
        "provenance": {
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model_id": model_id,
            "git_commit": _git_commit(),
            "latentwatch_version": _version(),
            "seed": spec.seed,
            "params": asdict(spec),
            "data": trained.data,
            "cost": {"wall_s": report["timings_s"]["total"], "tokens": report["training"]["tokens"],
                     "timings_s": report["timings_s"], "machine": report["machine"]},
        },
    }
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------- training


def _data_provenance(data: SAEData, sides) -> dict[str, Any]:
    (train, train_answers), (held, held_answers) = sides
    return {**data.info,
            "train": {"rows": len(train), "answers": len(train_answers), "sha256": data_sha256(train),
                      "answers_sha256": data_sha256(train_answers), "sources": dict(sorted(Counter(
                          e.source for e in train).items()))},
            "held_out": {"rows": len(held), "answers": len(held_answers), "sha256": data_sha256(held),
                         "answers_sha256": data_sha256(held_answers), "sources": dict(sorted(Counter(
                             e.source for e in held).items()))}}


def train_sae(runner: ModelRunner, data: SAEData, spec: SAETrainSpec, *, progress: bool = True) -> TrainedSAE:
    """Generate answers, stream activations through the buffer into the trainer, report on held-out text."""
    spec.check()
    started = time.perf_counter()
    point = runner.hooks.resolve(spec.hook_point)
    torch.manual_seed(spec.seed)
    sides = _with_answers(runner, data, spec, progress)
    chat = spec.input_format == "chat"
    (train_rows, train_answers), (held_rows, held_answers) = sides
    train_items = _cut(encode_all(runner, train_rows + train_answers, chat=chat), spec.max_text_tokens)
    held_items = _cut(encode_all(runner, held_rows + held_answers, chat=chat), spec.max_text_tokens)
    unique = n_tokens(runner, train_items)
    if not unique or not n_tokens(runner, held_items):
        raise ValueError("no tokens to train or report on: the texts are empty or only special tokens")
    generated = time.perf_counter()

    steps = spec.tokens // spec.batch_size
    lr = spec.lr or 2e-4 / math.sqrt(spec.d_sae / 2**14)
    dead_tokens = spec.dead_tokens or min(10_000_000, max(spec.batch_size, spec.tokens // 10))
    trainer = TopKTrainer(runner.d_model, spec.d_sae, spec.k, lr=lr, aux_k=spec.aux_k or runner.d_model // 2,
                          aux_coef=spec.aux_coef, dead_tokens=dead_tokens, seed=spec.seed, device=runner.device)
    stream = activation_stream(runner, train_items, point, spec.capture_batch, spec.seed,
                                 int(spec.cache_gib * 2**30) // (4 * runner.d_model))
    batches = shuffled_batches(stream, spec.buffer_tokens, spec.batch_size,
                               torch.Generator().manual_seed(spec.seed))
    curve, fve = [], None
    bar = tqdm(range(steps), desc="training SAE", unit="step", disable=not progress)
    try:
        for step in bar:
            x = next(batches)
            if step == 0:
                trainer.initialise(x, spec.b_dec_init)
            decay_from = steps * (1 - spec.lr_decay)
            rate = lr * min(1.0, (steps - step) / max(steps - decay_from, 1))
            stats = trainer.step(x, rate)
            fve = 1 - stats["fvu"] if fve is None else 0.9 * fve + 0.1 * (1 - stats["fvu"])
            if step % max(1, steps // 20) == 0 or step == steps - 1:
                curve.append([step, stats["fvu"]])
                bar.set_postfix(loss=f"{stats['fvu'] + spec.aux_coef * stats['aux']:.4f}", fve=f"{fve:.3f}",
                                dead=stats["dead"])
    finally:
        bar.close()
        batches.close()
        stream.close()
    trained_at = time.perf_counter()

    sae = trainer.sae(point)
    x_held = torch.cat(list(token_activations(runner, sorted(held_items, key=len), point, spec.capture_batch)))
    kept = stored(sae, spec.dtype)
    held_out = reconstruction_metrics(kept, x_held)
    fve32 = held_out["fve"] if spec.dtype == "float32" else reconstruction_metrics(sae, x_held)["fve"]
    held_out |= {"texts": len(held_items), "answers": len(held_answers),
                 "next_token_loss": next_token_loss(runner, held_items, kept, point)}
    done = time.perf_counter()
    report = {
        "held_out": held_out,
        "storage": {"dtype": spec.dtype, "fve_float32": fve32, "fve_change": held_out["fve"] - fve32},
        "training": {"steps": steps, "tokens": steps * spec.batch_size, "unique_tokens": unique,
                     "epochs": steps * spec.batch_size / unique, "texts": len(train_items),
                     "answers": len(train_answers), "lr": lr, "aux_k": trainer.aux_k, "dead_tokens": dead_tokens,
                     "dead_latents_at_end": int((trainer.since_fired >= dead_tokens).sum()),
                     "input_scale": trainer.scale, "fvu_curve": curve},
        "timings_s": {"generate": generated - started, "train": trained_at - generated,
                      "evaluate": done - trained_at, "total": done - started},
        "machine": machine(runner.device),
    }
    return TrainedSAE(sae, report, _data_provenance(data, sides), spec)
