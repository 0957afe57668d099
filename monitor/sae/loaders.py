"""Loaders for SAEs as the libraries that train them write them: sae-lens, Gemma Scope, eai-sparsify,
and latentwatch's own SAE packs (`latentwatch sae train`).

Each loader maps its format's conventions onto `SAE` (which way W_enc points, whether b_dec is
subtracted from the input, how the input is scaled) and its hook names onto ours. Only safe
formats are read: safetensors, JSON and numpy .npz without pickles. `load_sae` recognises the
format from the files present; the loaders are registered by name in `monitor/sae/__init__.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from monitor.domain import SITES, HookPoint, HookPointError
from monitor.sae.base import NORMALISATIONS, SAE, SAEError
from monitor.sae.registry import FORMATS, SAEFormat, sae_format, sae_kind
from probes.fingerprint import ModelFingerprint

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
HOOK_FORMS = (
    "blocks.N.hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out (TransformerLens), "
    "[model.]layers.N[.mlp|.self_attn] or [transformer.]h.N[.mlp|.attn] (Hugging Face modules), "
    "or blocks.N.resid_pre|attn_out|mlp_out|resid_post"
)
_TRANSFORMER_LENS = re.compile(r"blocks\.(\d+)\.hook_(\w+)")
_HF_MODULES = (  # a module's output: the block's is the residual stream after it (Llama-style, GPT-2)
    (re.compile(r"(?:model\.)?layers\.(\d+)(?:\.(mlp|self_attn))?"), {"mlp": "mlp_out", "self_attn": "attn_out"}),
    (re.compile(r"(?:transformer\.)?h\.(\d+)(?:\.(mlp|attn))?"), {"mlp": "mlp_out", "attn": "attn_out"}),
)

# ------------------------------------------------------------------------------ hook names


def hook_point_from(name: str, source: str, what: str = "hook_name") -> HookPoint:
    """Our hook point for a TransformerLens hook name, a Hugging Face module path, or our own name."""
    if not isinstance(name, str):
        raise SAEError(f"{source}: {what} {name!r} is not a string")
    m = _TRANSFORMER_LENS.fullmatch(name)
    if m and m.group(2) == "resid_mid":
        raise SAEError(f"{source}: {what} {name!r} (the residual stream between attention and the MLP) is not "
                       f"supported; latentwatch reads {', '.join(SITES)}")
    if m and m.group(2) in SITES:
        return HookPoint(int(m.group(1)), SITES.index(m.group(2)))
    for pattern, sites in _HF_MODULES:
        if m := pattern.fullmatch(name):
            return HookPoint(int(m.group(1)), SITES.index(sites.get(m.group(2), "resid_post")))
    try:
        return HookPoint.parse(name)
    except HookPointError:
        raise SAEError(f"{source}: {what} {name!r} is not a hook point latentwatch knows; use {HOOK_FORMS}") from None


def _settle(found: HookPoint | None, given: HookPoint | None, source: str) -> HookPoint:
    """The file's hook point and the caller's must agree; one of them must exist."""
    if found is None and given is None:
        raise SAEError(f"{source}: does not say which hook point the SAE reads; pass hook_point")
    if found is not None and given is not None and found != given:
        raise SAEError(f"{source}: the SAE reads {found}, but hook_point={given} was passed")
    return found if found is not None else given


# ------------------------------------------------------------------------------ safe readers


def _refuse_pickle(file: Path) -> None:
    raise SAEError(f"{file}: refusing to load a pickle file (unpickling can run arbitrary code); "
                   "convert it to safetensors first")


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEError(f"{file}: not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise SAEError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def _safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return {k: _float32(v) for k, v in load_file(file).items()}
    except (OSError, SafetensorError, ValueError) as e:
        raise SAEError(f"{file}: not a readable safetensors file: {e}") from None


def _npz(file: Path) -> dict[str, torch.Tensor]:
    try:
        data = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # numpy takes anything that is neither .npy nor .npz for a pickle
        raise SAEError(f"{file}: not an .npz archive ({e}); pickles are refused, since unpickling can run "
                       "arbitrary code") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise SAEError(f"{file}: a single .npy array, not an .npz archive")
    with data:
        try:
            arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            if "pickle" in str(e):
                raise SAEError(f"{file}: holds pickled (object) arrays; refused, since unpickling can run "
                               "arbitrary code") from None
            raise SAEError(f"{file}: not a readable .npz archive: {e}") from None
    return {k: _float32(torch.from_numpy(np.ascontiguousarray(a))) for k, a in arrays.items()}


def _int(cfg: dict, key: str, file: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEError(f"{file}: {key} must be a positive integer, got {value!r}")
    return value


def _tensor(tensors: dict[str, torch.Tensor], key: str, file: Path) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise SAEError(f"{file}: has no tensor {key!r} (it holds {', '.join(sorted(tensors)) or 'none'})") from None


# ------------------------------------------------------------------------------ sae-lens

SAELENS_KINDS = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk", "batchtopk": "batchtopk"}


def load_saelens(cfg_file: Path, weights_file: Path, hook_point: HookPoint | None = None) -> SAE:
    """A folder written by sae-lens (`SAE.save_model`): cfg.json + sae_weights.safetensors.

    W_enc is stored [d_in, d_sae] as we keep it. The input is normalised at run time when
    `normalize_activations` says so (constant_norm_rescale, layer_norm), then b_dec is subtracted if
    `apply_b_dec_to_input` (default true before sae-lens 6). A TopK SAE that ranks latents by their
    decoder-norm-scaled pre-activation (`rescale_acts_by_decoder_norm`) gets those norms folded into
    the encoder, as sae-lens folds them. "expected_average_only_in" means a fixed
    scale sae-lens folds into the weights when training ends; a checkpoint that has not folded it
    keeps it in activation_scaler.json, and we fold it the same way (W_enc * s, W_dec / s, b_dec / s),
    so the SAE reads raw activations. sparsity.safetensors (feature densities) is not needed to encode.
    """
    cfg = _json(cfg_file)
    meta = {**cfg, **(cfg.get("metadata") or cfg.get("meta") or {})}  # sae-lens 6 moved hook names to metadata
    arch = cfg.get("architecture", "standard")
    if arch == "standard" and cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk":
        arch = "topk"  # sae-lens < 6 spelled TopK as an activation function
    if arch not in SAELENS_KINDS:
        raise SAEError(f"{cfg_file}: architecture {arch!r} is not one latentwatch runs; supported: "
                       f"{', '.join(SAELENS_KINDS)}")
    if meta.get("hook_head_index") is not None:
        raise SAEError(f"{cfg_file}: SAEs on a single attention head (hook_head_index) are not supported")
    name = meta.get("hook_name", meta.get("hook_point"))
    point = _settle(hook_point_from(name, str(cfg_file)) if name is not None else None, hook_point, str(cfg_file))
    d_in, d_sae = _int(cfg, "d_in", cfg_file), _int(cfg, "d_sae", cfg_file)
    tensors = _safetensors(weights_file)
    if "threshold" not in tensors and "log_threshold" in tensors:  # a JumpReLU training checkpoint
        tensors["threshold"] = tensors["log_threshold"].exp()
    extra: dict = {}
    if arch == "topk":
        extra["k"] = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if isinstance(extra["k"], bool) or not isinstance(extra["k"], int):
            raise SAEError(f"{cfg_file}: a topk SAE needs an integer k, got {extra['k']!r}")
    elif arch == "batchtopk":
        extra["k"] = cfg.get("k")
        if isinstance(extra["k"], bool) or not isinstance(extra["k"], int | float):
            raise SAEError(f"{cfg_file}: a batchtopk SAE needs a number k, got {extra['k']!r}")
        if "topk_threshold" in tensors:
            extra["threshold"] = float(tensors["topk_threshold"])
    norm = cfg.get("normalize_activations") or "none"
    if norm is True:  # early sae-lens stored a bool
        norm = "expected_average_only_in"
    if norm == "expected_average_only_in":
        _fold_scale(tensors, cfg_file.parent / "activation_scaler.json", weights_file)
        norm = "none"
    elif norm not in NORMALISATIONS:
        raise SAEError(f"{cfg_file}: normalize_activations {norm!r} is not supported")
    _fold_finetuning_scale(tensors, weights_file)
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norm(tensors, weights_file)
    cls = sae_kind(SAELENS_KINDS[arch], str(cfg_file))
    config = cls.config_cls(d_in=d_in, d_sae=d_sae, hook_point=point,
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                            normalize_activations=norm, **extra)
    return cls(config, tensors, source=str(weights_file))


def _fold_scale(tensors: dict[str, torch.Tensor], scaler_file: Path, weights_file: Path) -> None:
    """sae-lens' fold_activation_norm_scaling_factor, with the factor of an unfolded checkpoint."""
    if not scaler_file.is_file():
        return  # already folded (what sae-lens writes at the end of training)
    s = _json(scaler_file).get("scaling_factor")
    if s is None:
        return
    if isinstance(s, bool) or not isinstance(s, int | float) or not s > 0:
        raise SAEError(f"{scaler_file}: scaling_factor must be a positive number, got {s!r}")
    for name, op in (("W_enc", torch.mul), ("W_dec", torch.div), ("b_dec", torch.div)):
        tensors[name] = op(_tensor(tensors, name, weights_file), s)


