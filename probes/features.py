"""Feature search: which SAE latents fire differently on a positive and a negative set of examples.

Two streaming passes through the serving hooks (`ModelRunner.attached`), each stopping after the
SAE's hook point. The first encodes every readable token with the whole SAE and keeps, per
example, each latent's max activation (the unit every per-example statistic uses) and per side
the number of tokens each latent fires on: memory is examples x latents, never tokens x latents.
Latents are ranked on those maxima. The second pass encodes only the top latents, for their
top-activating tokens (a bounded heap of `contexts` per latent) and a histogram over the tokens
they fire on. Readable tokens are those detectors aggregate (`Encoded.score_from` on: a chat
input's last user turn) minus special tokens (BOS, chat markers). Nothing is sampled, and ties go to
the earlier example and token, so batch size and order do not change what is kept.
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from matplotlib.figure import Figure
from scipy.stats import mannwhitneyu

from monitor.runner import Encoded, HookPass, ModelRunner
from monitor.sae import SAE
from probes.report import CHECK_JS, CSS, png_base64, score_colour, text_colour

SORTS = {  # --sort: how latents are ranked (ties broken by the other key, then by latent index)
    "auroc": "|AUROC - 0.5| of per-example max activation (rank-based: scale-free, robust to outliers)",
    "d": "|Cohen's d| of per-example max activation",
}
SIDES = ("positive", "negative")
CHUNK_ELEMENTS = 1 << 24  # tokens x latents encoded at once: 64 MiB of float32
TEMPLATES = Path(__file__).parent / "templates"


class NoReadableTokens(ValueError):
    """An example with no token left to read; `side` and `index` say which, for a file:line message."""

    def __init__(self, side: str, index: int):
        super().__init__("no tokens left to read once special tokens (and any part before the scored turn) "
                         "are dropped; give it some text")
        self.side, self.index = side, index


@dataclass(frozen=True)
class TopToken:
    """One of a latent's highest activations, with `context` tokens around it (`at` is this token's place)."""

    activation: float
    set: str  # "positive" or "negative"
    example: int  # index of the example in its set (0-based, in file order)
    token: int  # index of the token in the encoded input
    text: str
    at: int
    context: list[tuple[str, float | None]]  # (text, activation); None: a token the search does not read


@dataclass
class LatentStats:
    """One latent. Firing means activation > 0; means are over per-example max activations."""

    latent: int
    auroc: float  # P(max on a positive > max on a negative), ties counting half
    cohens_d: float  # (mean_max_pos - mean_max_neg) / pooled SD; ±inf if the SD is 0 but the means differ
    fire_rate_pos: float  # fraction of positive examples where the latent fires on some token
    fire_rate_neg: float
    token_rate_pos: float  # fraction of positive tokens it fires on
    token_rate_neg: float
    mean_max_pos: float
    mean_max_neg: float
    max_activation: float
    histogram_edges: list[float] = field(default_factory=list)  # over firing tokens; empty if it never fires
    histogram_counts: list[int] = field(default_factory=list)
    top_tokens: list[TopToken] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: contexts as objects, non-finite numbers as null."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not np.isfinite(v):
                d[k] = None
        d["top_tokens"] = [{**t, "context": [{"text": s, "activation": a} for s, a in t["context"]]}
                           for t in d["top_tokens"]]
        return d


@dataclass
class FeatureSearch:
    """The header of a search (what was compared) and its top latents, best first."""

    sae: str
    sae_kind: str
    d_in: int
    d_sae: int
    hook_point: str
    model: str
    positive: str
    negative: str
    n_examples: tuple[int, int]  # positive, negative
    n_tokens: tuple[int, int]  # readable tokens, positive, negative
    sort: str
    latents: list[LatentStats]


# ------------------------------------------------------------------------------ the search


def check_sae(runner: ModelRunner, sae: SAE) -> None:
    """The SAE must read a hook point this model has, at the model's width (ValueError naming both)."""
    point = sae.hook_point
    if not 0 <= point.layer < runner.hooks.num_layers:
        raise ValueError(f"{sae.source}: the SAE reads {point}, but {runner.model_id} has blocks "
                         f"0..{runner.hooks.num_layers - 1}")
    if sae.d_in != runner.d_model:
        raise ValueError(f"{sae.source}: the SAE reads {point} activations of size d_in={sae.d_in}, but "
                         f"{runner.model_id} has d_model={runner.d_model} there")


