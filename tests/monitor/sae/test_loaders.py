"""Loaders against the libraries' own encodings (fixtures/, see its README), hook names, and every refusal."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from monitor.domain import HookPoint
from monitor.sae import FORMATS, LatentHead, SAEError, hook_point_from, load_sae
from monitor.scorers.sae import SAEScorer

FIXTURES = Path(__file__).parent / "fixtures"
GEMMA = FIXTURES / "gemma_scope" / "layer_6" / "width_16k" / "average_l0_12"
SPARSIFY_RESID = FIXTURES / "sparsify" / "tiny-resid" / "layers.6"

SAELENS = {  # fixture -> (kind, hook point, whether decode() is in the input's own space)
    "standard": ("relu", "blocks.6.resid_pre", True),
    "standard_b_dec_in": ("relu", "blocks.3.resid_post", True),
    "standard_constant_norm_rescale": ("relu", "blocks.4.resid_post", False),
    "standard_layer_norm": ("relu", "blocks.5.resid_pre", False),
    "jumprelu": ("jumprelu", "blocks.2.mlp_out", True),
    "topk": ("topk", "blocks.6.resid_post", True),
    "topk_rescale_acts_by_decoder_norm": ("topk", "blocks.3.mlp_out", True),
    "batchtopk": ("jumprelu", "blocks.6.resid_pre", True),  # sae-lens saves BatchTopK as JumpReLU
}
SPARSIFY = {"tiny-resid/layers.6": "blocks.6.resid_post", "tiny-mlp/layers.3.mlp": "blocks.3.mlp_out"}


def expected(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "expected.safetensors")


def copy(src: Path, tmp_path: Path, name: str | None = None) -> Path:
    dst = tmp_path / (name or src.name)
    shutil.copytree(src, dst)
    return dst


def at(path, message: str) -> str:
    """A pattern for an error that starts with the file it is about."""
    return "^" + re.escape(f"{path}: ") + message


def edit_cfg(folder: Path, **changes) -> Path:
    cfg_file = folder / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value in changes.items():
        if key == "hook_name":
            cfg["metadata"]["hook_name"] = value
        else:
            cfg[key] = value
    cfg_file.write_text(json.dumps(cfg))
    return cfg_file


# ----------------------------------------------------------------------------- the libraries' outputs


@pytest.mark.parametrize("name", SAELENS)
def test_saelens_folders_encode_as_saelens_does(name):
    folder = FIXTURES / "saelens" / name
    kind, point, same_space = SAELENS[name]
    sae = load_sae(folder)
    assert (sae.kind, str(sae.hook_point)) == (kind, point)
    exp = expected(folder)
    acts = sae.encode(exp["x"])
    torch.testing.assert_close(acts, exp["acts"], rtol=0, atol=1e-5)
    assert 0 < int((acts > 0).sum()) < acts.numel()
    if same_space:  # with run-time normalisation sae-lens also undoes it on the way out
        torch.testing.assert_close(sae.decode(acts), exp["recon"], rtol=0, atol=1e-5)


def test_saelens_bfloat16_weights_load_exactly_and_encode_as_saelens_in_bfloat16():
    folder = FIXTURES / "saelens" / "standard_bfloat16"
    sae = load_sae(folder)
    assert sae.W_enc.dtype == torch.float32  # upcast once, losslessly
    exp = expected(folder)
    acts = sae.to(dtype=torch.bfloat16).encode(exp["x"])
    torch.testing.assert_close(acts.float(), exp["acts"].float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SPARSIFY)
def test_sparsify_folders_encode_as_sparsify_does(name):
    folder = FIXTURES / "sparsify" / name
    sae = load_sae(folder)
    assert (sae.kind, str(sae.hook_point), sae.apply_b_dec_to_input) == ("topk", SPARSIFY[name], True)
    exp = expected(folder)
    acts = sae.encode(exp["x"])
    torch.testing.assert_close(acts, exp["acts"], rtol=0, atol=1e-5)
    torch.testing.assert_close(sae.decode(acts), exp["recon"], rtol=0, atol=1e-5)
    assert torch.equal(acts.topk(sae.config.k).indices.sort().values, exp["top_indices"].sort().values)


def test_gemma_scope_params_encode_as_the_published_jumprelu():
    sae = load_sae(GEMMA / "params.npz")
    assert (sae.kind, str(sae.hook_point), sae.apply_b_dec_to_input) == ("jumprelu", "blocks.6.resid_post", False)
    exp = expected(GEMMA)
    acts = sae.encode(exp["x"])
    torch.testing.assert_close(acts, exp["acts"], rtol=0, atol=1e-5)
    torch.testing.assert_close(sae.decode(acts), exp["recon"], rtol=0, atol=1e-5)


def test_a_loaded_sae_scores_its_latents_through_the_scorer():
    sae = load_sae(FIXTURES / "saelens" / "topk")
    exp = expected(FIXTURES / "saelens" / "topk")
    heads = [LatentHead(sae, [3, 10, 40], [1.0, -2.0, 0.5], 0.25), LatentHead.single(sae, 7, scale=2.0, threshold=0.1)]
    got = SAEScorer(heads, "cpu", torch.float32).logits(exp["x"])
    want = torch.stack([exp["acts"][:, [3, 10, 40]] @ torch.tensor([1.0, -2.0, 0.5]) + 0.25,
                        exp["acts"][:, 7] * 2.0 - 0.2], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- conventions beyond the fixtures


def test_saelens_checkpoint_scale_in_activation_scaler_json_is_folded(tmp_path):
    """An unfolded "expected_average_only_in" checkpoint reads activations times scaling_factor."""
    src = FIXTURES / "saelens" / "standard_b_dec_in"
    folder = copy(src, tmp_path)
    edit_cfg(folder, normalize_activations="expected_average_only_in")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    x = expected(src)["x"]
    torch.testing.assert_close(load_sae(folder).encode(x), load_sae(src).encode(x * 2.5), rtol=1e-5, atol=1e-5)
    (folder / "activation_scaler.json").unlink()  # folded already: read as it is, as sae-lens does
    torch.testing.assert_close(load_sae(folder).encode(x), load_sae(src).encode(x))


def test_saelens_before_6_spellings(tmp_path):
    """Top-level hook_point, TopK as activation_fn_str + activation_fn_kwargs, log_threshold, a bool
    normalize_activations and a unit scaling_factor all read as sae-lens 6 reads them."""
    src = FIXTURES / "saelens" / "topk"
    folder = copy(src, tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    old = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "hook_point": "blocks.6.hook_resid_post", "dtype": "float32",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": cfg["k"]}, "normalize_activations": False}
    (folder / "cfg.json").write_text(json.dumps(old))
    tensors = load_file(folder / "sae_weights.safetensors")
    save_file({**tensors, "scaling_factor": torch.ones(cfg["d_sae"])}, folder / "sae_weights.safetensors")
    sae = load_sae(folder)
    x = expected(src)["x"]
    assert (sae.kind, sae.apply_b_dec_to_input) == ("topk", True)  # sae-lens < 6 defaulted to subtracting b_dec
    torch.testing.assert_close(sae.encode(x), expected(src)["acts"], rtol=0, atol=1e-5)

    src = FIXTURES / "saelens" / "jumprelu"
    folder = copy(src, tmp_path)
    tensors = load_file(folder / "sae_weights.safetensors")
    tensors["log_threshold"] = tensors.pop("threshold").log()
    save_file(tensors, folder / "sae_weights.safetensors")
    torch.testing.assert_close(load_sae(folder).encode(expected(src)["x"]), expected(src)["acts"], rtol=0, atol=1e-5)


def test_a_batchtopk_training_checkpoint_uses_its_learned_threshold(tmp_path):
    src = FIXTURES / "saelens" / "batchtopk"  # saved for inference: JumpReLU with one threshold everywhere
    folder = copy(src, tmp_path)
    tensors = load_file(folder / "sae_weights.safetensors")
    threshold = tensors.pop("threshold")
    assert torch.equal(threshold, threshold[:1].expand_as(threshold))
    save_file({**tensors, "topk_threshold": threshold[0].double()}, folder / "sae_weights.safetensors")
    edit_cfg(folder, architecture="batchtopk", k=8)
    sae = load_sae(folder)
    assert sae.kind == "batchtopk" and sae.per_latent
    torch.testing.assert_close(sae.encode(expected(src)["x"]), expected(src)["acts"], rtol=0, atol=1e-5)


def test_sparsify_file_and_renamed_folder(tmp_path):
    assert str(load_sae(SPARSIFY_RESID / "cfg.json").hook_point) == "blocks.6.resid_post"
    folder = copy(SPARSIFY_RESID, tmp_path, "downloaded")
    with pytest.raises(SAEError, match=r"downloaded: folder name 'downloaded' is not a hook point latentwatch knows"):
        load_sae(folder)
    assert load_sae(folder, hook_point="blocks.6.resid_post").hook_point == HookPoint.parse("blocks.6.resid_post")


def test_gemma_scope_hook_point_from_the_release_path_or_the_caller(tmp_path):
    mlp = tmp_path / "gemma-scope-2b-pt-mlp-canonical" / "layer_9" / "width_16k" / "canonical"
    shutil.copytree(GEMMA, mlp)
    assert str(load_sae(mlp).hook_point) == "blocks.9.mlp_out"
    att = tmp_path / "gemma-scope-2b-pt-att" / "layer_9" / "width_16k" / "canonical"
    shutil.copytree(GEMMA, att)
    with pytest.raises(SAEError, match=r"params\.npz: Gemma Scope attention SAEs .* \(hook_z\)"):
        load_sae(att)
    moved = copy(GEMMA, tmp_path, "my_sae")
    with pytest.raises(SAEError, match=r"my_sae/params\.npz: cannot tell the layer from the path"):
        load_sae(moved)
    assert str(load_sae(moved, hook_point="blocks.6.resid_post").hook_point) == "blocks.6.resid_post"
    assert str(load_sae(GEMMA, hook_point="blocks.6.mlp_out").hook_point) == "blocks.6.mlp_out"  # no release name
    with pytest.raises(SAEError, match=r"canonical/params\.npz: the SAE reads blocks.9.mlp_out, but "
                                       r"hook_point=blocks.9.resid_post was passed"):
        load_sae(mlp, hook_point="blocks.9.resid_post")


# ----------------------------------------------------------------------------- hook names

HOOK_NAMES = {
    "blocks.6.hook_resid_pre": "blocks.6.resid_pre",
    "blocks.6.hook_resid_post": "blocks.6.resid_post",
    "blocks.12.hook_mlp_out": "blocks.12.mlp_out",
    "blocks.0.hook_attn_out": "blocks.0.attn_out",
    "model.layers.6": "blocks.6.resid_post",
    "layers.6": "blocks.6.resid_post",
    "layers.6.mlp": "blocks.6.mlp_out",
    "model.layers.6.self_attn": "blocks.6.attn_out",
    "h.2": "blocks.2.resid_post",
    "transformer.h.2.attn": "blocks.2.attn_out",
    "h.2.mlp": "blocks.2.mlp_out",
    "blocks.3.mlp_out": "blocks.3.mlp_out",
}


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_external_hook_names_map_to_ours(name):
    assert str(hook_point_from(name, "cfg.json")) == HOOK_NAMES[name]


@pytest.mark.parametrize(("name", "message"), [
    ("blocks.6.hook_resid_mid", r"^cfg\.json: hook_name 'blocks\.6\.hook_resid_mid' \(the residual stream between "
                                r"attention and the MLP\) is not supported"),
    ("blocks.6.hook_foo", r"^cfg\.json: hook_name 'blocks\.6\.hook_foo' is not a hook point latentwatch knows; use "
                          r"blocks\.N\.hook_resid_pre\|hook_resid_post\|hook_mlp_out\|hook_attn_out"),
    ("blocks.6.attn.hook_z", "is not a hook point latentwatch knows"),
    ("layers.6.mlp.down_proj", "is not a hook point latentwatch knows"),
    ("h.6.self_attn", "is not a hook point latentwatch knows"),
])
def test_other_hook_names_are_refused_with_the_accepted_forms(name, message):
    with pytest.raises(SAEError, match=message):
        hook_point_from(name, "cfg.json")


# ----------------------------------------------------------------------------- refusals, each naming its file


def test_wrong_d_model(tmp_path):
    with pytest.raises(SAEError, match=r"standard/sae_weights\.safetensors: the SAE reads d_in=16 activations, but "
                                       r"the model's d_model is 32"):
        load_sae(FIXTURES / "saelens" / "standard", d_model=32)
    assert load_sae(FIXTURES / "saelens" / "standard", d_model=16).d_in == 16


@pytest.mark.parametrize(("hook_name", "message"), [
    ("blocks.6.hook_foo", "hook_name 'blocks.6.hook_foo' is not a hook point latentwatch knows; use"),
    ("blocks.6.hook_resid_mid", r"hook_name 'blocks\.6\.hook_resid_mid' \(the residual stream between"),
])
def test_saelens_unknown_hook_name(tmp_path, hook_name, message):
    cfg_file = edit_cfg(copy(FIXTURES / "saelens" / "standard", tmp_path), hook_name=hook_name)
    with pytest.raises(SAEError, match=at(cfg_file, message)):
        load_sae(cfg_file.parent)
    with pytest.raises(SAEError, match=at(cfg_file, message)):  # the file's word is not overridden
        load_sae(cfg_file.parent, hook_point="blocks.6.resid_pre")


def test_missing_files_say_what_the_format_needs(tmp_path):
    folder = copy(FIXTURES / "saelens" / "standard", tmp_path)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEError, match=at(folder, r"the saelens format needs cfg\.json and sae_weights\.safetensors; "
                                                r"missing sae_weights\.safetensors$")):
        load_sae(folder, format="saelens")
    known = ("saelens (cfg.json + sae_weights.safetensors); sparsify (cfg.json + sae.safetensors); "
             "gemma_scope (params.npz); latentwatch (manifest.json + sae.safetensors)")
    with pytest.raises(SAEError, match=at(folder, re.escape(f"no SAE here; latentwatch reads {known}") + "$")):
        load_sae(folder)
    with pytest.raises(SAEError, match="no such file or folder"):
        load_sae(tmp_path / "nowhere")
    with pytest.raises(SAEError, match=r"it holds SAE folders layers\.6: pass one of them"):
        load_sae(FIXTURES / "sparsify" / "tiny-resid")
    with pytest.raises(SAEError,
                       match="unknown SAE format 'dictionary_learning'; known: gemma_scope, latentwatch, saelens"):
        load_sae(folder, format="dictionary_learning")
    assert list(FORMATS) == ["saelens", "sparsify", "gemma_scope", "latentwatch"]


def test_pickles_are_refused_never_opened(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    pickled = FIXTURES / "bad" / "sae_weights.pt"
    with pytest.raises(SAEError, match=at(pickled, "refusing to load a pickle file")):
        load_sae(pickled)
    with pytest.raises(SAEError, match=at(pickled, "refusing to load a pickle file")):
        load_sae(FIXTURES / "bad")
    folder = copy(FIXTURES / "saelens" / "standard", tmp_path)
    (folder / "sae_weights.safetensors").rename(folder / "sae_weights.bin")
    with pytest.raises(SAEError, match=at(folder / "sae_weights.bin", "refusing to load a pickle file")):
        load_sae(folder, format="saelens")
    npz = tmp_path / "layer_1" / "params.npz"
    npz.parent.mkdir()
    np.savez(npz, W_enc=np.array([object()], dtype=object))
    with pytest.raises(SAEError, match=at(npz, r"holds pickled \(object\) arrays; refused")):
        load_sae(npz)


def test_unknown_architecture(tmp_path):
    cfg_file = edit_cfg(copy(FIXTURES / "saelens" / "standard", tmp_path), architecture="gated")
    with pytest.raises(SAEError, match=at(cfg_file, "architecture 'gated' is not one latentwatch runs; supported: "
                                                  "standard, jumprelu, topk, batchtopk$")):
        load_sae(cfg_file.parent)
    cfg_file = copy(SPARSIFY_RESID, tmp_path, "layers.6") / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(SAEError, match=at(cfg_file, "activation 'groupmax' is not supported")):
        load_sae(cfg_file.parent)
    cfg_file.write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(SAEError, match=at(cfg_file, "transcode is set: a transcoder predicts")):
        load_sae(cfg_file.parent)


def test_non_finite_weights(tmp_path):
    folder = copy(FIXTURES / "saelens" / "jumprelu", tmp_path)
    weights = folder / "sae_weights.safetensors"
    tensors = load_file(weights)
    tensors["threshold"][3] = float("inf")
    save_file(tensors, weights)
    with pytest.raises(SAEError, match=at(weights, "threshold has NaN or infinite values")):
        load_sae(folder)
    moved = copy(GEMMA, tmp_path, "layer_6")
    with np.load(moved / "params.npz") as data:
        arrays = dict(data)
    arrays["W_dec"][0, 0] = np.nan
    np.savez(moved / "params.npz", **arrays)
    with pytest.raises(SAEError, match=at(moved / "params.npz", "W_dec has NaN or infinite values")):
        load_sae(moved)


def test_shape_mismatches(tmp_path):
    cfg_file = edit_cfg(copy(FIXTURES / "saelens" / "standard", tmp_path), d_sae=32)
    with pytest.raises(SAEError, match=at(cfg_file.parent / "sae_weights.safetensors", r"W_enc has shape \[16, 64\], "
                                       r"expected \[16, 32\] \(d_in x d_sae with d_in=16, d_sae=32\)")):
        load_sae(cfg_file.parent)
    folder = copy(SPARSIFY_RESID, tmp_path, "layers.6")
    tensors = load_file(folder / "sae.safetensors")
    save_file({**tensors, "b_dec": tensors["b_dec"][:8].contiguous()}, folder / "sae.safetensors")
    with pytest.raises(SAEError, match=r"sae\.safetensors: b_dec has shape \[8\], expected \[16\]"):
        load_sae(folder)
    del tensors["encoder.bias"]
    save_file(tensors, folder / "sae.safetensors")
    with pytest.raises(SAEError, match=r"sae\.safetensors: has no tensor 'encoder\.bias'"):
        load_sae(folder)


def test_unreadable_files(tmp_path):
    folder = copy(FIXTURES / "saelens" / "standard", tmp_path)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match=at(folder / "cfg.json", "not readable JSON")):
        load_sae(folder)
    folder = copy(FIXTURES / "saelens" / "jumprelu", tmp_path)
    (folder / "sae_weights.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SAEError, match=at(folder / "sae_weights.safetensors", "not a readable safetensors file")):
        load_sae(folder)