def _fold_finetuning_scale(tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    """sae-lens < 6 scaled latents by `scaling_factor` before decoding; that is a scale on W_dec's rows."""
    s = tensors.pop("scaling_factor", None)
    if s is not None and not torch.equal(s, torch.ones_like(s)):
        tensors["W_dec"] = _tensor(tensors, "W_dec", weights_file) * s.reshape(-1, 1)


def _fold_decoder_norm(tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    """sae-lens' TopK with rescale_acts_by_decoder_norm ranks pre * |W_dec row| and decodes acts / |row|:
    the same SAE as ours with the norms moved into the encoder and unit decoder rows (their _fold_norm_topk)."""
    norms = _tensor(tensors, "W_dec", weights_file).norm(dim=-1)
    tensors["W_enc"] = _tensor(tensors, "W_enc", weights_file) * norms
    tensors["b_enc"] = _tensor(tensors, "b_enc", weights_file) * norms
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]


# ------------------------------------------------------------------------------ Gemma Scope

_GEMMA_KEYS = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}


def load_gemma_scope(params_file: Path, hook_point: HookPoint | None = None) -> SAE:
    """A Gemma Scope params.npz: JumpReLU, W_enc [d_in, d_sae], no b_dec subtracted from the input.

    The hook point comes from the release path (`gemma-scope-2b-pt-res/layer_6/width_16k/...`:
    `-res` reads blocks.6.resid_post, `-mlp` blocks.6.mlp_out, no release name: resid_post), or
    from `hook_point`, which must agree with a release path and wins over a bare `layer_N/`.
    """
    tensors = {_GEMMA_KEYS.get(k.lower(), k): t for k, t in _npz(params_file).items()}
    point = _settle(_gemma_hook_point(params_file, required=hook_point is None), hook_point, str(params_file))
    w = _tensor(tensors, "W_enc", params_file)
    if w.ndim != 2:
        raise SAEError(f"{params_file}: W_enc has shape {list(w.shape)}, expected [d_in, d_sae]")
    cls = sae_kind("jumprelu", str(params_file))
    config = cls.config_cls(d_in=w.shape[0], d_sae=w.shape[1], hook_point=point, apply_b_dec_to_input=False)
    return cls(config, tensors, source=str(params_file))


