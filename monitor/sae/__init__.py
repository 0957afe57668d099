"""Sparse autoencoders: architectures, the formats they come in, every registration in one place."""

from monitor.sae.base import SAE, SAEConfig, SAEError
from monitor.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from monitor.sae.head import LatentHead
from monitor.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from monitor.sae.loaders import (
    LATENTWATCH_FILES,
    hook_point_from,
    latentwatch_fingerprint,
    load_gemma_scope,
    load_latentwatch,
    load_sae,
    load_saelens,
    load_sparsify,
)
from monitor.sae.registry import FORMATS, SAE_KINDS, SAEFormat, register, register_format, sae_format, sae_kind
from monitor.sae.relu import ReLUConfig, ReLUSAE
from monitor.sae.topk import TopKConfig, TopKSAE

for _kind in (ReLUSAE, JumpReLUSAE, TopKSAE, BatchTopKSAE):
    register(_kind)

# The order is the order `load_sae` tries them in; their file sets do not overlap.
for _format in (
    SAEFormat("saelens", ("cfg.json", "sae_weights.safetensors"), load_saelens),
    SAEFormat("sparsify", ("cfg.json", "sae.safetensors"), load_sparsify),
    SAEFormat("gemma_scope", ("params.npz",), load_gemma_scope),
    SAEFormat("latentwatch", LATENTWATCH_FILES, load_latentwatch),  # ours: `latentwatch sae train`
):
    register_format(_format)

__all__ = [
    "FORMATS",
    "SAE",
    "SAE_KINDS",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "LatentHead",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "SAEError",
    "SAEFormat",
    "TopKConfig",
    "TopKSAE",
    "hook_point_from",
    "latentwatch_fingerprint",
    "load_gemma_scope",
    "load_latentwatch",
    "load_sae",
    "load_saelens",
    "load_sparsify",
    "register",
    "register_format",
    "sae_format",
    "sae_kind",
]
