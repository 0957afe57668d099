"""Which model a pack belongs to: a probe read off the wrong residual stream scores noise."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

N_WEIGHT_SAMPLES = 16


class ModelFingerprint(BaseModel):
    """Cheap identity of a checkpoint: config shape, tokenizer hash, and a few embedding weights.

    The weight sample tells fine-tunes of one base apart; it is compared with a tolerance so the
    same checkpoint in bf16 on GPU still matches the fp32 copy a pack was trained on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    model_type: str
    num_layers: int = Field(ge=1)
    d_model: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weight_sample: list[float] = Field(min_length=N_WEIGHT_SAMPLES, max_length=N_WEIGHT_SAMPLES)

    def mismatch(self, other: ModelFingerprint) -> str | None:
        """The first difference, phrased from the pack's side (self) against the model (other)."""
        for field in ("architecture", "model_type", "num_layers", "d_model", "vocab_size"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"pack was made for {field} {mine}, this model has {theirs}"
        if self.tokenizer_sha256 != other.tokenizer_sha256:
            return (
                f"pack was made for tokenizer sha256 {self.tokenizer_sha256[:12]}…, "
                f"this model's tokenizer is {other.tokenizer_sha256[:12]}…"
            )
        mine, theirs = np.array(self.weight_sample), np.array(other.weight_sample)
        close = np.isclose(theirs, mine, rtol=2e-2, atol=1e-3)
        if not close.all():
            i = int(np.flatnonzero(~close)[0])
            return (
                f"pack was made for different weights of this architecture "
                f"(embedding sample {i} is {mine[i]:.6g} in the pack, {theirs[i]:.6g} here)"
            )
        return None


def tokenizer_sha256(tokenizer) -> str:
    """sha256 over the vocab in id order plus the special tokens; ignores chat templates."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = {"vocab": vocab, "special": sorted(set(tokenizer.all_special_tokens))}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def fingerprint(model, tokenizer) -> ModelFingerprint:
    """Fingerprint any HF causal LM; reads config and the input embedding, runs nothing."""
    config = model.config.get_text_config()
    weight = model.get_input_embeddings().weight.detach()
    # integer arithmetic: float32 linspace cannot represent indices of large embeddings exactly
    idx = torch.arange(N_WEIGHT_SAMPLES) * (weight.numel() - 1) // (N_WEIGHT_SAMPLES - 1)
    sample = weight.reshape(-1)[idx.to(weight.device)].float().cpu()
    return ModelFingerprint(
        architecture=(model.config.architectures or [type(model).__name__])[0],
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        vocab_size=config.vocab_size,
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        weight_sample=sample.tolist(),
    )
