"""CUDA paths: same scores as on CPU, and one host sync per generated token. Skipped without a GPU."""

import numpy as np
import pytest
import torch

from monitor.bank import Detector, DetectorBank
from monitor.domain import HookPoint
from monitor.runner import ModelRunner
from monitor.steering import Steering, SteeringPlan
from probes.kinds.base import ScoringHead
from tests.monitor.sae import random_sae
from tests.tiny import tiny_model, tiny_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = ["Once upon a time", "Tell me about the tides and the moon", "Why?"]


def bank_for(runner):
    g = torch.Generator().manual_seed(0)
    aggs = [{"aggregation": "mean"}, {"aggregation": "max"}, {"aggregation": "ema", "alpha": 0.2},
            {"aggregation": "rolling_max", "window": 3}, {"aggregation": "max_rolling_mean", "window": 4}]
    heads = [ScoringHead(torch.randn(runner.d_model, 1, generator=g) * 0.2, torch.zeros(1)) for _ in aggs]
    return DetectorBank([Detector(f"d{i}", "1", HookPoint.parse("blocks.1.resid_post"), h, **a)
                         for i, (h, a) in enumerate(zip(heads, aggs))], device=runner.device)


def runners():
    cpu = ModelRunner(tiny_model("llama"), tiny_tokenizer())
    gpu = ModelRunner(tiny_model("llama").cuda(), tiny_tokenizer())
    return cpu, gpu


def test_scores_on_cuda_match_cpu():
    cpu, gpu = runners()
    items = [cpu.encode(p, chat=True) for p in PROMPTS]
    a = cpu.score(items, bank_for(cpu), batch_size=3)
    b = gpu.score(items, bank_for(gpu), batch_size=3)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.probs, y.probs, atol=1e-4)


def test_bank_and_steering_never_sync_with_the_host():
    """Scoring, aggregation and steering are pure device work; only the runner's one transfer syncs."""
    _, gpu = runners()
    bank = bank_for(gpu)
    point = HookPoint.parse("blocks.1.resid_post")
    plan = SteeringPlan(3, gpu.device, gpu.dtype)
    plan.add(0, Steering(point, "add", torch.randn(gpu.d_model), coefficient=2.0))
    plan.add(2, Steering(point, "ablate", torch.randn(gpu.d_model)))
    state = bank.state(3)
    h = torch.randn(3, 7, gpu.d_model, device="cuda")
    mask = torch.ones(3, 7, dtype=torch.bool, device="cuda")
    mask[0, :3] = False
    plan.apply(point, h, "prompt")  # first use builds the fused tensors from host lists
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            state.begin_step(3, 7)
            state.record(point, plan.apply(point, h, "prompt"))
            state.update(mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_latent_readout_never_syncs_with_the_host():
    """Explanations read SAE latents on the device too: in the hook (Generate), after the pass (Score)."""
    _, gpu = runners()
    point = HookPoint.parse("blocks.1.resid_post")
    sae = random_sae("topk", d_in=gpu.d_model, k=4, point=str(point)).to("cuda")
    bank = DetectorBank(bank_for(gpu).detectors, device=gpu.device, saes={"s": sae}, explain_latents=8)
    state = bank.state(3)
    h = torch.randn(3, 7, gpu.d_model, device="cuda")
    probs = torch.rand(3, 7, bank.size, device="cuda")
    mask = torch.ones(3, 7, dtype=torch.bool, device="cuda")
    mask[0, :3] = False
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for hold in (False, True, False):
            state.begin_step(3, 7, hold=hold)
            state.record(point, h)
            if hold:
                state.read_latents(probs, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = sae.encode(h[1, -1]).topk(8)
    torch.testing.assert_close(state.latents[1, 0, :, 1], expected.values)
