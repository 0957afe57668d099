"""Batched, streaming generation with detector scores on every token.

`Generation` owns one batch of requests: a single prefill, then one decode step per token over
the KV cache (the prefix is never re-run). Each `step()` returns a `TokenEvent` per active row
with that token's per-detector probabilities and the running aggregate. Between steps the caller
may stop a row or switch steering on for it. Finished rows leave the batch (cache, bank state and
steering plan are pruned together). One host transfer per step carries tokens and scores, and
what explains alerts (monitor.explain): the prompt's per-token scores with the prefill, the SAE
latents at each step's token.
Text that could still begin a stop string is held back until it is ruled out or completes one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from monitor.bank import DetectorBank
from monitor.runner import Encoded, HookPass, ModelRunner
from monitor.steering import Steering, SteeringPlan


@dataclass
class Sampling:
    """Per-request sampling parameters; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": math.isfinite(self.temperature) and self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "stop": all(self.stop),  # an empty stop string would end every request at once
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid sampling value {name}={getattr(self, name)!r}")


@dataclass
class TokenEvent:
    row: int  # index of the request in the order given to Generation
    index: int  # 0-based position among generated tokens
    token_id: int
    text: str  # newly released text ("" mid multi-byte character or while it may begin a stop string)
    token_probs: np.ndarray  # [detectors]
    aggregate: np.ndarray  # [detectors], running aggregate over prompt and generated tokens
    finish_reason: str | None = None  # "stop", "length" or None while running
    # For alert explanations. The first event, with bank.explain_tokens: every scored prompt token's
    # probabilities [tokens, detectors], from Encoded.score_from on (`token_probs` is the last of them).
    prompt_probs: np.ndarray | None = None
    latents: np.ndarray | None = None  # with a bank.readout: [pairs, m, 2] at the token this step read


@dataclass
class _Row:
    request: int
    sampling: Sampling
    generator: torch.Generator | None
    stops: _HoldBack
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0