def readable(runner: ModelRunner, enc: Encoded) -> np.ndarray:
    """Which tokens of an input the search reads: the scored ones that are not special tokens."""
    special = np.isin(enc.ids, runner.tokenizer.all_special_ids)
    return (np.arange(len(enc)) >= enc.score_from) & ~special


def pieces(runner: ModelRunner, enc: Encoded) -> list[str]:
    """Each token's text, cut at token starts so the pieces spell the input (decoded where that is empty)."""
    starts = [a for a, _ in enc.offsets] + [enc.offsets[-1][1]]
    return [enc.text[a:b] or runner.tokenizer.decode([i]) for i, a, b in zip(enc.ids, starts, starts[1:])]


def _batches(runner: ModelRunner, sae: SAE, items: Sequence[Encoded], masks: list[np.ndarray], batch_size: int,
             desc: str, progress: bool):
    """Per batch: (item indices, readable mask [b, width] on the device, activations at the SAE's hook point)."""
    point = sae.hook_point
    with runner.attached([point]):
        for idx, b in runner.batches(items, batch_size, desc, progress):
            seen: dict[str, torch.Tensor] = {}
            runner.hook_pass = HookPass(capture={point: lambda h: seen.setdefault("h", h)}, stop_at=point)
            runner.forward(b, logits=False)
            width = b["input_ids"].shape[1]
            mask = np.zeros((len(idx), width), bool)
            for r, i in enumerate(idx):
                mask[r, width - len(masks[i]):] = masks[i]
            yield idx, torch.from_numpy(mask).to(runner.device), seen["h"]


