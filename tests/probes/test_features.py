"""Feature search on a tiny random llama: a latent built to fire on a marker token must rank first, and
every statistic and top context must equal a direct computation (one unpadded forward per example)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monitor.sae import SAE, ReLUSAE
from probes.features import LatentStats, NoReadableTokens, rank, search_features
from tests.monitor.sae import random_sae
from tests.tiny import tiny_runner

POINT = "blocks.1.resid_post"
MARKER, MARKER_LATENT = "~", 7
WORDS = "the cat sat on a mat and ran to see big red dog".split()


def texts(n: int, marker: bool, seed: int) -> list[str]:
    """Random six-word texts; with `marker`, the marker token somewhere inside each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = list(rng.choice(WORDS, 6))
        if marker:
            words.insert(int(rng.integers(1, 6)), MARKER)
        out.append(" ".join(words))
    return out


def readable(runner, enc) -> list[int]:
    """The spec, independently of probes.features: scored tokens that are not special tokens."""
    special = set(runner.tokenizer.all_special_ids)
    return [t for t in range(enc.score_from, len(enc)) if enc.ids[t] not in special]


def hidden(runner, items) -> list[tuple[list[int], torch.Tensor]]:
    """Per example, one unpadded forward: its readable token positions and their activations at POINT."""
    out = []
    for enc in items:
        with torch.no_grad():
            states = runner.model(torch.tensor([enc.ids]), output_hidden_states=True).hidden_states
        keep = readable(runner, enc)
        out.append((keep, states[2][0, keep]))  # hidden_states[layer + 1]: the residual after block `layer`
    return out


def encode(sae: SAE, states) -> list[tuple[list[int], np.ndarray]]:
    """The direct computation: latent activations [tokens, d_sae] of each example's readable tokens."""
    return [(keep, sae.encode(h).numpy()) for keep, h in states]


def marker_sae(runner, items, states) -> SAE:
    """A random ReLU SAE whose latent MARKER_LATENT reads the marker's direction, with its bias halfway
    between the marker tokens' projections and everything else's, so it fires on the marker alone."""
    base = random_sae("relu", d_in=runner.d_model, d_sae=48, point=POINT)
    marker = runner.tokenizer.convert_tokens_to_ids(MARKER)
    is_marker = torch.tensor([enc.ids[t] == marker for enc, (keep, _) in zip(items, states) for t in keep])
    h = torch.cat([h for _, h in states])
    u = h[is_marker].mean(0) - h[~is_marker].mean(0)
    u = 10 * u / u.norm()
    low, high = float((h[is_marker] @ u).min()), float((h[~is_marker] @ u).max())
    assert low > high, "the marker is not linearly separable at this hook point"
    w, b = base.W_enc.clone(), base.b_enc.clone()
    w[:, MARKER_LATENT], b[MARKER_LATENT] = u, -(low + high) / 2
    return ReLUSAE(base.config, {**base.tensors, "W_enc": w, "b_enc": b})


@pytest.fixture(scope="module")
def setup():
    """(runner, marker SAE, positives, negatives, readable hidden states of positives + negatives)."""
    runner = tiny_runner("llama")
    pos = [runner.encode(text=t, chat=True) for t in texts(10, True, seed=1)]
    neg = [runner.encode(text=t, chat=True) for t in texts(12, False, seed=2)]
    states = hidden(runner, pos + neg)
    return runner, marker_sae(runner, pos + neg, states), pos, neg, states


def expected_stats(acts, n_pos: int, d_sae: int) -> dict[str, np.ndarray]:
    maxima = np.stack([a.max(0) for _, a in acts]).astype(np.float64)
    y = np.arange(len(acts)) < n_pos
    p, n = maxima[y], maxima[~y]
    pooled = np.sqrt(((len(p) - 1) * p.var(0, ddof=1) + (len(n) - 1) * n.var(0, ddof=1)) / (len(y) - 2))
    tokens = [np.concatenate([a for (_, a), side in zip(acts, y) if side == s]) for s in (True, False)]
    return {
        "auroc": np.array([roc_auc_score(y, maxima[:, j]) for j in range(d_sae)]),
        "cohens_d": np.divide(p.mean(0) - n.mean(0), pooled, out=np.zeros(d_sae), where=pooled > 0),
        "fire_rate_pos": (p > 0).mean(0), "fire_rate_neg": (n > 0).mean(0),
        "token_rate_pos": (tokens[0] > 0).mean(0), "token_rate_neg": (tokens[1] > 0).mean(0),
        "mean_max_pos": p.mean(0), "mean_max_neg": n.mean(0), "max_activation": maxima.max(0),
    }


