"""The detector bank: fused scoring, padding invariance, aggregation semantics."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.bank import Detector, DetectorBank
from monitor.domain import HookPoint
from probes.kinds.base import ScoringHead
from tests.tiny import tiny_runner

PROMPTS = [
    "Hi.",
    "Tell me a story about a lighthouse keeper who finds a map.",
    "How do volcanoes form, and why do some erupt explosively?",
    "ok",
]


def affine(d, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return ScoringHead(torch.randn(d, 1, generator=g) * scale, torch.randn(1, generator=g) * 0.1)


def mlp(d, seed, hidden=8):
    g = torch.Generator().manual_seed(seed)
    return ScoringHead(torch.randn(d, hidden, generator=g) * 0.3, torch.randn(hidden, generator=g) * 0.1,
                       torch.randn(hidden, generator=g), 0.05)


def detectors(d, specs):
    return [Detector(f"det{i}", "1", HookPoint.parse(point), head, **agg) for i, (point, head, agg) in enumerate(specs)]


AGGS = [dict(aggregation="last"), dict(aggregation="mean"), dict(aggregation="max"),
        dict(aggregation="ema", alpha=0.3), dict(aggregation="rolling_max", window=4),
        dict(aggregation="max_rolling_mean", window=3)]


@pytest.fixture(scope="module")
def runner():
    return tiny_runner("llama")


@pytest.fixture(scope="module")
def bank(runner):
    d = runner.d_model
    specs = [("blocks.1.resid_post", affine(d, i), agg) for i, agg in enumerate(AGGS)]
    specs += [("blocks.2.resid_pre", mlp(d, 9), dict(aggregation="mean")), ("blocks.0.mlp_out", affine(d, 7), AGGS[3])]
    return DetectorBank(detectors(d, specs))


def test_prompt_scored_alone_equals_scored_in_a_left_padded_batch(runner, bank):
    """Mixed lengths in one batch must not move any score (fp32, tolerance 1e-5)."""
    items = [runner.encode(p, chat=True) for p in PROMPTS]
    together = runner.score(items, bank, batch_size=len(items), token_scores=True)
    for item, joint in zip(items, together):
        alone = runner.score([item], bank, token_scores=True)[0]
        np.testing.assert_allclose(joint.probs, alone.probs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(joint.token_probs, alone.token_probs, rtol=0, atol=1e-5)


def test_aggregates_match_a_reference_over_token_scores(runner, bank):
    items = [runner.encode(p, chat=True) for p in PROMPTS]
    for res in runner.score(items, bank, batch_size=4, token_scores=True):
        logit = np.log(res.token_probs) - np.log1p(-res.token_probs)
        expect = [logit[-1, 0], logit[:, 1].mean(), logit[:, 2].max(), ema(logit[:, 3], 0.3), logit[-4:, 4].max(),
                  max_rolling_mean(logit[:, 5], 3), logit[:, 6].mean(), ema(logit[:, 7], 0.3)]
        np.testing.assert_allclose(res.probs, 1 / (1 + np.exp(-np.array(expect))), atol=1e-4)


def max_rolling_mean(x, w):
    if len(x) < w:
        return x.mean()
    return max(x[i - w:i].mean() for i in range(w, len(x) + 1))


def ema(x, alpha):
    value, weight = 0.0, 0.0
    for v in x:
        value = (1 - alpha) * value + alpha * v
        weight = (1 - alpha) * weight + alpha
    return value / weight


def test_early_stop_gives_the_same_scores_as_a_full_forward(runner, bank):
    items = [runner.encode(p, chat=True) for p in PROMPTS]
    early = runner.score(items, bank, batch_size=4)
    full = runner.score(items, bank, batch_size=4, early_stop=False)
    for a, b in zip(early, full):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)


def test_64_probes_on_one_hook_point_cost_one_matmul(runner, monkeypatch):
    d = runner.d_model
    bank = DetectorBank(detectors(d, [("blocks.1.resid_post", affine(d, i), AGGS[i % len(AGGS)]) for i in range(64)]))
    assert len(bank.groups) == 1
    calls = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = runner.score([runner.encode("count my kernels", chat=True)], bank)
    assert len(calls) == 1 and res[0].probs.shape == (64,)


def test_mlp_probes_cost_two_matmuls_beside_the_affine_one_and_match_the_reference_head(runner, monkeypatch):
    d = runner.d_model
    heads = [mlp(d, 1), affine(d, 2), mlp(d, 3, hidden=4), affine(d, 4)]
    bank = DetectorBank(detectors(d, [("blocks.1.resid_post", h, AGGS[1]) for h in heads]))
    point = HookPoint.parse("blocks.1.resid_post")
    x = torch.randn(2, 5, d)
    out = torch.zeros(2, 5, len(heads))
    calls = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    bank.groups[point].record(x, out)
    assert len(calls) == 3  # one for both affine heads, two for both MLP heads
    expect = torch.stack([h.logits(x) for h in heads], -1)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_bank_refuses_duplicate_ids_and_bad_aggregations(runner):
    d = runner.d_model
    with pytest.raises(ValueError, match="duplicate"):
        DetectorBank([Detector("a", "1", HookPoint.parse("blocks.0.resid_post"), affine(d, 0))] * 2)
    with pytest.raises(ValueError, match="alpha"):
        Detector("a", "1", HookPoint.parse("blocks.0.resid_post"), affine(d, 0), aggregation="ema")


def test_a_bank_of_one_aggregation_matches_the_same_probe_in_a_mixed_bank(runner, bank):
    """Banks keep only the statistics their detectors use; the shortcut must not change scores."""
    mean_only = DetectorBank([bank.detectors[1], bank.detectors[6]])
    assert mean_only.kinds == ["mean"]
    items = [runner.encode(p, chat=True) for p in PROMPTS]
    mixed = runner.score(items, bank, batch_size=4)
    alone = runner.score(items, mean_only, batch_size=4)
    for a, b in zip(mixed, alone):
        np.testing.assert_allclose(a.probs[[1, 6]], b.probs, atol=1e-6)


def test_bank_refuses_detectors_that_encode_text_differently(runner):
    d = runner.d_model
    chat = Detector("c", "1", HookPoint.parse("blocks.0.resid_post"), affine(d, 0), input_format="chat")
    raw = Detector("r", "1", HookPoint.parse("blocks.0.resid_post"), affine(d, 1), input_format="raw")
    with pytest.raises(ValueError, match="c=chat, r=raw"):
        DetectorBank([chat, raw])


def reference(logits: np.ndarray, spec: dict) -> float:
    agg = spec["aggregation"]
    if agg == "last":
        return logits[-1]
    if agg == "mean":
        return logits.mean()
    if agg == "max":
        return logits.max()
    if agg == "ema":
        return ema(logits, spec["alpha"])
    if agg == "rolling_max":
        return logits[-spec["window"]:].max()
    return max_rolling_mean(logits, spec["window"])


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 3)), min_size=1, max_size=12),
       seed=st.integers(0, 2**16))
def test_streamed_aggregates_equal_the_reference_however_the_tokens_arrive(steps, seed):
    """Prefill chunks and decode steps, with padding anywhere in a step: every aggregate after
    every step equals the same aggregation over all scored tokens so far."""
    specs = AGGS + [dict(aggregation="max_rolling_mean", window=1), dict(aggregation="max_rolling_mean", window=6)]
    dets = [Detector(f"d{i}", "1", HookPoint.parse("blocks.0.resid_post"), affine(4, i), **spec)
            for i, spec in enumerate(specs)]
    bank = DetectorBank(dets)
    rng = np.random.default_rng(seed)
    state, seen = bank.state(1), []
    for scored, padded in steps:
        x = rng.normal(0, 3, (1, scored + padded, len(specs))).astype(np.float32)
        mask = np.zeros((1, scored + padded), bool)
        mask[0, rng.choice(scored + padded, scored, replace=False)] = True
        state.begin_step(1, scored + padded)
        state.step_logits = torch.from_numpy(x)
        out = state.update(torch.from_numpy(mask)).numpy()[0]
        seen += list(x[0, mask[0]])
        expect = [reference(np.array(seen)[:, i], spec) for i, spec in enumerate(specs)]
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-4)