def _chunks(n_tokens: int, width: int):
    step = max(1, CHUNK_ELEMENTS // width)
    return (slice(s, s + step) for s in range(0, n_tokens, step))


def _scan(runner, sae, items, masks, sides, batch_size, progress):
    """Pass 1: per-example max activation of every latent [n, d_sae], and firing tokens per side [2, d_sae]."""
    maxima = np.zeros((len(items), sae.d_sae), np.float32)
    fired = torch.zeros(2, sae.d_sae, device=runner.device)
    for idx, mask, h in _batches(runner, sae, items, masks, batch_size, "scanning latents", progress):
        rows, cols = mask.nonzero(as_tuple=True)
        x, side = h[rows, cols], torch.as_tensor(sides[idx], device=runner.device)[rows]
        peak = torch.zeros(len(idx), sae.d_sae, device=runner.device)  # activations are >= 0 for every kind
        for s in _chunks(len(rows), sae.d_sae):
            a = sae.encode(x[s]).float()
            peak.scatter_reduce_(0, rows[s][:, None].expand_as(a), a, "amax")
            fired.index_add_(0, side[s], (a > 0).float())
        maxima[idx] = peak.cpu().numpy()
    return maxima, fired.cpu().numpy()


def _statistics(maxima: np.ndarray, sides: np.ndarray, fired: np.ndarray, n_tokens: tuple[int, int]):
    """Per latent: AUROC of the per-example maxima (Mann-Whitney U / (n_pos n_neg), which is sklearn's
    roc_auc_score, for all latents in one ranking instead of one call per latent), Cohen's d, rates, means."""
    pos, neg = maxima[sides == 0].astype(np.float64), maxima[sides == 1].astype(np.float64)
    u = mannwhitneyu(pos, neg, axis=0, method="asymptotic", use_continuity=False).statistic
    diff = pos.mean(0) - neg.mean(0)
    squares = ((pos - pos.mean(0)) ** 2).sum(0) + ((neg - neg.mean(0)) ** 2).sum(0)
    pooled = np.sqrt(squares / max(len(pos) + len(neg) - 2, 1))
    constant = np.where(diff == 0, 0.0, np.copysign(np.inf, diff))
    return {"auroc": u / (len(pos) * len(neg)), "cohens_d": np.divide(diff, pooled, out=constant, where=pooled > 0),
            "fire_rate_pos": (pos > 0).mean(0), "fire_rate_neg": (neg > 0).mean(0),
            "token_rate_pos": fired[0] / n_tokens[0], "token_rate_neg": fired[1] / n_tokens[1],
            "mean_max_pos": pos.mean(0), "mean_max_neg": neg.mean(0), "max_activation": maxima.max(0).astype(float)}


def rank(stats: dict[str, np.ndarray], sort: str) -> np.ndarray:
    """Latent indices best first by `SORTS[sort]`: a latent far from chance either way is a detector
    (AUROC < 0.5, d < 0: it fires more on the negatives)."""
    auc = np.round(np.abs(stats["auroc"] - 0.5), 12)  # AUROC ties are common (n_pos n_neg steps): keep them ties
    d = np.abs(stats["cohens_d"])
    first, second = {"auroc": (auc, d), "d": (d, auc)}[sort]
    return np.lexsort((np.arange(len(auc)), -second, -first))


def _collect(runner, sae, items, masks, n_pos, chosen, peaks, contexts, window, bins, batch_size, progress):
    """Pass 2, on the chosen latents only: a heap of the `contexts` highest activations of each (ties go to
    the earlier example and token), and histograms of their firing tokens on bins fixed by pass 1's maxima."""
    heaps: list[list] = [[] for _ in chosen]
    counts = np.zeros((len(chosen), bins), np.int64)
    edges = [np.linspace(0, p, bins + 1) for p in peaks]
    lengths = np.array([len(e) for e in items])
    latents = torch.as_tensor(chosen, device=runner.device)
    for idx, mask, h in _batches(runner, sae, items, masks, batch_size, "collecting contexts", progress):
        rows, cols = mask.nonzero(as_tuple=True)
        x = h[rows, cols]
        acts = torch.zeros(*mask.shape, len(chosen), device=runner.device)
        for s in _chunks(len(rows), sae.d_sae):
            acts[rows[s], cols[s]] = sae.encode_latents(x[s], latents).float()
        acts, rows, cols = acts.cpu().numpy(), rows.cpu().numpy(), cols.cpu().numpy()
        item = np.asarray(idx)[rows]
        token = cols - (mask.shape[1] - lengths[item])
        for j, heap in enumerate(heaps):
            v = acts[rows, cols, j]
            fire = v > 0
            if peaks[j] > 0:
                counts[j] += np.histogram(np.minimum(v[fire], peaks[j]), bins=edges[j])[0]
            for k in np.flatnonzero(fire)[np.lexsort((token[fire], item[fire], -v[fire]))][:contexts]:
                key = (float(v[k]), -int(item[k]), -int(token[k]))
                if len(heap) == contexts and key <= heap[0][:3]:
                    break  # the rest are lower still
                row = acts[rows[k], mask.shape[1] - lengths[item[k]]:, j]
                top = _top_token(runner, items[item[k]], masks[item[k]], row, int(item[k]), int(token[k]), n_pos,
                                 window)
                (heapq.heappush if len(heap) < contexts else heapq.heapreplace)(heap, (*key, top))
    return [[e[3] for e in sorted(heap, reverse=True)] for heap in heaps], edges, counts


def _top_token(runner, enc: Encoded, mask: np.ndarray, acts: np.ndarray, item: int, token: int, n_pos: int,
               window: int) -> TopToken:
    """Item `item`'s token `token` with `window` tokens each side; `acts` is the latent over the item's tokens."""
    text = pieces(runner, enc)
    lo, hi = max(0, token - window), min(len(enc), token + window + 1)
    context = [(text[t], float(acts[t]) if mask[t] else None) for t in range(lo, hi)]
    side = int(item >= n_pos)
    return TopToken(float(acts[token]), SIDES[side], item - n_pos * side, token, text[token], token - lo, context)


def search_features(
    runner: ModelRunner,
    sae: SAE,
    positive: Sequence[Encoded],
    negative: Sequence[Encoded],
    *,
    top: int = 20,
    contexts: int = 8,
    window: int = 8,
    sort: str = "auroc",
    bins: int = 30,
    batch_size: int = 16,
    names: tuple[str, str] = SIDES,
    progress: bool = False,
) -> FeatureSearch:
    """Rank the SAE's latents by how differently they fire on `positive` and `negative` (see the module
    docstring); for the `top` best keep their `contexts` highest activations with `window` tokens each side."""
    check_sae(runner, sae)
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}; use {' or '.join(SORTS)}")
    if not positive or not negative:
        raise ValueError("feature search needs at least one positive and one negative example")
    items = [*positive, *negative]
    sides = np.r_[np.zeros(len(positive), int), np.ones(len(negative), int)]
    masks = [readable(runner, e) for e in items]
    for i, m in enumerate(masks):
        if not m.any():
            raise NoReadableTokens(SIDES[sides[i]], i - len(positive) * sides[i])
    n_tokens = (int(sum(m.sum() for m in masks[: len(positive)])), int(sum(m.sum() for m in masks[len(positive):])))
    sae = sae.to(runner.device)
    with torch.inference_mode():
        maxima, fired = _scan(runner, sae, items, masks, sides, batch_size, progress)
        stats = _statistics(maxima, sides, fired, n_tokens)
        chosen = rank(stats, sort)[:top]
        peaks = stats["max_activation"][chosen]
        tops, edges, counts = _collect(runner, sae, items, masks, len(positive), chosen, peaks, contexts, window, bins,
                                       batch_size, progress)
    latents = []
    for j, latent in enumerate(chosen):
        fires = peaks[j] > 0
        latents.append(LatentStats(int(latent), **{k: float(v[latent]) for k, v in stats.items()},
                                   histogram_edges=edges[j].tolist() if fires else [],
                                   histogram_counts=counts[j].tolist() if fires else [], top_tokens=tops[j]))
    return FeatureSearch(sae.source, sae.kind, sae.d_in, sae.d_sae, str(sae.hook_point), runner.model_id, *names,
                         (len(positive), len(negative)), n_tokens, sort, latents)


