"""Latent clamping sets one SAE latent to a value, per row and position, and leaves the rest alone."""

import dataclasses

import pytest
import torch

from monitor.domain import HookPoint
from monitor.sae import SAE_KINDS
from monitor.steering import Steering, SteeringPlan
from tests.monitor.sae import random_sae
from tests.monitor.test_steering import forward
from tests.tiny import tiny_runner

POINT = HookPoint.parse("blocks.1.resid_post")
D, LATENTS, ON, IDLE = 32, 16, 3, 11  # latent ON fires on every token, latent IDLE on none


def orthonormal_sae(kind: str, **config):
    """Decoder rows orthonormal and W_enc = W_dec^T, so moving along W_dec[j] moves only latent j's
    pre-activation, one for one: re-encoding a clamped activation must give the value back."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    w_dec = q[:, :LATENTS].T.contiguous()
    b_enc = torch.randn(LATENTS, generator=g) * 0.1
    b_enc[ON], b_enc[IDLE] = 5.0, -50.0
    cls = SAE_KINDS[kind]
    cfg = cls.config_cls(d_in=D, d_sae=LATENTS, hook_point=POINT, apply_b_dec_to_input=True, **config)
    sae = cls(cfg, {"W_enc": w_dec.T.contiguous(), "b_enc": b_enc, "W_dec": w_dec,
                    "b_dec": torch.randn(D, generator=g) * 0.1})
    sae.id = f"ortho-{kind}"
    return sae


def acts(rows=3, seq=5, seed=1):
    return torch.randn(rows, seq, D, generator=torch.Generator().manual_seed(seed)) * 0.3


def plan_of(*rows, n=3, device="cpu"):
    plan = SteeringPlan(n, device, torch.float32)
    for row, steering in rows:
        plan.add(row, steering)
    return plan


@pytest.mark.parametrize("kind, config", [("relu", {}), ("topk", {"k": 4})])
def test_re_encoding_the_clamped_activation_gives_the_value(kind, config):
    sae = orthonormal_sae(kind, **config)
    h = acts()
    before = sae.encode(h)
    assert (before[..., ON] > 4).all()  # firing, and (TopK) in the top k
    for value in (9.0, 1.5, 0.0):  # up, down (it stays in the top k), off
        out = plan_of((0, Steering.clamp(sae, ON, value))).apply(POINT, h, "prompt")
        after = sae.encode(out)
        torch.testing.assert_close(after[0, :, ON], torch.full((5,), value), rtol=0, atol=1e-5)
        others = [j for j in range(LATENTS) if j != ON]
        if value > 0:  # nothing else moved (at 0 a TopK SAE lets the next latent into the top k)
            torch.testing.assert_close(after[0][:, others], before[0][:, others], rtol=0, atol=1e-5)
        assert torch.equal(out[1:], h[1:])  # rows that did not ask are untouched, bit for bit


def test_a_latent_outside_the_top_k_is_read_as_zero_exactly():
    """TopK's activation is the one the SAE reports (0 outside the top k), not the pre-activation."""
    sae = orthonormal_sae("topk", k=2)
    h = acts(rows=1, seq=1)
    latent = next(j for j in range(LATENTS) if sae.encode(h)[0, 0, j] == 0 and sae.pre_activations(h)[0, 0, j] > 0)
    out = plan_of((0, Steering.clamp(sae, latent, 2.0)), n=1).apply(POINT, h, "prompt")
    torch.testing.assert_close(out - h, (2.0 * sae.W_dec[latent]).expand_as(h), rtol=0, atol=1e-6)


def test_clamping_to_the_current_activation_is_a_no_op_bit_for_bit():
    sae = orthonormal_sae("relu")
    h = acts(rows=1)[:, :1].expand(1, 4, D).contiguous()  # one token repeated: one activation
    value = float(sae.encode(h)[0, 0, ON])
    assert torch.equal(plan_of((0, Steering.clamp(sae, ON, value)), n=1).apply(POINT, h, "prompt"), h)