def _gemma_hook_point(file: Path, *, required: bool) -> HookPoint | None:
    release = next((p for p in reversed(file.parts) if "gemma-scope" in p), "")
    if "transcoder" in release:
        raise SAEError(f"{file}: a Gemma Scope transcoder predicts the MLP's output from its input; it is not an SAE")
    if re.search(r"-att(-|$)", release):
        raise SAEError(f"{file}: Gemma Scope attention SAEs read the heads' outputs before the output projection "
                       "(hook_z), which latentwatch does not hook")
    if not release and not required:
        return None  # without the release name the site is only a guess; the caller's word wins
    layer = next((int(m.group(1)) for p in reversed(file.parts) if (m := re.fullmatch(r"layer_(\d+)", p))), None)
    if layer is None:
        if required:
            raise SAEError(f"{file}: cannot tell the layer from the path (Gemma Scope keeps each SAE under "
                           "layer_N/...); pass hook_point")
        return None
    return HookPoint(layer, SITES.index("mlp_out" if re.search(r"-mlp(-|$)", release) else "resid_post"))


# ------------------------------------------------------------------------------ eai-sparsify


def load_sparsify(cfg_file: Path, weights_file: Path, hook_point: HookPoint | None = None) -> SAE:
    """A folder written by eai-sparsify (`SparseCoder.save_to_disk`): cfg.json + sae.safetensors.

    TopK over ReLU'd pre-activations; the encoder is an nn.Linear (`encoder.weight` [d_sae, d_in],
    transposed here); b_dec is subtracted from the input. The folder is named after the module
    it hooks, whose output it reads: `layers.6` = blocks.6.resid_post, `layers.6.mlp` = mlp_out,
    `layers.6.self_attn` = attn_out (GPT-2: `h.6`, `h.6.mlp`, `h.6.attn`).
    """
    cfg = _json(cfg_file)
    for flag, why in (("transcode", "a transcoder predicts a module's output from its input"),
                      ("skip_connection", "its skip connection is not part of the latents"),
                      ("signed", "signed latents are not supported")):
        if cfg.get(flag):
            raise SAEError(f"{cfg_file}: {flag} is set: {why}; latentwatch loads plain SAEs")
    if cfg.get("activation", "topk") != "topk":
        raise SAEError(f"{cfg_file}: activation {cfg['activation']!r} is not supported; latentwatch runs topk")
    d_in, k = _int(cfg, "d_in", cfg_file), _int(cfg, "k", cfg_file)
    if cfg.get("num_latents"):
        d_sae = _int(cfg, "num_latents", cfg_file)
    else:  # 0 means "d_in * expansion_factor"
        d_sae = d_in * _int(cfg, "expansion_factor", cfg_file)
    folder = cfg_file.parent
    try:
        found = hook_point_from(folder.name, str(folder), "folder name")
    except SAEError:
        if hook_point is None:
            raise
        found = None  # renamed folder: the caller says where it reads
    point = _settle(found, hook_point, str(folder))
    t = _safetensors(weights_file)
    tensors = {"W_enc": _tensor(t, "encoder.weight", weights_file).T, "b_enc": _tensor(t, "encoder.bias", weights_file),
               "W_dec": _tensor(t, "W_dec", weights_file), "b_dec": _tensor(t, "b_dec", weights_file)}
    cls = sae_kind("topk", str(cfg_file))
    config = cls.config_cls(d_in=d_in, d_sae=d_sae, hook_point=point, apply_b_dec_to_input=True, k=k)
    return cls(config, tensors, source=str(weights_file))