# ------------------------------------------------------------------------------------ html


def histogram_png(latent: LatentStats) -> str | None:
    """The latent's activations over the tokens it fires on, as base64 PNG (None: it never fires)."""
    if not latent.histogram_counts:
        return None
    fig = Figure(figsize=(3.6, 1.7), layout="constrained")
    ax = fig.subplots()
    e = np.asarray(latent.histogram_edges)
    ax.bar(e[:-1], latent.histogram_counts, width=np.diff(e), align="edge", color="#d95f02", edgecolor="none")
    ax.set_xlabel("activation (firing tokens)", fontsize=8)
    ax.set_ylabel("tokens", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    return png_base64(fig)


def _heat(activation: float, peak: float) -> str:
    """A token's style: background by activation relative to the latent's highest (the report's colours)."""
    x = activation / peak if peak > 0 else 0.0
    return f"background:{score_colour(x)};color:{text_colour(x)}"


def render_html(search: FeatureSearch) -> str:
    """The whole page as one string: latent cards, everything inline (opens with no network)."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["heat"] = _heat
    return env.get_template("features.html.j2").render(
        s=search, sort_rule=SORTS[search.sort], css=CSS, check_js=CHECK_JS, histogram=histogram_png,
        stamp=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_html(path: str | Path, search: FeatureSearch) -> Path:
    path = Path(path)
    path.write_text(render_html(search), encoding="utf-8")
    return path