def test_the_marker_latent_ranks_first_and_fires_on_the_marker_only(setup):
    runner, sae, pos, neg, _ = setup
    result = search_features(runner, sae, pos, neg, top=5, contexts=4)
    first = result.latents[0]
    assert first.latent == MARKER_LATENT
    assert first.auroc == 1.0 and first.fire_rate_pos == 1.0 and first.fire_rate_neg == 0.0
    assert first.mean_max_neg == 0.0 and first.cohens_d > 3
    assert len(first.top_tokens) == 4
    assert {(t.text, t.set) for t in first.top_tokens} == {(MARKER, "positive")}
    assert sum(first.histogram_counts) == len(pos)  # one marker token per positive example
    assert result.hook_point == POINT and result.n_examples == (10, 12) and result.model == "tiny-llama"
    assert result.n_tokens == tuple(sum(len(readable(runner, e)) for e in s) for s in (pos, neg))


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk"])
def test_statistics_and_ranking_match_a_direct_computation(setup, kind):
    runner, marked, pos, neg, states = setup
    sae = marked if kind == "relu" else random_sae(kind, d_in=runner.d_model, point=POINT,
                                                   **({"k": 6} if kind == "topk" else {}))
    result = search_features(runner, sae, pos, neg, top=sae.d_sae, contexts=0, batch_size=5)
    want = expected_stats(encode(sae, states), len(pos), sae.d_sae)
    assert [latent.latent for latent in result.latents] == list(rank(want, "auroc"))
    for latent in result.latents:
        for key, values in want.items():
            assert getattr(latent, key) == pytest.approx(values[latent.latent], rel=1e-4, abs=1e-6), key
        fired = latent.token_rate_pos * result.n_tokens[0] + latent.token_rate_neg * result.n_tokens[1]
        assert sum(latent.histogram_counts) == round(fired)


def test_sort_by_effect_size(setup):
    runner, sae, pos, neg, _ = setup
    result = search_features(runner, sae, pos, neg, top=10, contexts=0, sort="d")
    d = [abs(latent.cohens_d) for latent in result.latents]
    assert d == sorted(d, reverse=True)
    with pytest.raises(ValueError, match="unknown sort 'x'; use auroc or d"):
        search_features(runner, sae, pos, neg, sort="x")


@pytest.mark.parametrize("batch_size", [1, 7])
def test_top_contexts_are_the_highest_activations_whatever_the_batches(setup, batch_size):
    runner, sae, pos, neg, states = setup
    items, k, window = pos + neg, 3, 2
    acts = encode(sae, states)
    result = search_features(runner, sae, pos, neg, top=6, contexts=k, window=window, batch_size=batch_size)
    for latent in result.latents:
        j = latent.latent
        every = [(float(a[r, j]), i, t) for i, (keep, a) in enumerate(acts) for r, t in enumerate(keep) if a[r, j] > 0]
        every.sort(key=lambda x: (-x[0], x[1], x[2]))
        assert len(latent.top_tokens) == min(k, len(every))
        for top, (value, i, t) in zip(latent.top_tokens, every):
            side = "positive" if i < len(pos) else "negative"
            assert (top.set, top.example, top.token) == (side, i - (len(pos) if i >= len(pos) else 0), t)
            assert top.activation == pytest.approx(value, rel=1e-4)
            enc, (keep, a) = items[i], acts[i]
            lo = max(0, t - window)
            assert top.at == t - lo and len(top.context) == min(len(enc), t + window + 1) - lo
            assert top.context[top.at] == (top.text, pytest.approx(value, rel=1e-4))
            for pos_in_ctx, (_, activation) in enumerate(top.context):
                tok = lo + pos_in_ctx
                if tok in keep:
                    assert activation == pytest.approx(float(a[keep.index(tok), j]), rel=1e-4, abs=1e-6)
                else:
                    assert activation is None  # special or before the scored turn: not read
    spelled = "".join(text for text, _ in result.latents[0].top_tokens[0].context)
    first = result.latents[0].top_tokens[0]
    assert spelled in items[first.example].text


def test_json_shape(setup):
    runner, sae, pos, neg, _ = setup
    result = search_features(runner, sae, pos, neg, top=3, contexts=2, window=1)
    rows = json.loads(json.dumps([latent.to_dict() for latent in result.latents]))
    assert len(rows) == 3
    assert {"latent", "auroc", "cohens_d", "fire_rate_pos", "fire_rate_neg", "token_rate_pos", "token_rate_neg",
            "mean_max_pos", "mean_max_neg", "max_activation", "histogram_edges", "histogram_counts",
            "top_tokens"} == set(rows[0])
    top = rows[0]["top_tokens"][0]
    assert set(top) == {"activation", "set", "example", "token", "text", "at", "context"}
    assert set(top["context"][0]) == {"text", "activation"} and len(top["context"]) <= 3
    constant = LatentStats(0, 1.0, float("inf"), 1, 0, 1, 0, 1, 0, 1).to_dict()
    assert constant["cohens_d"] is None  # JSON has no infinity


def test_an_sae_that_does_not_fit_the_model_is_refused_naming_both(setup):
    runner, _, pos, neg, _ = setup
    with pytest.raises(ValueError, match=r"reads blocks\.1\.resid_post activations of size d_in=16, but tiny-llama "
                                         r"has d_model=32 there"):
        search_features(runner, random_sae("relu", d_in=16, point=POINT), pos, neg)
    with pytest.raises(ValueError, match=r"reads blocks\.5\.mlp_out, but tiny-llama has blocks 0\.\.2$"):
        search_features(runner, random_sae("relu", d_in=32, point="blocks.5.mlp_out"), pos, neg)


def test_an_example_with_nothing_to_read_is_named(setup):
    runner, sae, pos, neg, _ = setup
    empty = runner.encode(text="<|im_end|>")  # raw text: one special token
    with pytest.raises(NoReadableTokens) as e:
        search_features(runner, sae, pos, [*neg, empty])
    assert (e.value.side, e.value.index) == ("negative", len(neg))
