"""The `sae` scorer kind: fused heads against per-head references, alone and inside the bank."""

import numpy as np
import pytest
import torch

from monitor.bank import Detector, DetectorBank
from monitor.domain import HookPoint
from monitor.sae import LatentHead, TopKSAE
from monitor.scorers import SCORERS, scorer_for
from monitor.scorers.sae import SAEScorer
from probes.kinds.base import ScoringHead
from tests.monitor.sae import random_sae
from tests.tiny import tiny_runner


def mixed_heads(d_in=16):
    """Single latents and probes on a JumpReLU SAE (also through a second object with the same
    weights), a TopK SAE and a ReLU SAE, with overlapping and repeated latents."""
    jump = random_sae("jumprelu", d_in=d_in, seed=1)
    same_weights = type(jump)(jump.config, dict(jump.tensors))
    topk = random_sae("topk", d_in=d_in, seed=2, k=6, apply_b_dec_to_input=True)
    relu = random_sae("relu", d_in=d_in, seed=3)
    return [
        LatentHead.single(jump, 5, scale=4.0, threshold=0.2),
        LatentHead(topk, [1, 9, 30], [0.5, -1.0, 2.0], 0.1),
        LatentHead(jump, [5, 12, 40, 12], [1.0, -0.5, 0.25, 0.5], -0.3),
        LatentHead.single(topk, 9),
        LatentHead(same_weights, [0, 47], [3.0, -3.0]),
        LatentHead(relu, [2, 3], [1.0, 1.0], -0.5),
    ]


def test_registered_and_chosen_by_the_heads_kind():
    head = mixed_heads()[0]
    assert SCORERS["sae"] is SAEScorer and scorer_for(head) is SAEScorer


def test_fused_logits_equal_each_heads_reference():
    heads = mixed_heads()
    scorer = SAEScorer(heads, "cpu", torch.float32)
    assert len(scorer.encoders) == 3  # one encoder pass per SAE: the twin object shares the JumpReLU's
    h = torch.randn(11, 16) * 2
    expect = torch.stack([head.logits(h) for head in heads], dim=1)
    torch.testing.assert_close(scorer.logits(h), expect, rtol=1e-5, atol=1e-5)
    assert scorer.logits(h).dtype == torch.float32


def test_watched_columns_only_equal_the_full_encoder():
    heads = [head for head in mixed_heads() if head.sae.per_latent]
    scorer = SAEScorer(heads, "cpu", torch.float32)
    assert [(sae.d_sae, cols) for sae, cols in scorer.encoders] == [(5, None), (2, None)]  # 0 5 12 40 47; 2 3
    h = torch.randn(9, 16)
    expect = torch.stack([head.sae.encode(h)[:, head.latents] @ head.weights + head.bias for head in heads], 1)
    torch.testing.assert_close(scorer.logits(h), expect, rtol=1e-5, atol=1e-5)


def test_a_topk_encoder_runs_once_for_all_its_heads(monkeypatch):
    sae = random_sae("topk", k=4)
    calls = []
    real = TopKSAE.pre_activations
    monkeypatch.setattr(TopKSAE, "pre_activations", lambda self, x: calls.append(1) or real(self, x))
    scorer = SAEScorer([LatentHead.single(sae, j) for j in range(10)], "cpu", torch.float32)
    scorer.logits(torch.randn(4, 16))
    assert len(calls) == 1


def test_single_latent_head_fires_above_its_threshold():
    sae = random_sae("relu")
    head = LatentHead.single(sae, 3, scale=10.0, threshold=0.3)
    h = torch.randn(64, 16) * 2
    act = sae.encode(h)[:, 3]
    assert torch.equal(head.logits(h) > 0, act > 0.3)


def test_directions_are_the_encoder_columns_and_decoder_rows():
    head = mixed_heads()[2]
    d = SAEScorer.directions(head)
    assert d.shape == (16, 8)
    torch.testing.assert_close(d[:, 1], head.sae.W_enc[:, 12])
    torch.testing.assert_close(d[:, 5], head.sae.W_dec[12])


def test_heads_are_checked():
    sae = random_sae("relu")
    with pytest.raises(ValueError, match=r"latents must lie in \[0, 48\)"):
        LatentHead(sae, [48], [1.0])
    with pytest.raises(ValueError, match="one length"):
        LatentHead(sae, [1, 2], [1.0])
    with pytest.raises(ValueError, match="finite"):
        LatentHead(sae, [1], [float("inf")])
    other = random_sae("relu", point="blocks.2.resid_post")
    with pytest.raises(ValueError, match="read SAEs trained at blocks.1.resid_post, blocks.2.resid_post"):
        SAEScorer([LatentHead.single(sae, 0), LatentHead.single(other, 0)], "cpu", torch.float32)


def test_through_the_bank_beside_an_affine_probe():
    runner = tiny_runner("llama")
    d = runner.d_model
    point = HookPoint.parse("blocks.1.resid_post")
    heads = mixed_heads(d)
    g = torch.Generator().manual_seed(0)
    heads.insert(2, ScoringHead(torch.randn(d, 1, generator=g) * 0.3, torch.zeros(1)))
    bank = DetectorBank([Detector(f"det{i}", "1", point, head, aggregation="last") for i, head in enumerate(heads)])
    prompts = ["Hi.", "Tell me about lighthouses and the people who keep them.", "ok"]
    items = [runner.encode(p, chat=True) for p in prompts]
    scores = runner.score(items, bank, batch_size=3)  # left-padded batch
    last = torch.from_numpy(runner.capture(items, [point])[(point, "last")])
    expect = torch.stack([head.logits(last).reshape(-1) for head in heads], 1).sigmoid().numpy()
    np.testing.assert_allclose(np.stack([s.probs for s in scores]), expect, atol=1e-5)
