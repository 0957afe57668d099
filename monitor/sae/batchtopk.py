"""BatchTopK (Bussmann et al.): trained keeping the k * batch largest activations of a whole batch.

At inference we follow SAELens, which saves a trained BatchTopK SAE as a JumpReLU SAE whose
threshold is the learned global one (`topk_threshold`, the running mean of the smallest kept
activation): with that threshold a latent fires where ReLU(pre) > threshold, independently of the
others. A file without the threshold is evaluated as per-token TopK with k rounded. Batch-level
top-k itself is never used: it would make a token's score depend on the other rows in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monitor.sae.base import SAE, SAEConfig, SAEError
from monitor.sae.jumprelu import jump
from monitor.sae.topk import top_k, top_k_latents


@dataclass(frozen=True, kw_only=True)
class BatchTopKConfig(SAEConfig):
    k: float  # average active latents per token in training
    threshold: float | None = None  # the learned global threshold, where the format stores one


class BatchTopKSAE(SAE):
    kind = "batchtopk"
    config_cls = BatchTopKConfig
    config: BatchTopKConfig

    @property
    def per_latent(self) -> bool:  # type: ignore[override]
        return self.config.threshold is not None

    @property
    def k(self) -> int:
        return max(1, round(self.config.k))

    def check(self) -> None:
        super().check()
        if self.config.threshold is None and not 1 <= self.k <= self.d_sae:
            raise SAEError(f"{self.source}: k={self.config.k} must be between 1 and d_sae={self.d_sae}")

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.config.threshold is not None:
            return jump(pre, self.config.threshold)
        return top_k(pre, self.k)

    def encode_latents(self, x: torch.Tensor, idx) -> torch.Tensor:
        if self.per_latent:
            return super().encode_latents(x, idx)
        return top_k_latents(self.pre_activations(x), self.k, idx)