class Generation:
    def __init__(
        self,
        runner: ModelRunner,
        prompts: list[Encoded],
        sampling: list[Sampling],
        bank: DetectorBank | None = None,
        steering: list[list[Steering]] | None = None,
        *,
        first_request: int = 0,
        hooked: set | None = None,
    ):
        if len(prompts) != len(sampling):
            raise ValueError("one Sampling per prompt")
        self.runner, self.bank = runner, bank
        dev = runner.device
        self.rows = []
        for i, s in enumerate(sampling):
            gen = None
            if s.temperature > 0:
                gen = torch.Generator(device=dev)
                gen.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self.rows.append(_Row(first_request + i, s, gen, _HoldBack(s.stop)))
        self.requests = first_request + len(prompts)  # request ids handed out so far
        self.sampling = SamplingTensors(sampling, dev)
        self.plan = SteeringPlan(len(prompts), dev, runner.dtype)
        for r, items in enumerate(steering or []):
            for s in items:
                self.plan.add(r, s)
        self.state = bank.state(len(prompts)) if bank is not None and bank.size else None
        self.prompts = prompts
        self.prompt_aggregate: list[np.ndarray] | None = None
        self.cache = DynamicCache()
        self.batch = runner.batch(prompts)
        self.mask = self.batch["attention_mask"]
        self.next_tokens: torch.Tensor | None = None
        self.eos = _eos_ids(runner)
        # A batch joined into a running one shares its hook points; only the owner releases them.
        self._owns_hooks = hooked is None
        self._hooked: set = set() if hooked is None else hooked
        self._attach(bank.hook_points if self.state else [])
        self._attach(self.plan.hook_points)

    # ----------------------------------------------------------------- control between steps

    @property
    def done(self) -> bool:
        return not self.rows

    def active(self) -> list[int]:
        return [r.request for r in self.rows]

    def stop(self, request: int) -> None:
        """Drop a request from the batch now (client gone, policy block...)."""
        keep = [i for i, r in enumerate(self.rows) if r.request != request]
        if len(keep) != len(self.rows):
            self._select(keep)

    def steer(self, request: int, steering: Steering) -> None:
        """Switch steering on for one request from the next token on."""
        row = self._row_index(request)
        self._attach([steering.hook_point])
        self.plan.add(row, steering)

    @property
    def can_join(self) -> bool:
        """Whether new requests can join at a step boundary. The plain KV cache Generation builds
        (sliding windows are applied by the attention mask) can be left-padded; a cache with
        sliding-window or static layers could not, and its requests would join the next batch."""
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def join(self, prompts: list[Encoded], sampling: list[Sampling],
             steering: list[list[Steering]] | None = None) -> list[TokenEvent]:
        """Prefill new requests and merge them into this batch; returns their first tokens.

        Their request ids continue from `self.requests`. From the next step on they decode
        together with the running rows, in the same forward passes.
        """
        if not self.can_join:
            raise RuntimeError("this model's KV cache cannot take new rows mid-decode")
        newcomer = Generation(self.runner, prompts, sampling, self.bank, steering,
                              first_request=self.requests, hooked=self._hooked)
        self.requests = newcomer.requests
        events = newcomer.step()
        if not newcomer.done:
            self._absorb(newcomer)
        return events

    def _absorb(self, other: Generation) -> None:
        """Concatenate another batch's rows; the shorter KV cache is left-padded (masked out)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
            return torch.nn.functional.pad(t, pad) if missing else t

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, -2), left_pad(theirs.keys, -2)])
            mine.values = torch.cat([left_pad(mine.values, -2), left_pad(theirs.values, -2)])
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        if self.state is not None:
            self.state.extend(other.state)
        self.sampling.extend(other.sampling)
        self.plan.extend(other.plan)
        self.rows += other.rows

    def close(self) -> None:
        if self._owns_hooks:
            self.runner.release(self._hooked)
            self._hooked.clear()
        self.rows = []

    # ------------------------------------------------------------------------------ stepping

    def step(self) -> list[TokenEvent]:
        """Run one forward step (the prefill on the first call) and sample one token per row."""
        if self.done:
            return []
        first = self.next_tokens is None
        if first:
            batch = self.batch
            scored = batch["scored"]
        else:
            position = self.mask.sum(1, keepdim=True)  # real tokens so far = next position id
            self.mask = torch.cat([self.mask, torch.ones_like(position)], 1)
            batch = {"input_ids": self.next_tokens[:, None], "attention_mask": self.mask, "position_ids": position}
            scored = torch.ones_like(position, dtype=torch.bool)
        runner = self.runner
        runner.hook_pass = HookPass(bank_state=self.state, plan=self.plan, phase="prompt" if first else "generated")
        if self.state is not None:
            self.state.begin_step(*batch["input_ids"].shape)
        try:
            logits = runner.forward(batch, cache=self.cache)
        finally:
            runner.hook_pass = HookPass()
        tokens = sample(logits, self.sampling, [r.generator for r in self.rows])
        parts = [tokens.float()[:, None]]
        p, prompt_width = 0, 0
        if self.state is not None:
            agg = runner.update(self.state, scored, prompt=first).sigmoid()
            parts += [self.state.step_logits[:, -1].sigmoid(), agg]
            p = agg.shape[1]
            if first and self.bank.explain_tokens:  # every prompt token's scores, once, for explanations
                parts.append(self.state.step_logits.sigmoid().flatten(1))
                prompt_width = self.state.step_logits.shape[1]
            if self.state.latents is not None:
                parts.append(self.state.latents.flatten(1))
        host = torch.cat(parts, 1).cpu().numpy()  # the one host transfer of this step
        self.next_tokens = tokens
        rows, end = len(host), 1 + 2 * p + prompt_width * p
        prompt = host[:, 1 + 2 * p : end].reshape(rows, prompt_width, p) if prompt_width else None
        latents = None
        if self.state is not None and self.state.latents is not None:
            latents = host[:, end:].reshape(rows, *self.state.latents.shape[1:])
        if first and self.state is not None:
            self.prompt_aggregate = [host[i, 1 + p : 1 + 2 * p] for i in range(rows)]
        return self._emit(host[:, 0], host[:, 1 : 1 + p], host[:, 1 + p : 1 + 2 * p], prompt, latents)

    def __iter__(self):
        try:
            while not self.done:
                yield self.step()
        finally:
            self.close()

    # ------------------------------------------------------------------------------ helpers

    def _emit(self, tokens: np.ndarray, probs: np.ndarray, aggregate: np.ndarray, prompt: np.ndarray | None,
              latents: np.ndarray | None) -> list[TokenEvent]:
        """Events from the step's host copy; `prompt` [rows, width, detectors] only after the prefill."""
        events, keep = [], []
        for i, row in enumerate(self.rows):
            tok = int(tokens[i])
            row.ids.append(tok)
            eos = tok in self.eos
            text, hit = row.stops.feed("" if eos else self._decode(row))
            reason = None
            if eos or hit:
                reason = "stop"
            elif len(row.ids) >= row.sampling.max_new_tokens:
                reason = "length"
            if reason and not hit:
                text += row.stops.held  # no stop string can complete any more
            prompt_probs = None
            if prompt is not None:  # the prefill: rows are still in prompt order
                e = self.prompts[i]
                prompt_probs = prompt[i, prompt.shape[1] - len(e) + e.score_from :]
            events.append(TokenEvent(row.request, len(row.ids) - 1, tok, text, probs[i], aggregate[i], reason,
                                     prompt_probs, latents[i] if latents is not None else None))
            if reason is None:
                keep.append(i)
        if len(keep) != len(self.rows):
            self._select(keep)
        return events

    def _decode(self, row: _Row) -> str:
        """Incremental detokenisation that never splits a multi-byte character."""
        tok = self.runner.tokenizer
        prefix = tok.decode(row.ids[row.prefix_offset : row.read_offset], skip_special_tokens=True)
        full = tok.decode(row.ids[row.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)
            return full[len(prefix) :]
        return ""

    def _select(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.close()
            return
        idx = torch.tensor(keep, device=self.runner.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
        if self.next_tokens is not None:
            self.next_tokens = self.next_tokens.index_select(0, idx)
        if self.state is not None:
            self.state.select(idx)
        self.sampling.select(idx)
        self.plan.select(keep)
        self._trim()

    def _trim(self) -> None:
        """Drop the leading KV columns no remaining row attends to. Joined rows are left-padded to
        the widest row; without this a batch that never drains (steady traffic keeps joining it)
        would grow by one column per step forever, in memory and in attention cost. Positions
        come from the mask's counts, so cutting all-padding columns changes no result."""
        if not self.can_join:
            return
        start = int(self.mask.any(0).int().argmax())  # one host sync, only when rows leave
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]

    def _row_index(self, request: int) -> int:
        for i, r in enumerate(self.rows):
            if r.request == request:
                return i
        raise KeyError(f"request {request} is not running")

    def _attach(self, points) -> None:
        new = set(points) - self._hooked
        self.runner.acquire(new)
        self._hooked |= new


def complete(
    runner: ModelRunner,
    prompts: list[Encoded],
    sampling: list[Sampling],
    *,
    batch_size: int = 16,
    bank: DetectorBank | None = None,
    steering: list[Steering] | None = None,
    on_token: Callable[[int, TokenEvent], None] | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> tuple[list[str], np.ndarray | None]:
    """Offline generation: every prompt's completion, `batch_size` at a time in order (the same
    inputs give the same batches, so greedy runs repeat), `steering` on every row. With a `bank`,
    also each row's last running aggregate [prompts, detectors]. `on_token(prompt index, event)`
    sees every generated token."""
    from tqdm.auto import tqdm

    texts = [""] * len(prompts)
    aggregates = np.zeros((len(prompts), bank.size)) if bank is not None else None
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            steer = None if steering is None else [steering] * len(prompts[rows])
            for events in Generation(runner, prompts[rows], sampling[rows], bank, steer):
                for e in events:
                    texts[start + e.row] += e.text
                    if aggregates is not None:
                        aggregates[start + e.row] = e.aggregate
                    if on_token is not None:
                        on_token(start + e.row, e)
            bar.update(len(prompts[rows]))
    return texts, aggregates


class _HoldBack:
    """Withholds decoded text while it could still be the start of a stop string.

    A KMP automaton per stop string tracks the longest suffix of the output that begins it, so a
    token costs O(its characters) per stop string however long the completion grows, and the held
    text is never longer than the longest stop string.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.borders = [_borders(s) for s in stops]
        self.matched = [0] * len(stops)
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Take a decoded piece; return the text that can no longer begin a stop string, and whether
        one completed (the text then ends right before it; it and anything after are dropped)."""
        text = self.held + piece
        for end, ch in enumerate(piece, len(self.held) + 1):
            hit = 0
            for j, s in enumerate(self.stops):
                m = self.matched[j]
                while m and s[m] != ch:
                    m = self.borders[j][m - 1]
                m = self.matched[j] = m + (s[m] == ch)
                if m == len(s):
                    hit = max(hit, m)  # of stops ending here, the longest starts first
            if hit:
                return text[: end - hit], True
        keep = max(self.matched, default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False


def _borders(s: str) -> list[int]:
    """KMP failure table: b[i] is the length of the longest proper prefix of s[: i + 1] that is
    also its suffix."""
    b, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = b[k - 1]
        k += s[i] == s[k]
        b[i] = k
    return b


def _eos_ids(runner: ModelRunner) -> set[int]:
    ids = {runner.tokenizer.eos_token_id}
    cfg = getattr(runner.model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if i is not None}


class SamplingTensors:
    """Per-row sampling parameters kept on the device, so a decode step copies nothing to it."""

    def __init__(self, params: list[Sampling], device):
        self.any_sampling = any(p.temperature > 0 for p in params)
        self.temps = torch.tensor([[p.temperature or 1.0] for p in params], device=device)
        self.top_k = torch.tensor([[p.top_k] for p in params], device=device)
        self.top_p = torch.tensor([[p.top_p] for p in params], device=device)
        self.greedy = torch.tensor([p.temperature == 0 for p in params], device=device)

    FIELDS = ("temps", "top_k", "top_p", "greedy")

    def select(self, idx: torch.Tensor) -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name).index_select(0, idx))

    def extend(self, other: SamplingTensors) -> None:
        self.any_sampling = self.any_sampling or other.any_sampling
        for name in self.FIELDS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))


def sample(logits: torch.Tensor, params: SamplingTensors, generators: list) -> torch.Tensor:
    """Per-row greedy / temperature / top-k / top-p sampling, on the device."""
    greedy = logits.argmax(-1)
    if not params.any_sampling:
        return greedy
    x, order = (logits.float() / params.temps).sort(-1, descending=True)
    rank = torch.arange(x.shape[1], device=x.device)
    top_k = torch.where(params.top_k > 0, params.top_k, x.shape[1])
    probs = x.softmax(-1)
    drop = (rank >= top_k) | ((probs.cumsum(-1) - probs) > params.top_p)
    x = x.masked_fill(drop, -torch.inf)
    noise = torch.stack([torch.rand(x.shape[1], generator=g, device=x.device) for g in generators])
    choice = (x - torch.log(-torch.log(noise.clamp(min=1e-20)))).argmax(-1, keepdim=True)
    sampled = order.gather(1, choice)[:, 0]
    return torch.where(params.greedy, greedy, sampled)