def test_rows_with_different_clamps_fuse_into_one_pass():
    sae = orthonormal_sae("relu")
    h = acts()
    plan = plan_of((0, Steering.clamp(sae, ON, 8.0)), (1, Steering.clamp(sae, ON, 2.0)),
                   (1, Steering.clamp(sae, 7, 6.0)), (2, Steering.clamp(sae, 7, 1.0)), (2, Steering.clamp(sae, 7, 4.0)))
    out = plan.apply(POINT, h, "prompt")
    enc = sae.encode(out)
    torch.testing.assert_close(enc[0, :, ON], torch.full((5,), 8.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(enc[1, :, ON], torch.full((5,), 2.0), rtol=0, atol=1e-5)
    # latent 7 need not fire before: its delta starts from the activation, 0, so check the write itself
    start = sae.encode(h)
    torch.testing.assert_close(out[1] - h[1], (2.0 - start[1, :, ON, None]) * sae.W_dec[ON]
                               + (6.0 - start[1, :, 7, None]) * sae.W_dec[7], rtol=0, atol=1e-5)
    # a later clamp of the same latent in a row replaces the earlier one
    torch.testing.assert_close(out[2] - h[2], (4.0 - start[2, :, 7, None]) * sae.W_dec[7], rtol=0, atol=1e-5)
    torch.testing.assert_close(enc[2, :, ON], start[2, :, ON], rtol=0, atol=1e-5)
    (fused,) = plan._fuse(POINT, "prompt")[2]  # one SAE: one encoder pass for every row
    assert fused.idx.tolist() == [ON, 7]


def test_clamps_follow_additions_and_two_saes_each_get_theirs():
    relu, topk = orthonormal_sae("relu"), orthonormal_sae("topk", k=4)
    h = acts(rows=1)
    vec = torch.randn(D, generator=torch.Generator().manual_seed(5))
    plan = plan_of((0, Steering(POINT, "add", vec, 3.0)), (0, Steering.clamp(relu, ON, 7.0)),
                   (0, Steering.clamp(topk, 9, 0.0)), n=1)
    out = plan.apply(POINT, h, "prompt")
    torch.testing.assert_close(relu.encode(out)[0, :, ON], torch.full((5,), 7.0), rtol=0, atol=1e-5)
    assert (topk.encode(out)[0, :, 9] == 0).all()


def test_positions_pick_the_phase_a_clamp_applies_in():
    sae = orthonormal_sae("relu")
    h = acts(rows=1)
    plan = plan_of((0, Steering.clamp(sae, ON, 9.0, positions="generated")), n=1)
    assert plan.apply(POINT, h, "prompt") is None
    assert plan.apply(POINT, h, "generated") is not None


def test_a_normalised_sae_writes_in_the_residual_streams_scale():
    """With constant_norm_rescale the SAE reads h and 2h alike, so clamping 2h must write twice the delta."""
    sae = orthonormal_sae("relu")
    sae = type(sae)(dataclasses.replace(sae.config, normalize_activations="constant_norm_rescale"), sae.tensors)
    h = acts(rows=1)
    plan = plan_of((0, Steering.clamp(sae, ON, 9.0)), n=1)
    torch.testing.assert_close(plan.apply(POINT, 2 * h, "prompt"), 2 * plan.apply(POINT, h, "prompt"))


def test_in_a_forward_pass_only_the_row_that_asked_changes():
    runner = tiny_runner("qwen2")
    sae = orthonormal_sae("topk", k=4)
    zero = SteeringPlan(3, runner.device, runner.dtype)
    zero.add(1, Steering.clamp(sae, ON, 0.0))
    zero.add(0, Steering.clamp(sae, IDLE, 0.0))  # a latent that never fires, clamped to 0: a no-op
    steered, h = forward(runner, zero)
    plain, h0 = forward(runner, None)
    assert torch.equal(steered[0], plain[0]) and torch.equal(steered[2], plain[2])
    assert not torch.equal(steered[1], plain[1])
    assert (sae.encode(h[1])[..., ON].abs() < 1e-5).all()


def test_bad_clamps_are_refused():
    sae = orthonormal_sae("relu")
    with pytest.raises(ValueError, match="latent 16 is out of range"):
        Steering.clamp(sae, LATENTS, 1.0)
    with pytest.raises(ValueError, match="coefficient must be finite"):
        Steering.clamp(sae, 0, float("nan"))
    with pytest.raises(ValueError, match="takes an SAE and a latent"):
        Steering(POINT, "clamp", torch.ones(D))
    with pytest.raises(ValueError, match="takes an SAE and a latent"):
        Steering(POINT, "add", torch.ones(D), sae=sae, latent=0)
    with pytest.raises(ValueError, match="reads blocks.1.resid_post"):
        Steering(HookPoint.parse("blocks.0.resid_post"), "clamp", sae.W_dec[0], sae=sae, latent=0)


def test_random_saes_of_every_per_latent_kind_clamp_through_their_restricted_encoder():
    for kind, config in (("jumprelu", {}), ("batchtopk", {"k": 4.0, "threshold": 0.1})):
        sae = random_sae(kind, d_in=D, **config)
        h = acts(rows=1)
        out = plan_of((0, Steering.clamp(sae, 5, 3.0)), n=1).apply(POINT, h, "prompt")
        torch.testing.assert_close(out - h, (3.0 - sae.encode(h)[..., 5, None]) * sae.W_dec[5], rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind, config", [("relu", {}), ("topk", {"k": 4})])
def test_clamping_on_cuda_never_syncs_with_the_host_and_matches_cpu(kind, config):
    cpu = orthonormal_sae(kind, **config)
    gpu = cpu.to("cuda")
    plans = {device: plan_of((0, Steering.clamp(sae, ON, 8.0)), (2, Steering.clamp(sae, 7, 1.0)), device=device)
             for device, sae in (("cpu", cpu), ("cuda", gpu))}
    h = acts()
    expected = plans["cpu"].apply(POINT, h, "prompt")
    h = h.cuda()
    plans["cuda"].apply(POINT, h, "prompt")  # first use builds the fused tensors from host lists
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = plans["cuda"].apply(POINT, h, "prompt")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
