"""TopK (OpenAI, eai-sparsify, SAELens): per token, the k largest pre-activations, ReLU'd; the rest 0.

Which latents survive depends on all of them, so even one latent needs the full pre-activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monitor.sae.base import SAE, SAEConfig, SAEError


def top_k(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense activations, exactly as SAELens: scatter the ReLU'd top k into zeros."""
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())


def top_k_latents(pre: torch.Tensor, k: int, idx) -> torch.Tensor:
    """Only latents `idx` of `top_k(pre, k)`, without a dense [tokens, d_sae] result: a latent is
    kept if it reaches the k-th largest value (an exact tie there keeps every tied latent)."""
    kth = pre.topk(k, dim=-1).values[..., -1:]
    picked = pre[..., torch.as_tensor(idx, dtype=torch.long, device=pre.device)]
    return torch.where(picked >= kth, picked.relu(), 0.0)


@dataclass(frozen=True, kw_only=True)
class TopKConfig(SAEConfig):
    k: int


class TopKSAE(SAE):
    kind = "topk"
    config_cls = TopKConfig
    per_latent = False
    config: TopKConfig

    def check(self) -> None:
        super().check()
        if not 1 <= self.config.k <= self.d_sae:
            raise SAEError(f"{self.source}: k={self.config.k} must be between 1 and d_sae={self.d_sae}")

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return top_k(pre, self.config.k)

    def encode_latents(self, x: torch.Tensor, idx) -> torch.Tensor:
        return top_k_latents(self.pre_activations(x), self.config.k, idx)
