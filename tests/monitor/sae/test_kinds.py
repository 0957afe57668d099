"""Each SAE architecture against its formula written out; subsets of latents against the full encode."""

import dataclasses

import pytest
import torch

from monitor.sae import SAE_KINDS, JumpReLUSAE, SAEError, TopKSAE, register, sae_kind
from tests.monitor.sae import random_sae

KINDS = {  # name -> (kind, config)
    "relu": ("relu", {}),
    "relu_b_dec": ("relu", {"apply_b_dec_to_input": True}),
    "jumprelu": ("jumprelu", {}),
    "topk": ("topk", {"k": 5, "apply_b_dec_to_input": True}),
    "batchtopk_threshold": ("batchtopk", {"k": 4.6, "threshold": 0.15}),
    "batchtopk_no_threshold": ("batchtopk", {"k": 4.6}),
}


def x_for(sae, shape=(7,), seed=1):
    return torch.randn(*shape, sae.d_in, generator=torch.Generator().manual_seed(seed)) * 2


def by_hand(sae, x):
    """Dense activations from the weights, spelled out per architecture."""
    w, b_enc, b_dec = sae.W_enc.double(), sae.b_enc.double(), sae.b_dec.double()
    x = x.double()
    pre = (x - b_dec if sae.apply_b_dec_to_input else x) @ w + b_enc
    cfg = sae.config
    if sae.kind == "relu":
        return torch.clamp(pre, min=0)
    if sae.kind == "jumprelu":
        return torch.where((pre > sae.threshold.double()) & (pre > 0), pre, 0)
    if sae.kind == "batchtopk" and cfg.threshold is not None:
        return torch.where((pre > cfg.threshold) & (pre > 0), pre, 0)
    k = cfg.k if sae.kind == "topk" else round(cfg.k)
    out = torch.zeros_like(pre)
    for row in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda j: -float(pre[row, j]))
        for j in order[:k]:
            out[row, j] = max(float(pre[row, j]), 0.0)
    return out


@pytest.mark.parametrize("name", KINDS)
def test_encode_matches_the_formula(name):
    kind, cfg = KINDS[name]
    sae = random_sae(kind, **cfg)
    x = x_for(sae)
    z = sae.encode(x)
    torch.testing.assert_close(z.double(), by_hand(sae, x), rtol=1e-5, atol=1e-5)
    assert 0 < int((z > 0).sum()) < z.numel()  # the test exercises both sides of the activation


@pytest.mark.parametrize("name", KINDS)
def test_decode_is_the_affine_decoder(name):
    kind, cfg = KINDS[name]
    sae = random_sae(kind, **cfg)
    z = sae.encode(x_for(sae))
    torch.testing.assert_close(sae.decode(z), z @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("name", KINDS)
def test_encode_latents_equals_those_columns_of_encode(name):
    kind, cfg = KINDS[name]
    sae = random_sae(kind, **cfg)
    x = x_for(sae, shape=(3, 5))  # any leading dims
    idx = torch.tensor([7, 0, 31, 7, 47])  # unordered, repeated
    torch.testing.assert_close(sae.encode_latents(x, idx), sae.encode(x)[..., idx], rtol=0, atol=1e-6)


def test_restrict_cuts_every_latent_tensor_and_topk_refuses():
    sae = random_sae("jumprelu")
    part = sae.restrict([3, 1])
    assert part.d_sae == 2 and part.kind == "jumprelu"
    torch.testing.assert_close(part.threshold, sae.threshold[[3, 1]])
    torch.testing.assert_close(part.W_dec, sae.W_dec[[3, 1]])
    assert random_sae("batchtopk", k=4.0, threshold=0.1).per_latent
    for sae in (random_sae("topk", k=3), random_sae("batchtopk", k=3.0)):
        assert not sae.per_latent
        with pytest.raises(SAEError, match="ranks all its latents"):
            sae.restrict([0])


def test_run_time_normalisations_follow_saelens():
    sae = random_sae("relu", normalize_activations="constant_norm_rescale", apply_b_dec_to_input=True)
    x = x_for(sae)
    scaled = x * sae.d_in**0.5 / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sae.encode(x), ((scaled - sae.b_dec) @ sae.W_enc + sae.b_enc).relu())
    sae = random_sae("relu", normalize_activations="layer_norm")
    centred = x - x.mean(-1, keepdim=True)
    normed = centred / (centred.std(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(sae.encode(x), (normed @ sae.W_enc + sae.b_enc).relu())


def test_to_copies_and_leaves_the_original():
    sae = random_sae("jumprelu")
    wide = sae.to(dtype=torch.float64)
    assert wide.threshold.dtype == torch.float64 and sae.threshold.dtype == torch.float32
    x = x_for(sae)
    torch.testing.assert_close(wide.encode(x).float(), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_bad_tensors_are_refused_naming_the_source():
    good = random_sae("jumprelu")
    tensors = dict(good.tensors)
    with pytest.raises(SAEError, match=r"^sae\.file: W_dec has shape \[16, 48\], expected \[48, 16\]"):
        JumpReLUSAE(good.config, {**tensors, "W_dec": tensors["W_dec"].T}, source="sae.file")
    with pytest.raises(SAEError, match=r"^sae\.file: b_enc has NaN or infinite values"):
        JumpReLUSAE(good.config, {**tensors, "b_enc": tensors["b_enc"].clone().fill_(float("nan"))}, source="sae.file")
    with pytest.raises(SAEError, match="missing threshold"):
        JumpReLUSAE(good.config, {k: v for k, v in tensors.items() if k != "threshold"}, source="sae.file")
    with pytest.raises(SAEError, match="k=49 must be between 1 and d_sae=48"):
        random_sae("topk", k=49)
    with pytest.raises(SAEError, match="normalize_activations 'expected_average_only_in'"):
        random_sae("relu", normalize_activations="expected_average_only_in")
    with pytest.raises(TypeError, match="needs a TopKConfig"):
        TopKSAE(good.config, tensors)


def test_registry_claims_a_kind_once_and_names_the_known_ones():
    assert sorted(SAE_KINDS) == ["batchtopk", "jumprelu", "relu", "topk"]
    assert register(TopKSAE) is TopKSAE
    twin = type("Twin", (TopKSAE,), {})
    with pytest.raises(ValueError, match="already registered"):
        register(twin)
    with pytest.raises(SAEError, match="cfg.json: unknown SAE architecture 'gated'; latentwatch runs batchtopk"):
        sae_kind("gated", "cfg.json")


def test_configs_are_frozen():
    sae = random_sae("topk", k=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sae.config.k = 4