# ------------------------------------------------------------------------------ latentwatch SAE packs

LATENTWATCH_FILES = ("manifest.json", "sae.safetensors")
LATENTWATCH_FORMAT = "latentwatch-sae"
# How W_enc and W_dec are stored; biases are always float32. int8 keeps one float32 scale per latent
# (W_enc column, W_dec row), so a 4096 x 576 SAE fits in under 5 MiB.
LATENTWATCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                      "int8": torch.int8}


def latentwatch_manifest(path) -> dict:
    """The manifest.json of a latentwatch SAE pack (its folder or the file), checked for what loading needs."""
    file = Path(path)
    file = file / LATENTWATCH_FILES[0] if file.is_dir() else file
    if not file.is_file():
        raise SAEError(f"{file}: missing; a latentwatch SAE pack is a folder with {' and '.join(LATENTWATCH_FILES)}")
    m = _json(file)
    if m.get("format") != LATENTWATCH_FORMAT or m.get("schema_version") != 1:
        raise SAEError(f"{file}: not a latentwatch SAE manifest (format {m.get('format')!r}, schema_version "
                       f"{m.get('schema_version')!r}; expected {LATENTWATCH_FORMAT!r}, 1)")
    if m.get("kind") != "topk":
        raise SAEError(f"{file}: kind {m.get('kind')!r} is not one latentwatch SAE packs hold; expected 'topk'")
    for key in ("d_in", "d_sae", "k"):
        _int(m, key, file)
    if not isinstance(m.get("dtype"), str) or m["dtype"] not in LATENTWATCH_DTYPES:
        raise SAEError(f"{file}: dtype {m.get('dtype')!r} is not one of {', '.join(LATENTWATCH_DTYPES)}")
    if not isinstance(m.get("weights_sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", m["weights_sha256"]):
        raise SAEError(f"{file}: weights_sha256 must be the sha256 of {LATENTWATCH_FILES[1]} (64 hex digits)")
    if not isinstance(m.get("apply_b_dec_to_input"), bool):
        raise SAEError(f"{file}: apply_b_dec_to_input must be true or false")
    try:
        HookPoint.parse(m.get("hook_point"))
        ModelFingerprint.model_validate(m.get("model"))
    except HookPointError as e:
        raise SAEError(f"{file}: hook_point: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        raise SAEError(f"{file}: model is not a model fingerprint: {'.'.join(map(str, first['loc'])) or '<root>'}: "
                       f"{first['msg']}") from None
    return m


def latentwatch_fingerprint(path) -> ModelFingerprint:
    """The model a latentwatch SAE pack was trained on: `.mismatch(runner.fingerprint)` says why a model differs."""
    return ModelFingerprint.model_validate(latentwatch_manifest(path)["model"])


def latentwatch_weights(stored: dict[str, torch.Tensor], dtype: str, file) -> dict[str, torch.Tensor]:
    """float32 W_enc, b_enc, W_dec, b_dec from the tensors of a pack stored in `dtype` (int8 dequantised)."""
    want = LATENTWATCH_DTYPES[dtype]
    out = {}
    for name in ("W_enc", "W_dec"):
        w = _tensor(stored, name, file)
        if w.dtype != want or w.ndim != 2:
            raise SAEError(f"{file}: {name} is a {w.ndim}-d {w.dtype} tensor; the manifest says 2-d {dtype}")
        if dtype == "int8":
            axis = 0 if name == "W_dec" else 1  # the latent's axis
            scale = _tensor(stored, f"{name}_scale", file)
            if list(scale.shape) != [w.shape[axis]] or not torch.isfinite(scale).all() or (scale < 0).any():
                raise SAEError(f"{file}: {name}_scale must hold one finite, non-negative scale per latent "
                               f"({w.shape[axis]}), got shape {list(scale.shape)}")
            w = w.float() * (scale[:, None] if axis == 0 else scale[None, :]).float()
        out[name] = w.float()
    for name in ("b_enc", "b_dec"):
        out[name] = _tensor(stored, name, file).float()
    return out


def load_latentwatch(manifest_file: Path, weights_file: Path, hook_point: HookPoint | None = None) -> SAE:
    """A latentwatch SAE pack: manifest.json (hook point in our vocabulary, k, dtype, the model's fingerprint,
    provenance, metrics) + sae.safetensors, verified against the sha256 the manifest records.

    The model is not checked here (loading needs none): compare `latentwatch_fingerprint(folder)` with
    the model's fingerprint before scoring.
    """
    m = latentwatch_manifest(manifest_file)
    point = _settle(HookPoint.parse(m["hook_point"]), hook_point, str(manifest_file))
    try:
        data = weights_file.read_bytes()
    except OSError as e:
        raise SAEError(f"{weights_file}: not readable: {e}") from None
    sha = hashlib.sha256(data).hexdigest()
    if sha != m["weights_sha256"]:
        raise SAEError(f"{weights_file}: truncated or modified (sha256 {sha[:12]}..., {manifest_file.name} says "
                       f"{m['weights_sha256'][:12]}...); copy the pack again")
    try:
        stored = load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise SAEError(f"{weights_file}: not a readable safetensors file: {e}") from None
    cls = sae_kind("topk", str(manifest_file))
    config = cls.config_cls(d_in=m["d_in"], d_sae=m["d_sae"], hook_point=point,
                            apply_b_dec_to_input=m["apply_b_dec_to_input"], k=m["k"])
    return cls(config, latentwatch_weights(stored, m["dtype"], weights_file), source=str(weights_file))


# ------------------------------------------------------------------------------ any format


def load_sae(path, format: str | None = None, hook_point: str | HookPoint | None = None,
             d_model: int | None = None) -> SAE:
    """Load an SAE from a folder (or one of its files), recognising the format from the files present.

    `hook_point` is needed where the files do not say (a renamed folder); where they do, it must
    agree. `d_model`, when given, must equal the SAE's d_in.
    """
    path = Path(path).absolute()
    if path.suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if not path.exists():
        raise SAEError(f"{path}: no such file or folder")
    folder = path.parent if path.is_file() else path
    fmt = sae_format(format) if format is not None else detect_format(folder)
    if path.is_file() and path.name not in fmt.files:
        raise SAEError(f"{path}: the {fmt.name} format reads {' and '.join(fmt.files)}; pass their folder")
    missing = [f for f in fmt.files if not (folder / f).is_file()]
    if missing:
        _refuse_pickles_in(folder)
        raise SAEError(f"{folder}: the {fmt.name} format needs {' and '.join(fmt.files)}; missing {', '.join(missing)}")
    if isinstance(hook_point, str):
        try:
            hook_point = HookPoint.parse(hook_point)
        except HookPointError as e:
            raise SAEError(f"{path}: hook_point: {e}") from None
    sae = fmt.load(*(folder / f for f in fmt.files), hook_point=hook_point)
    if d_model is not None and sae.d_in != d_model:
        raise SAEError(f"{sae.source}: the SAE reads d_in={sae.d_in} activations, but the model's d_model is {d_model}")
    return sae


def _refuse_pickles_in(folder: Path) -> None:
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(pickles[0])


def detect_format(folder: Path) -> SAEFormat:
    """The first registered format whose files are all in `folder`; a clear SAEError when none is."""
    for fmt in FORMATS.values():
        if all((folder / f).is_file() for f in fmt.files):
            return fmt
    _refuse_pickles_in(folder)
    known = "; ".join(f"{f.name} ({' + '.join(f.files)})" for f in FORMATS.values())
    inside = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "cfg.json").is_file())
    hint = f"; it holds SAE folders {', '.join(inside[:8])}: pass one of them" if inside else ""
    raise SAEError(f"{folder}: no SAE here; latentwatch reads {known}{hint}")
